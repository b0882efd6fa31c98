"""Stage oracles: each kind of stage answers the protocol of :mod:`hessinv.stages.protocol`."""

from hessinv.stages.dense import (
    ELEMENTWISE,
    DenseStage,
    ElementwiseStage,
    FunctionActivation,
    customized,
    is_elementwise,
)
from hessinv.stages.generic import GenericStage, ReshapeStage
from hessinv.stages.losses import LossStage
from hessinv.stages.protocol import Blocks, RiccatiBlocks, Stage

__all__ = [
    "Blocks", "RiccatiBlocks", "Stage", "DenseStage", "ElementwiseStage", "GenericStage", "ReshapeStage",
    "LossStage", "ELEMENTWISE", "FunctionActivation", "is_elementwise", "customized",
]  # fmt: skip
