r"""Data-parallel :class:`~hessinv.optim.Newton` on ``torch.distributed`` (gloo on CPU, NCCL on GPU).

The gradient of a step is DDP's all-reduce (``DistributedDataParallel``: every rank takes its shard of
the global batch); the momentum and the Adam-style damping ``D_t`` are then the same on every rank,
since they are functions of that averaged gradient. What remains is the curvature ``C_k`` of a refresh,
which :class:`DistributedPreconditioner` makes identical on every rank by one of four strategies:

==============  =======================================================================================
strategy        refresh ``k`` (every ``refresh`` steps)
==============  =======================================================================================
``sharded``     the curvature batch is drawn from the *global* batch (the same indices on every rank);
                each rank builds the Gauss-Newton root ``U_r`` (rows of ``G = U^T diag(S) U``) of the
                examples it holds, scaled by ``sqrt(n_r / k)``, and the roots are all-gathered:
                ``G`` is exactly the single-process one, each rank sweeps ``k / world`` examples
``replicated``  the same global curvature batch, but its *examples* are all-gathered and every rank
                builds the whole curvature (works for ``curvature="hessian"`` too)
``rotate``      rank ``k mod world`` builds the curvature of its own curvature batch and broadcasts
                ``(U, S)`` (Distributed-Shampoo style turn taking)
``average``     every rank factors its own curvature batch and the *directions* are averaged
                (GIANT, Wang et al. 2018): one extra all-reduce of ``n`` numbers every step
==============  =======================================================================================

With ``sharded`` or ``replicated`` a run on ``W`` ranks with local batches ``B`` is the single-process
run with the global batch ``W B`` (rank ``r`` holding rows ``[r B, (r + 1) B)``), up to the rounding
of the all-reduce -- which the curvature refreshes can amplify: in float64 the parameters stayed within
1e-8 of one process's over 30 steps (a review, 2026-12-04: a 2-process MLP), in float32 with the eigen
basis they drifted to 12% of how far they had moved (8.7e-2 after 10 steps in a 2026-12-06 probe: the
eigenbasis's tie-break is below float32's rounding, docs/distributed.md), with ``basis="identity"`` 6e-8.
Which trains
fastest per second is measured in ``bench/distributed.py`` (docs/benchmarks.md): ``sharded`` is the
default.

Use inside a DDP loop (``model`` is the plain chain; DDP wraps it for the gradient)::

    torch.distributed.init_process_group("gloo", ...)
    opt = hessinv.optim.Newton(model, loss_fn, mode="precondition", seed=0)
    distribute(opt, "sharded")                   # same parameters, generators, curvature everywhere
    ddp = torch.nn.parallel.DistributedDataParallel(model)

    def closure():
        opt.zero_grad()
        loss = loss_fn(ddp(X_local), y_local)
        loss.backward()                          # DDP averages .grad over the ranks
        return loss

    opt.step(closure)

or :class:`DataParallel` (``step(X_global, y_global)``: shards the batch, the closure above, the
loss averaged over the ranks). :func:`launch` starts ``N`` local processes over gloo with timeouts: a
rank that raises stops the job with :class:`~hessinv.errors.DistributedError` (no hang).
"""

from __future__ import annotations

import datetime
import functools
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hessinv.chain import LossFn
from hessinv.errors import DistributedError, InvalidArgumentError, NonFiniteError
from hessinv.optim.precondition import Preconditioner, curvature_batch, curvature_weight, sums_on
from hessinv.stages.losses import ignored_index, loss_name, loss_reduction

__all__ = [
    "STRATEGIES",
    "DEFAULT_STRATEGY",
    "DistributedPreconditioner",
    "DataParallel",
    "distribute",
    "launch",
    "free_port",
    "init_process_group",
    "shard",
    "save_on_rank0",
]

STRATEGIES = ("sharded", "replicated", "rotate", "average")
DEFAULT_STRATEGY = "sharded"
# the parameter groups' settings every step compares between the ranks (DistributedPreconditioner.check_step)
_STEP_SETTINGS = ("lr", "momentum", "weight_decay")


# -- process groups ---------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _backend(backend: str | None, device: torch.device | str | None) -> str:
    if backend is not None:
        return backend
    if device is not None and torch.device(device).type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def init_process_group(
    rank: int,
    world_size: int,
    port: int,
    *,
    backend: str | None = None,
    device: torch.device | str | None = None,
    timeout: float = 60.0,
) -> None:
    """``torch.distributed.init_process_group`` on ``tcp://127.0.0.1:port`` with a ``timeout`` (seconds)
    for start-up and for every collective: a rank waiting on a dead peer raises instead of hanging.
    Backend: NCCL for a CUDA ``device``, else gloo (over the loopback interface)."""
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    for name, v, lo in (("world_size", world_size, 1), ("rank", rank, 0), ("port", port, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise InvalidArgumentError(f"{name} must be an int >= {lo}, got {v!r}")
    if rank >= world_size or port > 65535:
        raise InvalidArgumentError(
            f"rank {rank} of world_size {world_size} on port {port}: need 0 <= rank < world_size and "
            "port <= 65535"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgumentError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if dist.is_initialized():
        raise DistributedError(
            "torch.distributed is already initialized in this process: call "
            "torch.distributed.destroy_process_group() first (one process group per process)"
        )
    if sys.platform.startswith("linux") and os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        _backend(backend, device),
        init_method=f"tcp://127.0.0.1:{int(port)}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )


def _die_with_parent(parent: int) -> None:
    """Linux: this rank is killed when the process that launched it exits (``PR_SET_PDEATHSIG``) -- a
    launcher killed by a signal runs no ``finally``, and its ranks waited in their collectives until the
    timeout, then wrote their outputs over a newer job's (a probe of ``hessinv train --nproc 2``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # (it exited before the request)
        os._exit(1)


def _entry(
    rank: int, fn: Callable, world: int, port: int, backend, device, timeout, threads, args, parent: int = 0
) -> None:
    if parent:
        _die_with_parent(parent)
    if threads:
        torch.set_num_threads(threads)
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    init_process_group(rank, world, port, backend=backend, device=device, timeout=timeout)
    fn(rank, world, *args)
    dist.barrier()  # leave together: a rank tearing down while a peer still talks to it can abort
    dist.destroy_process_group()


def launch(
    fn: Callable[..., None],
    nprocs: int,
    args: tuple = (),
    *,
    backend: str | None = None,
    device: torch.device | str | None = None,
    timeout: float = 60.0,
    join_timeout: float | None = None,
    threads: int = 1,
    start_method: str = "spawn",
) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh (spawned) processes joined in one process
    group (:func:`init_process_group`; ``timeout`` for every collective). ``fn`` must be importable (a
    module-level function). When a rank raises or dies the others are stopped and
    :class:`~hessinv.errors.DistributedError` carries its traceback; ``join_timeout`` (seconds) bounds the
    whole job. ``threads``: torch threads per process (0: torch's choice). ``start_method="fork"`` starts
    faster (no re-import; Linux, CPU only); ``fn`` and ``args`` then need not be picklable."""
    import torch.multiprocessing as mp

    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise InvalidArgumentError(f"nprocs must be an int >= 1, got {nprocs!r}")
    if start_method not in mp.get_all_start_methods():
        raise InvalidArgumentError(
            f"start_method must be one of {mp.get_all_start_methods()}, got {start_method!r}"
        )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidArgumentError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    port = free_port()
    parent = os.getpid() if start_method in ("spawn", "fork") else 0
    ctx = mp.start_processes(
        _entry,
        # (a forkserver's children are the server's: no parent to die with)
        args=(fn, nprocs, port, backend, device, timeout, threads, tuple(args), parent),
        nprocs=nprocs,
        join=False,
        start_method=start_method,
    )
    deadline = None if join_timeout is None else time.monotonic() + join_timeout
    try:
        while not ctx.join(timeout=0.5):  # raises (and stops the others) when a rank fails
            if deadline is not None and time.monotonic() > deadline:
                raise DistributedError(
                    f"the {nprocs}-process job did not finish within {join_timeout:g} s; its processes "
                    "were stopped (raise join_timeout for longer jobs)"
                )
    except mp.ProcessRaisedException as e:
        raise DistributedError(
            f"rank {e.error_index} of {nprocs} failed; the job was stopped:\n{e}"
        ) from None
    except mp.ProcessExitedException as e:
        raise DistributedError(
            f"rank {e.error_index} of {nprocs} exited with code {e.exit_code}; the job was stopped"
        ) from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
        for p in ctx.processes:
            p.join(5)
            if p.is_alive():
                p.kill()


def _group_info(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise DistributedError(
            "torch.distributed is not initialized: call torch.distributed.init_process_group (or run under "
            "hessinv.optim.distributed.launch / torchrun) first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def shard(x: Tensor, rank: int, world: int) -> Tensor:
    """Rows ``[rank B, (rank + 1) B)`` of a global batch of ``world B`` rows.

    >>> import torch
    >>> X = torch.arange(12).reshape(6, 2)
    >>> shard(X, 1, 3).tolist()  # rank 1 of 3: rows 2 and 3
    [[4, 5], [6, 7]]
    >>> torch.equal(torch.cat([shard(X, r, 3) for r in range(3)]), X)
    True
    """
    for name, v in (("world", world), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgumentError(f"{name} must be an int, got {v!r}")
    if world < 1 or not 0 <= rank < world:
        raise InvalidArgumentError(
            f"rank must be in [0, world) with world >= 1, got rank={rank}, world={world}"
        )
    n = int(x.shape[0])
    if n % world:
        raise DistributedError(
            f"the global batch ({n} examples) does not split evenly over {world} ranks: use a batch size "
            f"divisible by {world}"
        )
    b = n // world
    return x[rank * b : (rank + 1) * b]


def _gather_rows(t: Tensor, group) -> list[Tensor]:
    """All-gather tensors whose first dimension differs between ranks (padded, then trimmed)."""
    world = dist.get_world_size(group)
    count = torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    sizes = [int(c) for c in counts]
    m = max(sizes)
    padded = t.new_zeros((m, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [o[:s] for o, s in zip(out, sizes, strict=True)]


def _same_everywhere(value: int, what: str, group) -> None:
    """Raise the same DistributedError on every rank if ``value`` differs between ranks."""
    world = dist.get_world_size(group)
    v = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend(group) == "nccl":
        v = v.cuda()
    vs = [torch.zeros_like(v) for _ in range(world)]
    dist.all_gather(vs, v, group=group)
    values = [int(x) for x in vs]
    if len(set(values)) > 1:
        raise DistributedError(f"{what} differs between ranks: {values}; every rank needs the same")


def _check_strategy(strategy: Any) -> str:
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise InvalidArgumentError(
            f"strategy must be one of {', '.join(map(repr, STRATEGIES))}, got {strategy!r}"
        )
    return strategy


def _loss_refusal(loss_fn: Any) -> str | None:
    """Why ``loss_fn`` cannot be data-parallel (None: it can). DDP averages the ranks' gradients, and
    :class:`DataParallel` the ranks' losses, each weighted by its share of the loss's normalizer (the
    examples, or the targets not ignored): right for a per-example *mean* only."""
    kw = loss_fn.keywords if isinstance(loss_fn, functools.partial) else {}
    red = loss_reduction(loss_fn) or "mean"
    if red not in ("mean", "batchmean"):  # (KLDivLoss's batchmean: a mean over the examples)
        return (
            f"the loss has reduction={red!r}; data-parallel training averages the ranks' gradients, which "
            "is the global batch's gradient for a mean only: build the loss with reduction='mean'"
        )
    weight = kw.get(
        "weight", loss_fn.weight if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) else None
    )
    if weight is not None:
        return (
            f"the loss {loss_name(loss_fn)} has class weights: its mean divides by each rank's own "
            "sum of weights, so the ranks' average is not the global batch's loss; use a loss without "
            "weight=... (or one process)"
        )
    return None


def _ignores(loss_fn: Any, targets: Tensor) -> int | None:
    """The ``ignore_index`` of a loss that averages over the targets it does not ignore (integer
    targets of ``CrossEntropyLoss`` / ``NLLLoss``), else None."""
    ignore = ignored_index(loss_fn)
    return ignore if ignore is not None and not targets.is_floating_point() else None


def _normalizer(loss_fn: Any, targets: Tensor) -> Tensor:
    """What the mean loss of ``targets`` divides by, as an int64 tensor on the targets' device: the
    number of examples, or of the targets not ignored (``ignore_index``)."""
    ignore = _ignores(loss_fn, targets)
    if ignore is None:
        return torch.tensor(int(targets.shape[0]), dtype=torch.int64, device=targets.device)
    return (targets.long() != ignore).sum().to(torch.int64)  # (int64: -100 is 156 as a uint8)


def _describe(m: nn.Module) -> str:
    """A module as every process spells it: its class and ``extra_repr``, a traced piece's code."""
    code = getattr(m, "code", None)  # (fx.GraphModule)
    return f"{type(m).__qualname__}({m.extra_repr()})" + (code if isinstance(code, str) else "")


def _state_fingerprint(opt: Any, pc: Preconditioner) -> tuple[float, float, float, float]:
    """Sums and 1-norms of the optimizer's momentum (a ``Newton``'s; another optimizer's state tensors:
    SGD's momentum buffers, Adam's moments -- functions of the preconditioned directions) and of the
    preconditioner's second moments ``v``: identical on every rank for every strategy (functions of the
    averaged gradients only), so a rank that loaded another checkpoint, or stepped alone before
    :func:`distribute`, shows here."""
    newton = getattr(opt, "_newton", None)
    if newton is not None:
        mine: list[Tensor] = [newton["momentum"]] if isinstance(newton.get("momentum"), Tensor) else []
    else:  # (each tensor summed on its own device: Adam's step counts stay on the CPU beside CUDA moments)
        state = getattr(opt, "state", {})
        mine = [
            t.detach()
            for p in (q for g in opt.param_groups for q in g["params"])
            for t in state.get(p, {}).values()
            if isinstance(t, Tensor) and t.is_floating_point()
        ]
    v = pc.state.get("v")
    return (
        math.fsum(float(t.double().sum()) for t in mine),
        math.fsum(float(t.double().abs().sum()) for t in mine),
        *((float(v.sum()), float(v.abs().sum())) if isinstance(v, Tensor) else (0.0, 0.0)),
    )


def _settings(opt: Any, strategy: str) -> dict[str, Any]:
    """What every rank's optimizer must agree on (compared by :func:`distribute`)."""
    pc = opt.preconditioner
    lf = opt.loss_fn
    loss_name = type(lf).__name__ if isinstance(lf, nn.Module) else getattr(lf, "__qualname__", str(lf))
    return {
        "dtype": str(opt.chain.dtype),
        "parameter count": int(opt.chain.num_params),
        "parameter shapes": tuple(tuple(p.shape) for p in opt.chain.params),
        "strategy": strategy,
        "mode": "precondition" if opt.mode in ("auto", "precondition") else opt.mode,
        "lr": tuple(float(g["lr"]) for g in opt.param_groups),
        "weight_decay": tuple(float(g.get("weight_decay", 0.0)) for g in opt.param_groups),
        "momentum": float(opt.momentum),
        "curvature": pc.curvature,
        "diagonal_damping": float(pc.damping),
        "max_relative_step": opt.max_relative_step,
        "beta2": float(pc.beta2),
        "eps": float(pc.eps),
        "warmup": int(pc.warmup),
        "stale_ratio": float(pc.stale_ratio),
        "basis": "identity" if pc.basis is None else "eigen",
        "curvature_batch_size": int(pc.curvature_batch_size),
        "max_rank": int(pc.max_rank),
        "refresh": int(pc.refresh),
        "basis_refresh": pc.basis_refresh,
        # the function: the stages and their modules (a ReLU on one rank where the others have Tanh: the same
        # shapes, and DDP's averaged gradient would train the average of two networks)
        "stages": tuple(
            (type(st).__name__, tuple(_describe(m) for m in st.modules)) for st in opt.chain.stages
        ),
        "loss": (
            loss_name,
            getattr(lf, "reduction", None),
            getattr(lf, "ignore_index", None),
            getattr(lf, "label_smoothing", None),
        ),
        "basis_max_dim (the rotated weights)": (
            None if pc.basis is None else tuple(zip(pc.basis.blocks, pc.basis.sides, strict=True))
        ),
        "steps taken": (int(opt.steps), int(pc.state["t"])),
        "state (momentum and second moments)": _state_fingerprint(opt, pc),
    }


# -- the preconditioner ---------------------------------------------------------------------------------
class DistributedPreconditioner(Preconditioner):
    """A :class:`~hessinv.optim.Preconditioner` whose curvature is the same on every rank (module docstring).

    Built from a preconditioner by :meth:`wrap` (normally through :func:`distribute`). Every rank must
    call :meth:`update` / :meth:`solve` at the same steps with local batches of the same size and, when
    it has an ``optimizer``, with the same learning rates, momentum and weight decay in its parameter
    groups; every :meth:`update` checks that with one all-gather of a few numbers (:meth:`check_step`).
    """

    strategy: str
    group: Any
    optimizer: Any
    #: no redraw of a curvature batch whose loss is not finite (:func:`curvature_batch`): a rank's own
    #: data would decide it, and the ranks' generators would fall out of step
    redraw = False

    @classmethod
    def wrap(
        cls, pc: Preconditioner, strategy: str = DEFAULT_STRATEGY, group: Any = None, optimizer: Any = None
    ) -> DistributedPreconditioner:
        """The distributed version of ``pc`` (same settings and state), for the process ``group``.
        ``optimizer``: the optimizer that steps with ``pc`` (:func:`distribute` passes its ``Newton``),
        whose parameter groups' ``lr``, ``momentum`` and ``weight_decay`` every step compares between
        the ranks (:meth:`check_step`); its number of groups must not change afterwards."""
        _check_strategy(strategy)
        if pc.curvature == "hessian" and strategy in ("sharded", "rotate"):
            raise DistributedError(
                f"strategy {strategy!r} shares the Gauss-Newton root (U, S); with curvature='hessian' use "
                "'replicated' or 'average'"
            )
        _group_info(group)
        new = cls.__new__(cls)
        new.__dict__.update(pc.__dict__)
        new.strategy, new.group, new.optimizer = strategy, group, optimizer
        new._checked_at = None
        return new

    @property
    def rank(self) -> int:
        """This process's rank in the preconditioner's process group."""
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        """The number of processes in the preconditioner's process group."""
        return dist.get_world_size(self.group)

    def check_step(self, inputs: Tensor, targets: Tensor, weighted: bool = False) -> list[tuple[int, int]]:
        """``(local batch size, loss normalizer)`` of every rank, by one all-gather of a few numbers (also
        the :attr:`optimizer`'s groups' ``lr``, ``momentum``, ``weight_decay``): the same
        :class:`~hessinv.errors.DistributedError` on every rank when the local batch sizes differ
        (DDP's average of the ranks' means is then not the global batch's mean), when those settings
        differ (a scheduler stepped on one rank, or fed the rank's own loss: the replicas would drift
        apart) or, unless ``weighted`` (the caller weights each rank's loss by its share, as
        :class:`DataParallel` does), when the ranks hold different numbers of targets that an
        ``ignore_index`` loss counts."""
        _group_info(self.group)  # a named error once the process group is gone
        groups = [] if getattr(self, "optimizer", None) is None else self.optimizer.param_groups
        # float64 holds the counts exactly (below 2^53); the gradient's fingerprint where observe() saw
        # this step's (NaN where not: DataParallel checks before it computes the gradient)
        fp = self.__dict__.get("_fingerprint")
        fp = fp[1:] if fp is not None and fp[0] == self.state["t"] else (math.nan, math.nan)
        opt = getattr(self, "optimizer", None)
        # settings read at every step besides the groups' (a None budget as -1), and the state's fingerprint
        extras = [("damping", float(self.damping))]
        if opt is not None:
            budget = getattr(opt, "max_relative_step", None)
            extras.append(("max_relative_step", -1.0 if budget is None else float(budget)))
        state = list(_state_fingerprint(opt, self)) if opt is not None else [math.nan] * 4
        head = torch.tensor(
            [float(inputs.shape[0]), float(_normalizer(self.loss_fn, targets)), *fp, *state]
            + [float(g.get(key, 0.0)) for key in _STEP_SETTINGS for g in groups]
            + [value for _, value in extras],
            dtype=torch.float64,
        )
        if dist.get_backend(self.group) == "nccl":
            head = head.cuda()
        heads = [torch.zeros_like(head) for _ in range(self.world_size)]
        dist.all_gather(heads, head, group=self.group)
        values = [h.tolist() for h in heads]
        counts = [(int(v[0]), int(v[1])) for v in values]
        sizes = [c[0] for c in counts]
        if len(set(sizes)) > 1:
            raise DistributedError(
                f"the local batch size differs between ranks: {sizes}; every rank needs the same (the "
                "ranks' mean gradients are averaged with equal weights): split each global batch evenly "
                "(hessinv.optim.distributed.shard)"
            )
        names = [k for k in _STEP_SETTINGS for _ in groups] + [name for name, _ in extras]
        for i, key in enumerate(names):
            seen = [v[8 + i] for v in values]
            if len(set(seen)) > 1:
                where = (
                    f" of parameter group {i % len(groups)}"
                    if len(groups) > 1 and key in _STEP_SETTINGS
                    else ""
                )
                raise DistributedError(
                    f"the {key}{where} differs between ranks ("
                    + ", ".join(f"rank {r} {x!r}" for r, x in enumerate(seen))
                    + "): the replicas would drift apart. Change it alike on every rank: step a scheduler on "
                    "every rank, and feed ReduceLROnPlateau the global batch's loss (DataParallel.step "
                    "returns it; a closure's loss is this rank's own)"
                )
        # (after the settings: a weight decay that differs makes the penalized gradients differ too)
        sums, l1 = [v[2] for v in values], [v[3] for v in values]
        tol = math.sqrt(torch.finfo(self.chain.dtype).eps) * max(l1)
        if all(map(math.isfinite, sums + l1)) and (max(sums) - min(sums) > tol or max(l1) - min(l1) > tol):
            raise DistributedError(
                "the gradient differs between ranks (sums "
                + ", ".join(f"rank {r} {x:.6g}" for r, x in enumerate(sums))
                + "): each rank's .grad must be the global batch's, DDP's all-reduce of the "
                "ranks' gradients; compute it through DistributedDataParallel(model) in the closure (module "
                "docstring), or use DataParallel.step(X_global, y_global)"
            )
        # the state: bit for bit alike where it is (every rank computed it from the same numbers; after
        # the gradient, which makes it differ from this step on where it does)
        states = [tuple(v[4:8]) for v in values]
        if all(map(math.isfinite, states[0])) and len(set(states)) > 1:
            raise DistributedError(
                "the optimizer's state (its momentum and second moments) differs between ranks: a checkpoint "
                "loaded on some ranks only, or steps taken on a rank alone before distribute(); load the "
                "same checkpoint on every rank (DataParallel.load_state_dict on each), and build "
                "DataParallel before any step"
            )
        labelled = [c[1] for c in counts]
        if 0 in labelled and any(labelled):
            raise DistributedError(
                f"rank {labelled.index(0)}'s shard of the global batch has no target that the loss counts "
                f"(every one equals ignore_index={getattr(self.loss_fn, 'ignore_index', None)}): its mean "
                "loss is 0/0, which a rank's step refuses although the global batch's is defined; shuffle "
                "the data so that every shard holds a labelled target (or use one process)"
            )
        if not weighted and len(set(labelled)) > 1:
            raise DistributedError(
                f"the ranks hold different numbers of targets that the loss counts (ignore_index="
                f"{getattr(self.loss_fn, 'ignore_index', None)}): {labelled}; DDP's average of the ranks' "
                "mean losses is then not the global batch's mean: use DataParallel.step (it weights each "
                "rank's loss by its share), or give every rank the same number of labelled targets"
            )
        if loss_reduction(self.loss_fn) is None:
            # a function (or a module without reduction=, or with its own forward): does it sum over the
            # examples? (found once, on
            # examples it counts, or by the curvature's weighting)
            if self._sums is None:
                self._sums = sums_on(self, inputs, targets)
            if self._sums:
                raise DistributedError(
                    f"the loss {loss_name(self.loss_fn)} sums over the examples (its loss of a batch taken "
                    "twice over is twice its loss); data-parallel training averages the ranks' gradients, "
                    "which is the global batch's gradient for a mean only: average over the examples"
                )
        self._checked_at = self.state["t"] + 1  # the step whose update() needs no second check
        return counts

    def _precondition_checks(self, inputs: Any, targets: Any) -> tuple[Tensor, Tensor, Tensor] | None:
        """:meth:`Preconditioner._precondition_checks`, agreed between the ranks (one all-reduce of three
        flags) before any collective of the step: a shard refused on one rank (an empty one, a NaN in it) is
        refused on every rank -- the others waited in :meth:`check_step` until the collective timeout, then
        got the backend's bare error -- and a shard with no target the loss counts, where others have some,
        is a :class:`DistributedError` everywhere (DDP's average of the ranks' mean losses is not the global
        batch's then; that rank left its raw gradient for its optimizer to apply)."""
        error: BaseException | None = None
        ready = None
        try:
            ready = super()._precondition_checks(inputs, targets)
        except BaseException as e:  # (an interrupt too) re-raised below, once every rank has heard of it
            error = e
        failed, skipped, learning = _any_rank(
            [error is not None, error is None and ready is None, ready is not None], self.group
        )
        if error is not None:
            raise error
        if failed:
            raise DistributedError(
                "another rank's precondition_ was refused before the step's collectives (its own error "
                "names the cause: its shard of the batch, its gradient, an interrupt): no rank "
                "preconditioned this batch"
            )
        if skipped and learning:
            raise DistributedError(
                "a rank's shard of this batch has no target that the loss counts (every one equals "
                f"ignore_index={getattr(self.loss_fn, 'ignore_index', None)}), the others' have some: DDP's "
                "average of the ranks' mean losses is then not the global batch's mean; shuffle the data so "
                "that every shard holds a labelled target (or use one process)"
            )
        return ready

    def observe(self, g: Tensor) -> Tensor:
        """:meth:`Preconditioner.observe`, keeping a fingerprint of ``g`` (its sum and 1-norm) for
        :meth:`check_step` to compare between the ranks."""
        out = super().observe(g)
        self._fingerprint = (self.state["t"], float(g.sum()), float(g.abs().sum()))
        return out

    def update(self, inputs: Tensor, targets: Tensor, carry: Any = ()) -> None:
        if self._checked_at != self.state["t"]:  # not checked for this step yet (DataParallel checks first)
            self.check_step(inputs, targets)
        self._checked_at = None
        if self.due():  # the curvature reads BatchNorm's running statistics (eval mode): rank 0's, as
            # DDP's next forward will broadcast them (each rank updated its own from its shard)
            src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
            with torch.no_grad():
                for m in self._mode_modules:
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        for b in m.buffers(recurse=False):
                            dist.broadcast(b, src, group=self.group)
        super().update(inputs, targets, carry)

    def _global_draw(self, targets: Tensor) -> tuple[Tensor, int, float]:
        """This rank's rows of a curvature batch drawn from the global batch (``world * B`` rows, rank
        ``r`` holding ``[r B, (r + 1) B)``) exactly as one process draws it from that batch
        (:func:`~hessinv.optim.precondition.curvature_batch`: among the targets not ignored by an
        ``ignore_index`` loss, whose targets are then all-gathered); ``k``, the rows drawn; and this
        rank's share of the loss's normalizer over them (its rows' weight in the curvature's mean)."""
        B = int(targets.shape[0])
        _same_everywhere(B, "the local batch size", self.group)
        Bg, k = self.world_size * B, self.curvature_batch_size
        ignore = _ignores(self.loss_fn, targets)
        if ignore is None:
            yg = None
            drawn = curvature_batch(self.loss_fn, torch.empty(Bg, 0), k, self.generator)  # no labels
        else:
            parts = [torch.empty_like(targets) for _ in range(self.world_size)]
            dist.all_gather(parts, targets.contiguous(), group=self.group)
            yg = torch.cat(parts).cpu()
            drawn = curvature_batch(self.loss_fn, yg, k, self.generator)
        idx = torch.arange(Bg) if drawn is None else drawn.cpu()
        lo = self.rank * B
        mine = (idx >= lo) & (idx < lo + B)
        share = int(mine.sum()) / max(int(idx.numel()), 1)
        if yg is not None:
            kept = yg[idx].long() != ignore
            total = int(kept.sum())
            if total:
                share = int(kept[mine].sum()) / total
        return idx[mine] - lo, int(idx.numel()), share

    def _curvature_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.strategy != "replicated":
            return super()._curvature_batch(inputs, targets)
        local, _, _ = self._global_draw(targets)
        local = local.to(inputs.device)
        X = torch.cat(_gather_rows(inputs[local].contiguous(), self.group))
        y = torch.cat(_gather_rows(targets[local].contiguous(), self.group))
        return X, y

    def curvature_root(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.strategy == "sharded":
            local, k, share = self._global_draw(targets)
            n = self.chain.num_params
            if local.numel():
                local = local.to(inputs.device)
                Xl, yl = inputs[local], targets[local]
                U, S = self._root(Xl, yl, of=k, full=True)  # k's share of max_rank
                # this shard's share of the mean over the k examples; for a loss that sums them, its sum
                # times B / k (the curvature of the rank's loss, as its gradient is)
                w = curvature_weight(self, Xl, yl, targets, k)
                r = math.sqrt(w if self._sums else share)
                U = U * r
                factors = [(o, d, m, T * r, Z, i) for o, d, m, T, Z, i in self._root_factors or []]
            else:
                U = torch.zeros(0, n, dtype=self.chain.dtype, device=self.chain.device)
                S = torch.zeros(0, dtype=self.chain.dtype, device=self.chain.device)
                factors = None
            # the Linear weights' row factors of the gathered rows, as one process keeps them: K, the
            # solves and the choice between a rank update of D and a rebuild (by their costs) as its
            self._root_factors = self._gathered_factors(factors, int(local.numel()))
            return torch.cat(_gather_rows(U, self.group)), torch.cat(_gather_rows(S, self.group))
        if self.strategy == "rotate":
            _same_everywhere(int(inputs.shape[0]), "the local batch size", self.group)
            owner = (self.state["refreshes"] - 1) % self.world_size
            Xc, yc = self._curvature_batch(inputs, targets)  # every rank draws: generators stay in step
            if self.rank == owner:
                U, S = self._root(Xc, yc, full=True)
                U = self._weighted(U, curvature_weight(self, Xc, yc, targets))
                head = torch.tensor([U.shape[0]], dtype=torch.int64, device=U.device)
            else:
                head = torch.zeros(1, dtype=torch.int64, device=self.chain.device)
            src = owner if self.group is None else dist.get_global_rank(self.group, owner)
            dist.broadcast(head, src, group=self.group)
            if self.rank != owner:
                r = int(head)
                U = torch.empty(r, self.chain.num_params, dtype=self.chain.dtype, device=self.chain.device)
                S = torch.empty(r, dtype=self.chain.dtype, device=self.chain.device)
            dist.broadcast(U, src, group=self.group)
            dist.broadcast(S, src, group=self.group)
            self._root_factors = None  # the owner's alone: every rank forms K the same way
            return U, S
        # replicated (global curvature batch from _curvature_batch) and average (this rank's own)
        return super().curvature_root(inputs, targets)

    def _gathered_factors(self, factors: list | None, examples: int) -> list | None:
        """Every rank's row factors ``(offset, d, m, T, Z, idx)`` of its shard of the curvature batch
        (``examples`` examples; None: none), joined in rank order as the rows of ``U`` are: ``T``'s rows
        and ``Z``'s examples concatenated, ``idx`` shifted by the examples of the ranks before. None on
        every rank where the ranks' weights differ (a stage mixing examples on one shard only)."""
        meta = None if factors is None else [(o, d, m) for o, d, m, *_ in factors]
        metas: list = [None] * self.world_size
        dist.all_gather_object(metas, meta, group=self.group)
        known = [x for x in metas if x is not None]
        if not known or any(x != known[0] for x in known):
            return None
        count = torch.tensor([examples], dtype=torch.int64, device=self.chain.device)
        counts = torch.cat([count.new_zeros(1), *_gather_rows(count, self.group)])
        starts = torch.cumsum(counts, 0)[:-1].tolist()
        out = []
        for j, (o, d, m) in enumerate(known[0]):
            if factors is None:
                dt, dev = self.chain.dtype, self.chain.device
                T, Z = torch.zeros(0, d, dtype=dt, device=dev), torch.zeros(0, m, dtype=dt, device=dev)
                idx = torch.zeros(0, dtype=torch.int64, device=dev)
            else:
                T, Z, idx = factors[j][3], factors[j][4], factors[j][5]
            Ts, Zs = _gather_rows(T.contiguous(), self.group), _gather_rows(Z.contiguous(), self.group)
            ids = _gather_rows(idx.to(torch.int64).contiguous(), self.group)
            joined = torch.cat([i + s for i, s in zip(ids, starts, strict=True)]).to(idx.dtype)
            out.append((o, d, m, torch.cat(Ts), torch.cat(Zs), joined))
        return out

    def solve(self, g: Tensor, rotated: bool = False) -> Tensor:
        d = super().solve(g, rotated)
        if self.strategy == "average":
            d = d.contiguous().clone()
            dist.all_reduce(d, group=self.group)
            d /= self.world_size
        return d


def _refusal(opt: Any, strategy: Any) -> tuple[type, str] | None:
    """Why ``distribute(opt, strategy)`` cannot run on this rank (None: it can), before anything changes."""
    from hessinv.optim.newton import Newton

    try:
        _check_strategy(strategy)
    except InvalidArgumentError as e:
        return InvalidArgumentError, str(e)
    if not isinstance(opt, Newton):
        return InvalidArgumentError, (
            f"distribute() makes a hessinv.optim.Newton data-parallel; got {type(opt).__name__}. A "
            "torch.optim optimizer needs no distribute(): wrap the model in DistributedDataParallel and "
            "step it as usual (every rank applies the same averaged gradient)"
        )
    pc = opt.preconditioner
    if pc is None:
        return DistributedError, (
            "this Newton is in trust-region mode, which is not data-parallel; build it with "
            "mode='precondition' (mini-batches)"
        )
    if pc.curvature == "hessian" and strategy in ("sharded", "rotate"):
        return DistributedError, (
            f"strategy {strategy!r} shares the Gauss-Newton root (U, S); with curvature='hessian' use "
            "'replicated' or 'average'"
        )
    why = _loss_refusal(opt.loss_fn)
    if why is not None:
        return DistributedError, why
    return None


def distribute(opt: Any, strategy: str = DEFAULT_STRATEGY, group: Any = None) -> Any:
    """Make a :class:`~hessinv.optim.Newton` in precondition mode data-parallel (in place; returns it).

    First checks, with one all-gather, that every rank can (a Newton in precondition mode, a known
    ``strategy``, a loss with ``reduction='mean'`` and no class weights) and that every rank's settings
    agree (learning rates, momentum, damping, ``beta2``, basis, curvature, ``curvature_batch_size``,
    ``max_rank``, ``refresh``, dtype, parameter count, loss, steps taken): else the same named error on
    every rank, and nothing is changed. Then broadcasts rank 0's parameters and the optimizer's
    generators (so every rank draws the same curvature indices) and swaps its preconditioner for a
    :class:`DistributedPreconditioner`, which compares the parameter groups' ``lr``, ``momentum`` and
    ``weight_decay`` again at every step (a scheduler may change them: alike on every rank, or a
    :class:`~hessinv.errors.DistributedError` before the replicas drift apart). The gradient must come
    from DDP (the closure form of ``step``, or :class:`DataParallel`). ``mode="auto"`` is pinned to
    ``"precondition"`` (the trust-region mode is a full-batch method: not data-parallel).
    """
    rank, world = _group_info(group)
    why = _refusal(opt, strategy)
    if why is None:
        mine: tuple[Any, Any] = (None, _settings(opt, strategy))
    else:
        mine = ((why[0].__name__, why[1]), None)
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine, group=group)
    for r, (problem, _) in sorted(enumerate(every), key=lambda t: t[0] != rank):  # this rank's first
        if problem is not None:
            kind = InvalidArgumentError if problem[0] == "InvalidArgumentError" else DistributedError
            raise kind(problem[1] if r == rank else f"rank {r} of {world} cannot join: {problem[1]}")
    settings = [s for _, s in every]
    differ = [key for key in settings[0] if any(s[key] != settings[0][key] for s in settings[1:])]
    if "parameter count" in differ:  # other models: their rotated weights differ too, no news
        differ = [key for key in differ if not key.startswith("basis_max_dim")]
    if differ:
        detail = "; ".join(
            f"{key}: " + ", ".join(f"rank {r} {s[key]!r}" for r, s in enumerate(settings)) for key in differ
        )
        raise DistributedError(
            f"the optimizer's settings differ between ranks ({detail}); every rank must build the same "
            "Newton (same arguments, same model) and load the same checkpoint"
        )
    pc = opt.preconditioner
    if opt.mode == "auto":
        opt.mode = opt._newton["mode"] = "precondition"
    src = 0 if group is None else dist.get_global_rank(group, 0)
    with torch.no_grad():
        for p in opt.chain.params:
            dist.broadcast(p.data, src, group=group)
    states = [pc.generator.get_state(), opt._generator.get_state()]
    dist.broadcast_object_list(states, src=src, group=group)
    pc.generator.set_state(states[0])
    opt._generator.set_state(states[1])
    opt._newton["rng"] = opt._generator.get_state()
    opt.preconditioner = DistributedPreconditioner.wrap(pc, strategy, group, optimizer=opt)
    return opt


def _loss_text(loss_fn: Any, other: Any = None) -> str:
    """A loss named for a message; a module against ``other`` of its class by the settings and tensors
    that differ (``extra_repr`` leaves most out: two ``CrossEntropyLoss()`` of different label smoothing
    read alike)."""
    if not isinstance(loss_fn, nn.Module):
        return getattr(loss_fn, "__qualname__", type(loss_fn).__name__)
    name = type(loss_fn).__name__
    if type(other) is not type(loss_fn):
        return f"{name}({loss_fn.extra_repr()})"

    mine, theirs = _loss_state(loss_fn), _loss_state(other)
    differ = [k for k in mine if k not in theirs or not _same_value(mine[k], theirs[k])]
    shown = ", ".join(
        f"{k}={mine[k]!r}" if not isinstance(mine[k], Tensor) else f"{k}=<tensor>" for k in differ
    )
    return f"{name}({shown or loss_fn.extra_repr()})"


def _loss_state(m: nn.Module) -> dict[str, Any]:
    """A loss module's settings (plain attributes but the train / eval flag), buffers (class weights,
    ``pos_weight``) and submodules, by name."""
    out = {k: v for k, v in vars(m).items() if not k.startswith("_") and k != "training"}
    return out | dict(m.named_buffers(recurse=False)) | dict(m.named_children())


def _same_value(x: Any, y: Any) -> bool:
    """Two settings of a loss alike: tensors equal in shape and values, lists, tuples and dicts item by
    item, anything else as :func:`_same_loss` compares losses."""
    if isinstance(x, Tensor) or isinstance(y, Tensor):
        both = isinstance(x, Tensor) and isinstance(y, Tensor)
        return both and x.shape == y.shape and torch.equal(x, y)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_same_value(u, v) for u, v in zip(x, y, strict=True))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same_value(x[k], y[k]) for k in x)
    return _same_loss(x, y)


def _same_loss(a: Any, b: Any) -> bool:
    """The same loss: one object; ``functools.partial`` objects of the same function, arguments and
    keywords; or modules of one class whose settings (plain attributes but the train / eval flag), tensors
    (class weights, ``pos_weight``) and submodules are alike."""
    same = _same_value
    if a is b:
        return True
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return same(a.func, b.func) and same(a.args, b.args) and same(a.keywords, b.keywords)
    if isinstance(a, nn.Module) and isinstance(b, nn.Module):
        return type(a) is type(b) and same(_loss_state(a), _loss_state(b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an == that does not give a truth value
        return False


class DataParallel:
    """``loss = dp.step(X, y)`` on the *global* batch: this rank's shard (:func:`shard`) through DDP, one
    :class:`~hessinv.optim.Newton` step, and the global batch loss. Each rank's loss is weighted by its
    share of the loss's normalizer (``world * n_r / sum(n)``, ``n_r`` its examples, or its targets not
    ignored by an ``ignore_index`` loss): DDP's average of the ranks' gradients is then the global batch's
    gradient, also where the ranks hold different numbers of labelled targets.

    Args:
        opt: a ``Newton`` over ``model`` (made data-parallel here by :func:`distribute`).
        model, loss_fn: the plain chain and its loss module (``reduction='mean'``, no class weights).
        strategy, group: see :func:`distribute`.
    """

    def __init__(
        self,
        opt: Any,
        model: nn.Module,
        loss_fn: LossFn,
        strategy: str = DEFAULT_STRATEGY,
        group: Any = None,
    ):
        from torch.nn.parallel import DistributedDataParallel

        self.rank, self.world_size = _group_info(group)
        why = _loss_refusal(loss_fn)
        if why is not None:
            raise DistributedError(why)
        if not _same_loss(loss_fn, getattr(opt, "loss_fn", loss_fn)):
            raise InvalidArgumentError(
                f"DataParallel's loss_fn ({_loss_text(loss_fn, opt.loss_fn)}) is not the optimizer's "
                f"({_loss_text(opt.loss_fn, loss_fn)}): the gradient would come from one and the curvature "
                "from the other; pass the same loss (DataParallel(opt, model, opt.loss_fn))"
            )
        self.opt, self.model, self.loss_fn, self.group = (
            distribute(opt, strategy, group),
            model,
            loss_fn,
            group,
        )
        dev = next(model.parameters()).device
        self.ddp = DistributedDataParallel(
            model, device_ids=[dev] if dev.type == "cuda" else None, process_group=group
        )

    @property
    def last_stats(self) -> Any:
        """The wrapped :class:`~hessinv.optim.Newton`'s statistics of its latest step on this rank."""
        return self.opt.last_stats

    def step(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One step on the global batch ``(inputs, targets)`` (the same on every rank): this rank takes its
        shard, the gradients are averaged by DistributedDataParallel (weighted by each rank's count of
        examples the loss counts) and the preconditioner combines the ranks' curvature; returns the
        global batch's loss, the same on every rank."""
        _group_info(self.group)  # a named error once the process group is gone
        X, y = shard(inputs, self.rank, self.world_size), shard(targets, self.rank, self.world_size)
        counts = self.opt.preconditioner.check_step(X, y, weighted=True)  # the step's one small collective
        n = [c[1] for c in counts]
        total = sum(n)
        # world * n_r / sum(n): exactly 1.0 when every rank holds the same count
        weight = self.world_size * n[self.rank] / total if total else 1.0

        def closure() -> Tensor:
            self.opt.zero_grad()
            error: Exception | None = None
            try:
                loss = self.loss_fn(self.ddp(X), y)
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                error = e
            # (a loss not finite on one rank's shard alone: its step would refuse it while the others wait
            # in the backward pass's all-reduce until gloo's timeout)
            finite = error is not None or bool(torch.isfinite(loss.detach()).all())
            # every rank learns of one rank's failure before the backward pass, whose all-reduce the others
            # would wait in until the collective timeout (a class out of range in one shard: a loop that
            # skips a refused batch hung there, then got gloo's bare error)
            failed, diverged = _any_rank([error is not None, not finite], self.group)
            if error is not None:
                self.opt._explain_failure(X, y)  # one process's named error (a class out of range)
                raise error
            if failed:
                raise DistributedError(
                    "another rank's shard of this batch failed in the forward pass or the loss (its error "
                    "names the cause): the step was taken on no rank"
                )
            if diverged:  # (the same error class on every rank: a divergence, not one rank's failure)
                where = (
                    f"on rank {self.rank}'s shard is {float(loss.detach())}"
                    if not finite
                    else ("on another rank's shard is not finite")
                )
                raise NonFiniteError(f"the loss {where}: the step was taken on no rank")
            (loss if weight == 1.0 else loss * weight).backward()
            return loss.detach()

        self.opt._batch_agreed = True  # (check_step and the closure agreed on the batch: no more collectives)
        try:
            loss = self.opt.step(X, y, closure=closure).detach().clone().reshape(1)
        finally:
            self.opt._batch_agreed = False
        if weight != 1.0:
            loss *= weight
        dist.all_reduce(loss, group=self.group)
        return (loss / self.world_size).reshape(())

    def agree_stop(self, stop: bool) -> bool:
        """``True`` on every rank when any rank wants to stop (a wall-clock budget ends on one step)."""
        return agree_stop(stop, self.group)

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's :meth:`~hessinv.optim.Newton.state_dict` (identical on every rank)."""
        return self.opt.state_dict()

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (on every rank)."""
        self.opt.load_state_dict(sd)


def _any_rank(flags: list[bool], group: Any = None) -> list[bool]:
    """Each flag, true where any rank's is (one all-reduce MAX of a few numbers)."""
    _group_info(group)  # a named error outside a process group
    t = torch.tensor([1.0 if f else 0.0 for f in flags])
    if dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [v > 0 for v in t.tolist()]


def agree_stop(stop: bool, group: Any = None) -> bool:
    """Any rank's ``stop``: every rank leaves a loop at the same step."""
    return _any_rank([stop], group)[0]


def save_on_rank0(obj: Any, path: str | os.PathLike, group: Any = None) -> None:
    """``torch.save(obj, path)`` on rank 0 (atomically: a temporary file, then a rename), then a barrier,
    so that every rank may read ``path`` when this returns."""
    if _group_info(group)[0] == 0:
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        torch.save(obj, tmp)
        os.replace(tmp, path)
    dist.barrier(group=group)
