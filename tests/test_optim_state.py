"""Checkpoints of Newton / Preconditioner (the settings round-trip; a refused load changes nothing; another
curvature's state is refused at load) and data-parallel ranks whose step settings drift apart."""

from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path

import pytest
import torch
from reference import train_step
from test_distributed import (
    IDENTITY,
    LOCAL_BATCH,
    START,
    STEPS,
    _closure_steps,
    _data,
    _error,
    _flat,
    _halves,
    _model,
    _newton,
)
from torch import nn

import hessinv.optim as ho
from hessinv.errors import InvalidArgumentError
from hessinv.optim import distributed as hd

F64 = torch.float64
SAVED = dict(
    beta2=0.999, diagonal_damping=50.0, refresh=3, curvature_batch_size=4, max_rank=5, basis_max_dim=5
)


def _small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    X, y = torch.randn(320, 6, generator=g, dtype=F64), torch.randint(0, 3, (320,), generator=g)
    return [(X[i : i + 16], y[i : i + 16]) for i in range(0, 320, 16)]


def _settings(opt: ho.Newton) -> dict:
    pc = opt.preconditioner
    return {
        "beta2": pc.beta2,
        "diagonal_damping": pc.damping,
        "refresh": pc.refresh,
        "curvature_batch_size": pc.curvature_batch_size,
        "max_rank": pc.max_rank,
        "basis_max_dim": pc.basis_max_dim,
    }


def _without_settings(sd: dict) -> dict:
    """``sd`` as a checkpoint saved before the settings were (no ``settings``, no Newton's batch size)."""
    old = copy.deepcopy(sd)
    old["newton"].pop("curvature_batch_size", None)
    old["newton"]["preconditioner"].pop("settings", None)
    return old


def _checkpointed_run(net: nn.Module, opt: ho.Newton) -> tuple[dict, dict]:
    """Run ``opt`` over the batches, keeping its checkpoint and the weights after the seventh step."""
    for X, y in _batches()[:7]:
        opt.step(X, y)
    sd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    for X, y in _batches()[7:]:
        opt.step(X, y)
    return sd, weights


# -- the settings that shape the state come back with it ---------------------------------------------
def test_load_restores_the_preconditioners_settings_and_resumes_bit_exact():
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    net = _small()
    opt = ho.Newton(net, loss_fn, seed=0, mode="precondition", **SAVED)
    sd, weights = _checkpointed_run(net, opt)

    net2 = _small()
    net2.load_state_dict(weights)
    opt2 = ho.Newton(net2, loss_fn, seed=0, mode="precondition")  # the defaults: other settings
    assert _settings(opt2) != SAVED
    opt2.load_state_dict(sd)
    assert _settings(opt2) == SAVED and opt2.curvature_batch_size == 4
    assert opt2.preconditioner.basis.blocks == opt.preconditioner.basis.blocks == [(0, 5, 6), (35, 3, 5)]
    assert opt2.preconditioner.basis.sides == [(True, False), (True, True)]  # the 5 x 6 on its 5 side
    for X, y in batches[7:]:
        opt2.step(X, y)
    assert torch.equal(_flat(net2), _flat(net))  # the uninterrupted run

    # a checkpoint from before the settings were saved still loads, into this optimizer's settings
    kept = {**SAVED, "beta2": 0.9}
    opt3 = ho.Newton(_small(), loss_fn, seed=0, mode="precondition", **kept)
    opt3.load_state_dict(_without_settings(sd))
    assert _settings(opt3) == kept


def test_a_checkpoint_taken_right_after_freezing_a_layer_loads_and_resumes_bit_exact():
    """Fine-tuning: a layer frozen, then a checkpoint before the next step. The state dict describes the
    parameters trainable at the last step (both layers); load_state_dict followed the freeze first, so
    not even this optimizer could load it ("state dict is for another model"). Saving changes nothing
    (a version that followed the freeze while saving lost an unfrozen-again layer's state, a review)."""
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    net = _small()
    opt = ho.Newton(net, loss_fn, seed=0, mode="precondition")
    for X, y in batches[:5]:
        opt.step(X, y)
    v = opt.preconditioner.state["v"].clone()
    net[0].requires_grad_(False)
    sd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    assert [tuple(s) for s in sd["newton"]["param_shapes"]] == [(5, 6), (5,), (3, 5), (3,)]
    assert torch.equal(opt.preconditioner.state["v"], v)  # (saving followed nothing)
    opt.load_state_dict(copy.deepcopy(sd))  # (the same optimizer: a round trip)
    for X, y in batches[5:]:
        opt.step(X, y)

    net2 = _small()  # resumed as at the checkpoint's last step, then frozen as the first run was
    net2.load_state_dict(weights)
    opt2 = ho.Newton(net2, loss_fn, seed=0, mode="precondition")
    opt2.load_state_dict(sd)
    net2[0].requires_grad_(False)
    for X, y in batches[5:]:
        opt2.step(X, y)
    assert torch.equal(_flat(net2), _flat(net))

    # resumed in the configuration after the freeze, as torch.optim resumes (a probe of checkpoints: this
    # was refused): a new optimizer takes the checkpoint's trainable set, and its next step follows the freeze
    net3 = _small()
    net3.load_state_dict(weights)
    net3[0].requires_grad_(False)
    opt3 = ho.Newton(net3, loss_fn, seed=0, mode="precondition")
    opt3.load_state_dict(sd)
    assert not net3[0].weight.requires_grad  # (the model's layers as they were)
    for X, y in batches[5:]:
        opt3.step(X, y)
    assert torch.equal(_flat(net3), _flat(net))

    # an optimizer that has stepped on another trainable set: refused, saying how to load it
    net4 = _small()
    net4[0].requires_grad_(False)
    opt4 = ho.Newton(net4, loss_fn, seed=0, mode="precondition")
    opt4.step(*batches[0])
    with pytest.raises(InvalidArgumentError, match="freeze or unfreeze layers as they were then"):
        opt4.load_state_dict(sd)


@pytest.mark.parametrize("mode", ["precondition", "trust-region"])
def test_a_checkpoint_taken_right_after_unfreezing_resumes_in_the_new_configuration(mode):
    """A fine-tuning schedule: a layer frozen for the first steps, unfrozen, a checkpoint, a restart with the
    layer unfrozen (as it was when saved) -- refused ("state dict is for another model") where Adam resumes.
    A refused load of such a checkpoint leaves the new optimizer as it was."""
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    net = _small()
    net[0].weight.requires_grad_(False)
    opt = ho.Newton(net, loss_fn, seed=0, mode=mode)
    for X, y in batches[:4]:
        opt.step(X, y)
    net[0].weight.requires_grad_(True)
    sd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    for X, y in batches[4:9]:
        opt.step(X, y)

    net2 = _small()
    net2.load_state_dict(weights)
    opt2 = ho.Newton(net2, loss_fn, seed=0, mode=mode)
    opt2.load_state_dict(sd)
    for X, y in batches[4:9]:
        opt2.step(X, y)
    assert torch.equal(_flat(net2), _flat(net))

    bad = copy.deepcopy(sd)
    bad["newton"]["max_relative_step"] = -1.0
    runs = []
    for load in (True, False):
        net3 = _small()
        opt3 = ho.Newton(net3, loss_fn, seed=0, mode=mode)
        if load:
            before = str(opt3.state_dict())
            with pytest.raises(InvalidArgumentError, match="max_relative_step"):
                opt3.load_state_dict(bad)
            assert opt3.chain.num_params == sum(p.numel() for p in net3.parameters())
            assert str(opt3.state_dict()) == before  # (its homes too: a fuzzer's find)
        for X, y in batches[:5]:
            opt3.step(X, y)
        runs.append(_flat(net3))
    assert torch.equal(*runs)


def test_a_checkpoint_of_the_two_sided_rule_resumes_bit_exact():
    """Checkpoints saved before weights were rotated on one side (both sides or none: the 5 x 6 weight
    unrotated at basis_max_dim=5) hold fewer factors than today's basis; they load into the rule they were
    saved with and resume exactly as the run that saved them went on."""
    from unittest import mock

    import hessinv.optim.precondition as hp

    def old_rule(a: int, b: int, max_dim: int = 256) -> tuple[bool, bool]:
        both = max(a, b) <= max_dim and 4 * a * b * (a + b) <= hp.ROTATION_MAX_FLOPS
        return both, both

    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    with mock.patch.object(hp, "rotated_sides", old_rule):
        net = _small()
        opt = ho.Newton(net, loss_fn, seed=0, mode="precondition", **SAVED)
        assert opt.preconditioner.basis.blocks == [(35, 3, 5)]
        sd, weights = _checkpointed_run(net, opt)
        sd["newton"]["preconditioner"]["basis"].pop("layout")  # (not recorded then)
    net2 = _small()
    net2.load_state_dict(weights)
    opt2 = ho.Newton(net2, loss_fn, seed=0, mode="precondition", **SAVED)
    assert len(opt2.preconditioner.basis.blocks) == 2  # today's rule: the 5 x 6 on one side
    opt2.load_state_dict(sd)
    assert opt2.preconditioner.basis.blocks == [(35, 3, 5)]
    for X, y in batches[7:]:
        opt2.step(X, y)
    assert torch.equal(_flat(net2), _flat(net))
    # saved again (now with its layout, the older rule's) it loads again, into that rule
    opt3 = ho.Newton(net2, loss_fn, seed=0, mode="precondition", **SAVED)
    opt3.load_state_dict(copy.deepcopy(opt2.state_dict()))
    assert opt3.preconditioner.basis.blocks == [(35, 3, 5)]
    bad = copy.deepcopy(opt2.state_dict())
    bad["newton"]["preconditioner"]["basis"]["layout"] = [1, 2]
    with pytest.raises(InvalidArgumentError, match="layout"):
        opt3.load_state_dict(bad)


# -- a refused load changes nothing ---------------------------------------------------------------------
def _other_checkpoint(corrupt: str) -> dict:
    other = ho.Newton(_small(), nn.CrossEntropyLoss(), seed=7, basis_max_dim=5)  # the 5x6 on one side
    for X, y in _batches()[:3]:
        other.step(X, y)
    sd = copy.deepcopy(other.state_dict())
    if corrupt == "old checkpoint of another basis_max_dim":
        return _without_settings(sd)
    sd["newton"]["preconditioner"]["settings"]["beta2"] = 1.5
    return sd


@pytest.mark.parametrize(
    "corrupt, message",
    [("old checkpoint of another basis_max_dim", "basis_max_dim"), ("beta2 out of range", "beta2")],
)
def test_a_refused_newton_load_changes_nothing(corrupt, message):
    sd, batches = _other_checkpoint(corrupt), _batches()

    def run(load: bool) -> torch.Tensor:
        net = _small()
        opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0)
        for X, y in batches[:3]:
            opt.step(X, y)
        if load:
            with pytest.raises(InvalidArgumentError, match=message):
                opt.load_state_dict(sd)
        for X, y in batches[3:15]:
            opt.step(X, y)
        return _flat(net)

    assert torch.equal(run(True), run(False))


def test_a_refused_preconditioner_load_changes_nothing():
    sd = _other_checkpoint("old checkpoint of another basis_max_dim")["newton"]["preconditioner"]
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()

    def run(load: bool) -> torch.Tensor:
        net = _small()
        pre = ho.Preconditioner(net, loss_fn, seed=0)
        directions = []
        for i, (X, y) in enumerate(batches[:12]):
            if load and i == 3:
                with pytest.raises(InvalidArgumentError, match="basis_max_dim"):
                    pre.load_state_dict(sd)
            net.zero_grad()
            loss_fn(net(X), y).backward()
            directions.append(pre.precondition_(X, y))
        return torch.stack(directions)

    assert torch.equal(run(True), run(False))


# -- another curvature's preconditioner state ---------------------------------------------------------
@pytest.mark.parametrize(
    "saved, here, old",
    # (an old Hessian preconditioner's state, without settings, holds nothing that tells its curvature)
    [
        ("gauss_newton", "hessian", False),
        ("gauss_newton", "hessian", True),
        ("hessian", "gauss_newton", False),
    ],
    ids=["gn-to-h", "old-gn-to-h", "h-to-gn"],
)
def test_another_curvatures_preconditioner_state_is_refused_at_load(saved, here, old):
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()

    def newton(model: nn.Module, curvature: str) -> ho.Newton:
        # (Gauss-Newton as the precondition mode's default: the trust region's curvature, which the state
        # dict also names, is then "hessian" in both)
        kw = {"basis": "identity"} if curvature == "gauss_newton" else {"curvature": curvature}
        return ho.Newton(model, loss_fn, seed=0, mode="precondition", **kw)

    src = newton(_small(), saved)
    for X, y in batches[:5]:
        src.step(X, y)
    sd = _without_settings(src.state_dict()) if old else src.state_dict()

    def run(load: bool) -> torch.Tensor:
        net = _small()
        opt = newton(net, here)
        if load:
            with pytest.raises(InvalidArgumentError, match=f"curvature='{saved}'"):
                opt.load_state_dict(sd)
        for X, y in batches[5:9]:
            opt.step(X, y)
        return _flat(net)

    assert torch.equal(run(True), run(False))


# -- data-parallel ranks whose lr / momentum / weight_decay differ after distribute() -------------------
def _rank_diff(model: nn.Module) -> float:
    p = _flat(model)
    ps = [torch.empty_like(p) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(ps, p)
    return max(float((q - p).abs().max()) for q in ps)


def _drift_worker(rank: int, world: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, y = _data(2)
    lf, Bg = nn.CrossEntropyLoss(), 2 * LOCAL_BATCH
    res: dict = {}

    def global_steps(dp: hd.DataParallel, scheduler) -> None:
        for t in range(STEPS):
            dp.step(X[t * Bg : (t + 1) * Bg], y[t * Bg : (t + 1) * Bg])
            if scheduler is not None:
                scheduler.step()

    # a scheduler on rank 1 only (DataParallel)
    model = _model()
    dp = hd.DataParallel(_newton(model, lf, **IDENTITY), model, lf)
    sched = torch.optim.lr_scheduler.StepLR(dp.opt, 1, 0.5) if rank == 1 else None
    res["lr"] = (_error(lambda: global_steps(dp, sched)), _rank_diff(model))
    # the momentum changed on rank 1 (the documented closure loop)
    model = _model()
    opt = hd.distribute(_newton(model, lf, **IDENTITY))
    ddp = DDP(model)

    def closure_loop() -> None:
        _closure_steps(opt, ddp, lf, X, y, _halves, 2)
        if rank == 1:
            opt.momentum = 0.5
        _closure_steps(opt, ddp, lf, X, y, _halves, 2)

    res["momentum"] = (_error(closure_loop), _rank_diff(model))
    # the second group's weight_decay changed on rank 1
    model = _model()
    ps = list(model.parameters())
    groups = [{"params": ps[:2]}, {"params": ps[2:]}]
    opt = hd.distribute(_newton(model, lf, params=groups, **IDENTITY))
    ddp = DDP(model)

    def decay_loop() -> None:
        _closure_steps(opt, ddp, lf, X, y, _halves, 1)
        if rank == 1:
            opt.param_groups[1]["weight_decay"] = 1e-3
        _closure_steps(opt, ddp, lf, X, y, _halves, 1)

    res["weight_decay"] = (_error(decay_loop), _rank_diff(model))
    # the same scheduler on every rank: no error, the single-process run
    model = _model()
    dp = hd.DataParallel(_newton(model, lf, **IDENTITY), model, lf)
    res["every rank"] = (
        _error(lambda: global_steps(dp, torch.optim.lr_scheduler.StepLR(dp.opt, 1, 0.5))),
        _rank_diff(model),
        _flat(model).clone(),
    )
    if rank == 0:
        torch.save(res, f"{out}/drift.pt")


@pytest.fixture(scope="module")
def drift_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("drift")
    hd.launch(_drift_worker, 2, (str(out),), timeout=30, join_timeout=120, start_method=START)
    return torch.load(Path(out) / "drift.pt", weights_only=False)


@pytest.mark.parametrize(
    "key, values",
    [
        ("lr", "rank 0 0.5, rank 1 0.25"),
        ("momentum", "rank 0 0.9, rank 1 0.5"),
        ("weight_decay of parameter group 1", "rank 0 0.0, rank 1 0.001"),
    ],
)
def test_step_settings_that_drift_apart_between_ranks_are_refused(drift_results, key, values):
    message, diff = drift_results[key.split()[0]]
    assert message is not None and f"the {key} differs between ranks ({values})" in message
    assert diff == 0.0  # refused before the replicas moved apart


def test_a_scheduler_stepped_on_every_rank_is_the_single_process_run(drift_results):
    message, diff, got = drift_results["every rank"]
    assert message is None and diff == 0.0
    X, y = _data(1)
    Bg = 2 * LOCAL_BATCH
    model = _model()
    opt = _newton(model, **IDENTITY)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    for t in range(STEPS):
        opt.step(X[t * Bg : (t + 1) * Bg], y[t * Bg : (t + 1) * Bg])
        sched.step()
    torch.testing.assert_close(got, _flat(model), rtol=1e-9, atol=1e-12)


def test_precondition_state_loads_whatever_the_unused_trust_region_curvature():
    """mode='precondition' never uses the trust region: a state saved with the default curvature loads
    into an optimizer built with curvature='gauss_newton' (it was refused) and resumes identically; a
    state whose mode may still use the trust region keeps being compared."""
    from torch import nn

    import hessinv.optim as ho
    from hessinv.errors import InvalidArgumentError

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    m = make()
    opt = ho.Newton(m, nn.CrossEntropyLoss(), mode="precondition", seed=0)
    for i in range(3):
        opt.step(X[16 * i : 16 * i + 16], y[16 * i : 16 * i + 16])
    sd = opt.state_dict()
    copies = []
    for kw in ({}, {"curvature": "gauss_newton"}):
        m2 = make()
        m2.load_state_dict(m.state_dict())
        o2 = ho.Newton(m2, nn.CrossEntropyLoss(), mode="precondition", seed=0, **kw)
        o2.load_state_dict(sd)
        o2.step(X[48:], y[48:])
        copies.append(torch.cat([p.detach().reshape(-1) for p in m2.parameters()]))
    assert torch.equal(copies[0], copies[1])
    m3 = make()
    o3 = ho.Newton(m3, nn.CrossEntropyLoss(), seed=0)  # auto: the trust region may still be used
    o3.step(X[:16], y[:16])
    o4 = ho.Newton(make(), nn.CrossEntropyLoss(), seed=0, curvature="gauss_newton")
    with pytest.raises(InvalidArgumentError, match="curvature"):
        o4.load_state_dict(o3.state_dict())


def _tr_net(width: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 3)
    )


def test_trust_region_checkpoints_are_checked_like_preconditioning_ones():
    """Found by a review of the optimizer's modes: a trust-region checkpoint of another model (same
    number of parameter tensors) loaded silently, radius and all; one loaded into mode='precondition'
    turned that optimizer into a trust region (its settings then ignored): each a named refusal that changes
    nothing. A checkpoint with another number of groups of the same parameters raised torch's plain
    ValueError; it loads, with a warning that the groups' settings are this optimizer's."""
    X, y = torch.randn(16, 5, dtype=F64), torch.randint(0, 3, (16,))
    a = ho.Newton(_tr_net(6).double(), nn.CrossEntropyLoss(), mode="trust-region")
    for _ in range(2):
        a.step(X, y)
    sd = a.state_dict()
    b = ho.Newton(_tr_net(4).double(), nn.CrossEntropyLoss(), mode="trust-region")
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(InvalidArgumentError, match="another model"):
        b.load_state_dict(sd)
    assert str(b.state_dict()) == str(before)
    c = ho.Newton(_tr_net(6).double(), nn.CrossEntropyLoss(), mode="precondition")
    with pytest.raises(InvalidArgumentError, match="mode='trust-region'"):
        c.load_state_dict(sd)
    assert c.mode == "precondition"
    net = _tr_net(6).double()
    d = ho.Newton(net, nn.CrossEntropyLoss(), mode="trust-region", params=[
        {"params": list(net.parameters())[:2]}, {"params": list(net.parameters())[2:]}])  # fmt: skip
    with pytest.warns(UserWarning, match="grouped otherwise"):  # (the same parameters: loaded, since 12-06)
        d.load_state_dict(sd)
    assert d.mode == "trust-region" and d.steps == a.steps
    e = ho.Newton(_tr_net(6).double(), nn.CrossEntropyLoss())  # auto: resumes the trust region
    e.load_state_dict(sd)
    assert e.mode == "trust-region"


def test_preconditioner_checkpoint_restores_its_weight_decay():
    """weight_decay shapes the stored D (+ wd) and the gradient (+ wd x), but was not among the saved
    settings: a preconditioner built with another value mixed the two after a load."""
    X, y = torch.randn(16, 5, dtype=F64), torch.randint(0, 3, (16,))
    net = _tr_net(6).double()
    p = ho.Preconditioner(net, nn.CrossEntropyLoss(), weight_decay=0.5, damping=7.0, seed=0)
    nn.CrossEntropyLoss()(net(X), y).backward()
    p.precondition_(X, y)
    q = ho.Preconditioner(net, nn.CrossEntropyLoss(), weight_decay=0.0, damping=99.0, seed=0)
    q.load_state_dict(p.state_dict())
    assert q.weight_decay == 0.5 and q.damping == 7.0
    torch.testing.assert_close(q.diagonal(), p.diagonal())


@pytest.mark.parametrize(
    "saved, here",
    [
        ({"damping": 0.1}, {"damping": 10.0}),
        ({"damping": ho.TrustRegion(eta=0.2, grow=3.0)}, {}),
        ({"damping": ho.LevenbergMarquardt(damping=0.5, eta=0.1)}, {"damping": "levenberg-marquardt"}),
        ({"curvature": "hessian", "damping": 0.1}, {"curvature": "hessian", "damping": 10.0}),
    ],
)
def test_a_checkpoint_restores_the_damping_rules_settings_and_resumes_bit_exact(saved, here):
    """A probe of checkpoints: a fixed damping (and a trust region's or Levenberg-Marquardt's settings) was
    not saved, so a run resumed into an optimizer built with another value followed that value silently
    (5.8 apart after 3 steps) -- while the preconditioner's damping, lr and momentum are the checkpoint's."""
    X, y = torch.randn(32, 5, dtype=F64), torch.randint(0, 3, (32,))
    net = _tr_net(6).double()
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, **saved)
    for _ in range(3):
        opt.step(X, y)
    sd = copy.deepcopy(opt.state_dict())
    weights = copy.deepcopy(net.state_dict())
    for _ in range(3):
        opt.step(X, y)
    net2 = _tr_net(6).double()
    net2.load_state_dict(weights)
    opt2 = ho.Newton(net2, nn.CrossEntropyLoss(), seed=0, **here)
    opt2.load_state_dict(sd)
    assert opt2.rule.settings() == opt.rule.settings()
    for _ in range(3):
        opt2.step(X, y)
    assert torch.equal(_flat(net2), _flat(net))
    key = "eta" if "eta" in sd["newton"]["rule_settings"] else "damping"
    for value, message in ((-1.0, "must be a finite number"), (float("nan"), "must be a finite number|NaN"),
                           ("x", "as numbers"), (torch.ones(2), "as numbers")):  # fmt: skip
        bad = copy.deepcopy(sd)  # a setting the rule's constructor refuses: refused, and nothing loaded
        bad["newton"]["rule_settings"][key] = value
        before = str(opt2.state_dict())
        with pytest.raises(InvalidArgumentError, match=message):
            opt2.load_state_dict(bad)
        assert str(opt2.state_dict()) == before
    if "max_iter" in sd["newton"]["rule_settings"]:  # (int(nan) raised a raw ValueError: a fuzzer's find)
        bad = copy.deepcopy(sd)
        bad["newton"]["rule_settings"]["max_iter"] = float("nan")
        with pytest.raises(InvalidArgumentError, match="cannot take"):
            opt2.load_state_dict(bad)


def test_a_rule_subclass_that_cannot_take_the_checkpoints_settings_is_refused_by_name():
    """A fuzzer's find: a TrustRegion subclass with other constructor arguments raised a raw TypeError."""

    class Mine(ho.TrustRegion):
        setting_names = (*ho.TrustRegion.setting_names, "extra")

        def __init__(self, extra: float = 1.0, radius: float = 1.0):
            super().__init__(radius=radius)
            self.extra = extra

    X, y = torch.randn(16, 5, dtype=F64), torch.randint(0, 3, (16,))
    opt = ho.Newton(_tr_net(6).double(), nn.CrossEntropyLoss(), damping=Mine(), mode="trust-region")
    opt.step(X, y)
    sd = copy.deepcopy(opt.state_dict())
    sd["newton"]["rule_settings"]["extra"] = 2.0
    other = ho.Newton(_tr_net(6).double(), nn.CrossEntropyLoss(), damping=Mine(), mode="trust-region")
    with pytest.raises(InvalidArgumentError, match="cannot take the checkpoint's settings"):
        other.load_state_dict(sd)


def test_a_checkpoint_whose_momentum_does_not_fit_the_model_is_refused():
    """Found by the same probe: a momentum vector one entry short loaded, and the next step raised torch's
    size mismatch."""
    net = _small()
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0)
    for X, y in _batches()[:3]:
        opt.step(X, y)
    sd = copy.deepcopy(opt.state_dict())
    sd["newton"]["momentum"] = sd["newton"]["momentum"][:-1]
    with pytest.raises(InvalidArgumentError, match="momentum"):
        ho.Newton(_small(), nn.CrossEntropyLoss(), seed=0).load_state_dict(sd)


# -- a step that fails changes nothing ------------------------------------------------------------
class _Injected(Exception):
    pass


def _fail_once(monkeypatch, owner, name: str, on_call: int) -> list[int]:
    """Make ``owner.name`` raise on its ``on_call``-th call (1-based), once; returns the call counter."""
    calls, real = [0], getattr(owner, name)

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == on_call:
            raise _Injected("injected failure")
        return real(*args, **kwargs)

    static = isinstance(inspect.getattr_static(owner, name), staticmethod)
    monkeypatch.setattr(owner, name, staticmethod(wrapped) if static else wrapped)
    return calls


@pytest.mark.parametrize(
    "owner, name, on_call",
    [
        # the second refresh's curvature root, its batch drawn (out of memory on a large one, say)
        (ho.Preconditioner, "_root", 2),
        # the basis refresh half done: the second weight's eigenvectors fail after the first's are new
        (ho.precondition.EigenBasis, "_next", 4),
        # a step between refreshes, in the solve
        (ho.Preconditioner, "solve", 5),
    ],
)
def test_a_failed_newton_step_changes_nothing_and_its_retry_is_the_uninterrupted_run(
    monkeypatch, owner, name, on_call
):
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    ref_net = _small()
    ref = ho.Newton(ref_net, loss_fn, seed=0, mode="precondition", **SAVED)
    for X, y in batches[:9]:
        ref.step(X, y)

    net = _small()
    opt = ho.Newton(net, loss_fn, seed=0, mode="precondition", **SAVED)
    _fail_once(monkeypatch, owner, name, on_call)
    failures = 0
    for X, y in batches[:9]:
        before = (copy.deepcopy(opt.state_dict()), _flat(net).clone())
        try:
            opt.step(X, y)
        except _Injected:
            failures += 1
            after = opt.state_dict()
            assert torch.equal(_flat(net), before[1])
            _assert_same(after, before[0])
            opt.step(X, y)  # the retry
    assert failures == 1
    assert torch.equal(_flat(net), _flat(ref_net))
    _assert_same(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("api", ["newton", "preconditioner"])
def test_a_refused_first_step_of_a_summed_loss_leaves_no_reference_count(monkeypatch, api):
    """A summed loss's state is kept in units of the first batch's count (Preconditioner.reference_scale):
    a first step that fails (out of memory in its refresh) on a batch of 48 and a run that goes on with
    batches of 16 is the run that started with them, bit for bit, weight decay on (before: the count 48
    stayed, and the penalty's weight with it)."""
    batches, loss_fn = _batches(), nn.CrossEntropyLoss(reduction="sum")
    big = (torch.cat([b[0] for b in batches[10:13]]), torch.cat([b[1] for b in batches[10:13]]))

    def run(fail: bool) -> torch.Tensor:
        net, pc = _small(), None
        if api == "newton":
            opt = ho.Newton(net, loss_fn, seed=0, mode="precondition", weight_decay=0.5, **SAVED)
        else:
            settings = dict(damping=50.0, refresh=3, curvature_batch_size=4, max_rank=5)
            pc = ho.Preconditioner(net, loss_fn, seed=0, weight_decay=0.5, **settings)
            opt = torch.optim.SGD(net.parameters(), lr=0.1)
        step = functools.partial(train_step, opt, pc, net, loss_fn)

        if fail:
            with monkeypatch.context() as m:
                _fail_once(m, ho.Preconditioner, "_root", 1)
                with pytest.raises(_Injected):
                    step(*big)
        for X, y in batches[:6]:
            step(X, y)
        return _flat(net)

    assert torch.equal(run(fail=True), run(fail=False))


def test_a_summed_loss_checkpoint_from_before_the_reference_count_resumes_in_its_own_units():
    """A checkpoint saved before the first batch's count was kept (no state["examples"]): its second
    moments are in its batches' own units, so the resumed run keeps scale 1 -- bit-identical to the
    uninterrupted run on batches like its own, and a short batch does not become the reference (before the
    mend: N = 16 for the rest of the run, 1e-2 off)."""
    batches, loss_fn = _batches(), nn.CrossEntropyLoss(reduction="sum")
    settings = dict(damping=50.0, refresh=3, curvature_batch_size=4, max_rank=5, weight_decay=0.5)

    def calls(pc, net, part):
        for X, y in part:
            net.zero_grad()
            loss_fn(net(X), y).backward()
            pc.precondition_(X, y)
            with torch.no_grad():
                torch._foreach_add_(list(net.parameters()), [-0.1 * p.grad for p in net.parameters()])

    net = _small()
    pc = ho.Preconditioner(net, loss_fn, seed=0, **settings)
    calls(pc, net, batches[:4])
    sd = copy.deepcopy(pc.state_dict())
    assert sd.pop("examples") == 16
    saved = copy.deepcopy(net.state_dict())
    calls(pc, net, batches[4:8])
    net2 = _small()
    net2.load_state_dict(saved)
    pc2 = ho.Preconditioner(net2, loss_fn, seed=0, **settings)
    pc2.load_state_dict(sd)
    calls(pc2, net2, batches[4:8])
    assert torch.equal(_flat(net2), _flat(net))
    short = (batches[8][0][:5], batches[8][1][:5])
    calls(pc2, net2, [short])
    assert pc2.state["examples"] is None and pc2.state_dict()["examples"] is None


def test_the_hessian_curvature_of_a_summed_loss_is_not_rescaled_to_an_earlier_batch():
    """curvature='hessian' damps by an absolute lambda, so its direction is the batch's own -(w H_k +
    lambda I)^{-1} g: with the curvature refreshed on every call and drawn from the whole batch, the
    direction on a batch of 16 is the same after a first batch of 48 as on a fresh preconditioner (a
    review: rescaled to the first batch's count, the steps after an auto hand-back were 12x longer)."""
    batches, loss_fn = _batches(), nn.CrossEntropyLoss(reduction="sum")
    big = (torch.cat([b[0] for b in batches[:3]]), torch.cat([b[1] for b in batches[:3]]))
    X, y = batches[5]
    settings = dict(curvature="hessian", damping=2.0, refresh=1, curvature_batch_size=64)

    def direction(pc, net, X, y):
        net.zero_grad()
        loss_fn(net(X), y).backward()
        return pc.precondition_(X, y)

    net = _small()
    pc = ho.Preconditioner(net, loss_fn, seed=0, **settings)
    direction(pc, net, *big)
    after_big = direction(pc, net, X, y)
    fresh = direction(ho.Preconditioner(net, loss_fn, seed=0, **settings), net, X, y)
    torch.testing.assert_close(after_big, fresh, rtol=1e-12, atol=0)


def test_a_failed_precondition_call_changes_nothing(monkeypatch):
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()

    def run(fail: bool) -> tuple[nn.Module, ho.Preconditioner]:
        net = _small()
        settings = dict(damping=50.0, refresh=3, curvature_batch_size=4, max_rank=5)
        pc = ho.Preconditioner(net, loss_fn, seed=0, **settings)
        sgd = torch.optim.SGD(net.parameters(), lr=0.1)
        for i, (X, y) in enumerate(batches[:8]):
            for attempt in range(2):
                sgd.zero_grad()
                loss_fn(net(X), y).backward()
                if fail and i == 3 and attempt == 0:
                    before = copy.deepcopy(pc.state_dict())
                    with monkeypatch.context() as mp:
                        _fail_once(mp, ho.Preconditioner, "curvature_root", 1)
                        with pytest.raises(_Injected):
                            pc.precondition_(X, y)
                    _assert_same(pc.state_dict(), before)
                    continue
                pc.precondition_(X, y)
                sgd.step()
                break
        return net, pc

    (net_a, pc_a), (net_b, pc_b) = run(False), run(True)
    assert torch.equal(_flat(net_a), _flat(net_b))
    _assert_same(pc_a.state_dict(), pc_b.state_dict())


def _assert_same(a, b) -> None:
    """Checkpoints equal: tensors bitwise, everything else by ``==``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b or (a != a and b != b)


@pytest.mark.parametrize("kind", ["rank update", "basis refresh"])
@pytest.mark.parametrize("where", ["solve after it", "inside its refactorization"])
def test_a_step_failing_around_a_rank_update_of_the_damping_changes_nothing(monkeypatch, where, kind):
    """After warm-up, between refreshes, a gradient spike moves a few entries of D: the stored factor takes
    a rank-|J| update (WoodburyFactor.update_damping); or the step refreshes the eigenbasis alone, which
    replaces the basis, the second moments, the momentum and the stored factor (its root carried into the
    new basis). A failure after it (in the solve) or inside its refactorization leaves all as it was, and
    the retry is the uninterrupted run."""
    from hessinv.lowrank import WoodburyFactor

    batches = _batches() + _batches()[:6]
    if kind == "rank update":
        batches[22] = (batches[22][0] * 30, batches[22][1])  # the spike (step 23: not a refresh, refresh=3)
    updates = []
    real_update = WoodburyFactor.update_damping
    monkeypatch.setattr(
        WoodburyFactor, "update_damping", lambda f, *a: updates.append(1) or real_update(f, *a)
    )
    # (basis_refresh=None: step 23 would refresh the eigenbasis, which rebuilds K with the step's D)
    basis_refresh = None if kind == "rank update" else 2

    def run(fail: bool) -> tuple[nn.Module, ho.Newton]:
        net = _small()
        opt = ho.Newton(
            net, nn.CrossEntropyLoss(), seed=0, mode="precondition", **SAVED, basis_refresh=basis_refresh
        )
        for i, (X, y) in enumerate(batches):
            if fail and i == 22:
                before = (copy.deepcopy(opt.state_dict()), _flat(net).clone())
                with monkeypatch.context() as mp:
                    if where == "solve after it":
                        _fail_once(mp, ho.Preconditioner, "solve", 1)
                    else:
                        _fail_once(mp, WoodburyFactor, "_factor_K", 1)
                    with pytest.raises(_Injected):
                        opt.step(X, y)
                _assert_same(opt.state_dict(), before[0])
                assert torch.equal(_flat(net), before[1])
            opt.step(X, y)
        return net, opt

    ref_net, ref = run(False)
    if kind == "rank update":
        assert updates  # (the spike took the rank update, not a rebuild)
    else:
        assert ref.preconditioner.state["basis_refreshes"] > 0
    net, opt = run(True)
    assert torch.equal(_flat(net), _flat(ref_net))
    _assert_same(opt.state_dict(), ref.state_dict())


# -- a layer frozen or unfrozen mid-training ------------------------------------------------------------
def _offsets_of(chain) -> dict[int, slice]:
    out, o = {}, 0
    for t in chain.params:
        out[id(t)] = slice(o, o + t.numel())
        o += t.numel()
    return out


def test_newton_follows_a_layer_unfrozen_mid_training_keeping_the_kept_parameters_state():
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    net = _small()
    for p in net[0].parameters():
        p.requires_grad_(False)
    opt = ho.Newton(net, loss_fn, seed=0, mode="precondition", **SAVED)
    for X, y in batches[:5]:
        opt.step(X, y)
    pc, ns = opt.preconditioner, opt._newton
    head = [net[2].weight, net[2].bias]
    old = _offsets_of(pc.chain)
    before = {
        "v": [pc.state["v"][old[id(t)]].clone() for t in head],
        "m": [ns["momentum"][old[id(t)]].clone() for t in head],
        "L": pc.basis.L[0].clone(),
        "t": pc.state["t"],
    }
    first = net[0].weight.detach().clone()
    for p in net[0].parameters():
        p.requires_grad_(True)
    opt._follow_trainable()
    new = _offsets_of(pc.chain)
    assert pc.chain.num_params == sum(p.numel() for p in net.parameters())
    assert all(torch.equal(pc.state["v"][new[id(t)]], v) for t, v in zip(head, before["v"], strict=True))
    assert all(torch.equal(ns["momentum"][new[id(t)]], m) for t, m in zip(head, before["m"], strict=True))
    assert not bool(pc.state["v"][new[id(net[0].weight)]].any())  # new to it: zero state
    assert pc.state["t"] == before["t"] and pc._factor is None  # the curvature is rebuilt next
    assert pc.basis.blocks == [(0, 5, 6), (35, 3, 5)] and torch.equal(pc.basis.L[1], before["L"])
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in pc.chain.params]
    start = float(loss_fn(net(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches])))
    for X, y in batches[5:]:
        opt.step(X, y)
    assert not torch.equal(net[0].weight, first)  # it trains now
    end = float(loss_fn(net(torch.cat([b[0] for b in batches])), torch.cat([b[1] for b in batches])))
    assert end < start

    # a checkpoint taken now resumes bitwise in a new optimizer built on the model as it is
    sd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    for X, y in batches[:4]:
        opt.step(X, y)
    net2 = _small()
    net2.load_state_dict(weights)
    opt2 = ho.Newton(net2, loss_fn, seed=0, mode="precondition", **SAVED)
    opt2.load_state_dict(sd)
    for X, y in batches[:4]:
        opt2.step(X, y)
    assert torch.equal(_flat(net2), _flat(net))


@pytest.mark.parametrize("mode", ["precondition", "trust-region"])
def test_a_layer_frozen_mid_training_stops_moving(mode):
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    net = _small()
    settings = SAVED if mode == "precondition" else {}
    opt = ho.Newton(net, loss_fn, seed=0, mode=mode, **settings)
    for X, y in batches[:4]:
        opt.step(X, y)
    net[0].weight.requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    bias = net[0].bias.detach().clone()
    for X, y in batches[4:10]:
        opt.step(X, y)
    assert torch.equal(net[0].weight, frozen) and not torch.equal(net[0].bias, bias)
    assert opt.chain.num_params == sum(p.numel() for p in net.parameters() if p.requires_grad)


def test_a_parameter_unfrozen_that_no_group_holds_is_refused_and_changes_nothing():
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    net = _small()
    net[0].weight.requires_grad_(False)
    groups = [{"params": [net[0].bias], "lr": 0.5}, {"params": list(net[2].parameters())}]
    opt = ho.Newton(net, loss_fn, params=groups, seed=0, mode="precondition", **SAVED)
    for X, y in batches[:3]:
        opt.step(X, y)
    sd = copy.deepcopy(opt.state_dict())
    net[0].weight.requires_grad_(True)
    with pytest.raises(InvalidArgumentError, match="none of Newton's 2 parameter groups"):
        opt.step(*batches[3])
    _assert_same(opt.state_dict(), sd)
    net[0].weight.requires_grad_(False)  # put back: it steps on
    opt.step(*batches[3])


def test_a_preconditioner_checkpoint_taken_right_after_unfreezing_resumes_in_the_new_configuration():
    """As Newton's (a probe of checkpoints): saved right after a layer was unfrozen, resumed into a new
    Preconditioner of the model as it was saved (the layer trainable) -- refused before."""
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()

    def calls(net: nn.Module, pc: ho.Preconditioner, chunk: list) -> None:
        for X, y in chunk:
            net.zero_grad()
            loss_fn(net(X), y).backward()
            pc.precondition_(X, y)
            with torch.no_grad():
                for p in net.parameters():
                    if p.grad is not None:
                        p -= p.grad

    net = _small()
    net[0].weight.requires_grad_(False)
    pc = ho.Preconditioner(net, loss_fn, seed=0, damping=50.0, refresh=3, curvature_batch_size=4)
    calls(net, pc, batches[:4])
    net[0].weight.requires_grad_(True)
    sd, weights = copy.deepcopy(pc.state_dict()), copy.deepcopy(net.state_dict())
    calls(net, pc, batches[4:9])
    net2 = _small()
    net2.load_state_dict(weights)
    pc2 = ho.Preconditioner(net2, loss_fn, seed=0)
    pc2.load_state_dict(sd)
    calls(net2, pc2, batches[4:9])
    assert torch.equal(_flat(net2), _flat(net))


def test_precondition_follows_a_layer_unfrozen_between_calls():
    batches, loss_fn = _batches(), nn.CrossEntropyLoss()
    net = _small()
    for p in net[0].parameters():
        p.requires_grad_(False)
    pc = ho.Preconditioner(net, loss_fn, seed=0, damping=50.0, refresh=3, curvature_batch_size=4, max_rank=5)
    sgd = torch.optim.SGD(net.parameters(), lr=0.1)
    for i, (X, y) in enumerate(batches[:8]):
        if i == 4:
            for p in net[0].parameters():
                p.requires_grad_(True)
        sgd.zero_grad()
        loss_fn(net(X), y).backward()
        d = pc.precondition_(X, y)
        assert d.numel() == sum(p.numel() for p in net.parameters() if p.requires_grad)
        sgd.step()
    assert net[0].weight.grad is not None and pc.chain.num_params == 53


def test_a_checkpoint_loads_into_an_optimizer_built_before_a_layer_was_frozen():
    """The optimizer follows the model's trainable set before it loads: a checkpoint of the model as it is
    now (another optimizer's) resumes bitwise, where it loaded through the stale set (shapes alike:
    vectors on the wrong layer, silently)."""
    loss_fn, batches = nn.CrossEntropyLoss(), _batches()

    def three():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).double()

    def freeze(net, i):
        for p in net[i].parameters():
            p.requires_grad_(False)

    src = three()
    freeze(src, 4)
    ref = ho.Newton(src, loss_fn, seed=0, mode="precondition", **SAVED)
    for X, y in batches[:6]:
        ref.step(X, y)
    sd, weights = copy.deepcopy(ref.state_dict()), copy.deepcopy(src.state_dict())
    net = three()
    freeze(net, 0)
    opt = ho.Newton(net, loss_fn, seed=0, mode="precondition", **SAVED)  # built on layers 2 and 4
    net.load_state_dict(weights)
    for p in net[0].parameters():
        p.requires_grad_(True)
    freeze(net, 4)  # now layers 0 and 2, as the checkpoint's
    opt.load_state_dict(sd)
    for X, y in batches[6:10]:
        ref.step(X, y)
        opt.step(X, y)
    assert torch.equal(_flat(net), _flat(src))


def test_with_several_groups_a_layer_frozen_then_unfrozen_comes_back_to_its_group():
    loss_fn, batches = nn.CrossEntropyLoss(), _batches()
    net = _small()
    opt = ho.Newton(
        net, loss_fn, params=[{"params": net[0].parameters(), "lr": 0.0}, {"params": net[2].parameters()}],
        seed=0, mode="precondition", **SAVED,
    )  # fmt: skip
    opt.step(*batches[0])
    net[0].weight.requires_grad_(False)
    opt.step(*batches[1])
    assert net[0].weight.grad is None  # (left the optimizer: its grad cleared, as zero_grad would)
    assert all(p is not net[0].weight for g in opt.param_groups for p in g["params"])
    net[0].weight.requires_grad_(True)
    w = net[0].weight.detach().clone()
    for X, y in batches[2:5]:
        opt.step(X, y)
    assert any(p is net[0].weight for p in opt.param_groups[0]["params"])
    assert torch.equal(net[0].weight, w)  # its group's lr 0 again


def test_newton_recovers_when_its_preconditioner_followed_alone():
    """The preconditioner followed (its public call, or a step interrupted after it): Newton's next step
    follows too, its momentum moved by itself."""
    loss_fn, batches = nn.CrossEntropyLoss(), _batches()
    nets = [_small(), _small()]
    opts = [ho.Newton(n, loss_fn, seed=0, mode="precondition", **SAVED) for n in nets]
    for X, y in batches[:4]:
        for o in opts:
            o.step(X, y)
    for n in nets:
        n[0].bias.requires_grad_(False)
    assert opts[1].preconditioner.follow_trainable()
    for X, y in batches[4:8]:
        for o in opts:
            o.step(X, y)
    assert torch.equal(_flat(nets[0]), _flat(nets[1]))


def test_following_draws_nothing_from_torchs_generator_and_moves_a_weight_decay_vector():
    loss_fn, batches = nn.CrossEntropyLoss(), _batches()
    draws = []
    for freeze in (False, True):
        net = _small()
        opt = ho.Newton(net, loss_fn, seed=0, mode="precondition", **SAVED)
        torch.manual_seed(123)
        opt.step(*batches[0])
        if freeze:
            net[0].bias.requires_grad_(False)
        opt.step(*batches[1])
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], draws[1])
    net = _small()
    pc = ho.Preconditioner(net, loss_fn, seed=0, damping=50.0, refresh=3, curvature_batch_size=4, max_rank=5)
    pc.weight_decay = torch.arange(pc.chain.num_params, dtype=torch.float64)
    net[0].bias.requires_grad_(False)
    assert pc.follow_trainable()
    kept = torch.cat([torch.arange(0, 30), torch.arange(35, 53)]).double()
    assert torch.equal(pc.weight_decay, kept)


def test_a_frozen_parameters_group_survives_a_checkpoint():
    loss_fn, batches = nn.CrossEntropyLoss(), _batches()

    def build(net):
        groups = [{"params": [p for p in net[0].parameters() if p.requires_grad], "lr": 0.0}]
        groups.append({"params": [p for p in net[2].parameters() if p.requires_grad]})
        return ho.Newton(net, loss_fn, params=groups, seed=0, mode="precondition", **SAVED)

    net = _small()
    opt = build(net)
    opt.step(*batches[0])
    net[0].weight.requires_grad_(False)
    opt.step(*batches[1])
    sd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    net2 = _small()
    net2.load_state_dict(weights)
    net2[0].weight.requires_grad_(False)
    opt2 = build(net2)  # (groups without the frozen weight)
    opt2.load_state_dict(sd)
    for n, o in ((net, opt), (net2, opt2)):
        n[0].weight.requires_grad_(True)
        o.step(*batches[2])
    assert any(p is net2[0].weight for p in opt2.param_groups[0]["params"])
    assert torch.equal(_flat(net2), _flat(net))


def test_a_checkpoint_across_a_swap_of_frozen_layers_stays_on_its_layers():
    """Saved at the last step's set (layers 0 and 4, layer 2 frozen), then layer 0 frozen and layer 2 --
    of the same shapes -- unfrozen: the shapes cannot tell the sets apart, and the load followed the new
    set first, putting layer 0's second moments and momentum on layer 2 (a second review). The checkpoint
    records its parameters' places in the model: it loads onto layers 0 and 4, and the next step follows
    the swap (layer 2 from zero state), as with the swap made after the load."""
    torch.manual_seed(1)

    def build():
        torch.manual_seed(1)
        m = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).to(F64)
        m[2].requires_grad_(False)
        return m

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 4, generator=g, dtype=F64), torch.randint(0, 3, (64,), generator=g)
    runs = []
    for swap_first in (True, False):
        m = build()
        opt = ho.Newton(m, nn.CrossEntropyLoss(), seed=0, mode="precondition")
        for _ in range(3):
            opt.step(X, y)
        sd = copy.deepcopy(opt.state_dict())
        v0 = sd["newton"]["preconditioner"]["v"][:20].clone()
        if swap_first:
            m[0].requires_grad_(False)
            m[2].requires_grad_(True)
        opt.load_state_dict(sd)
        assert torch.equal(opt.preconditioner.state["v"][:20], v0)
        assert [id(p) for p in opt.preconditioner.params[:2]] == [id(m[0].weight), id(m[0].bias)]
        if not swap_first:
            m[0].requires_grad_(False)
            m[2].requires_grad_(True)
        opt.step(X[:32], y[:32])
        runs.append(_flat(m).clone())
    assert torch.equal(runs[0], runs[1])


def test_a_refresh_that_runs_out_of_memory_is_a_too_large_error_that_changes_nothing(monkeypatch):
    """A probe of sizes: the default step on a width-512 transformer block died in the allocator with a raw
    RuntimeError after 5 GB (past the curvature root's own estimate); it is a TooLargeError naming
    curvature_batch_size and max_rank, and the refused step changes nothing."""
    from hessinv.errors import TooLargeError

    batches, net = _batches(), _small()
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=0, mode="precondition", refresh=2)
    opt.step(*batches[0])

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(ho.Preconditioner, "_refresh_curvature", no_memory)
    opt.step(*batches[1])  # (not a refresh: refresh=2)
    before, weights = copy.deepcopy(opt.state_dict()), _flat(net).clone()
    with pytest.raises(TooLargeError, match="curvature_batch_size.*max_rank"):
        opt.step(*batches[2])
    _assert_same(opt.state_dict(), before)
    assert torch.equal(_flat(net), weights)


def test_a_resumed_run_with_weights_solved_in_a_group_is_bit_identical():
    """Nine 32 x 32 weights solved through their factors in one group: a checkpoint copied each weight's
    row-to-example map apart, the loaded factor split the group in nine and summed in another order, and
    the resumed float32 run left the uninterrupted one by 6e-5 within 11 steps (a review). Equal maps are
    one tensor again in the factor."""
    import io

    def make(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        hidden = [m for _ in range(9) for m in (nn.Linear(32, 32), nn.Tanh())]
        return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), *hidden, nn.Linear(32, 4))

    torch.manual_seed(123)
    X, y = torch.randn(448, 8), torch.randint(0, 4, (448,))
    net = make(0)
    opt = ho.Newton(net, nn.CrossEntropyLoss(), seed=5, refresh=5)
    for i in range(0, 96, 32):
        opt.step(X[i : i + 32], y[i : i + 32])
    buf = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    net2 = make(9)
    net2.load_state_dict(ck["model"])
    opt2 = ho.Newton(net2, nn.CrossEntropyLoss(), seed=0, refresh=5)
    opt2.load_state_dict(ck["opt"])
    groups = [g[0] for g in opt2.preconditioner._factor._solve_groups]
    assert groups == [g[0] for g in opt.preconditioner._factor._solve_groups] and len(groups[0]) == 9
    for i in range(96, 448, 32):
        opt.step(X[i : i + 32], y[i : i + 32])
        opt2.step(X[i : i + 32], y[i : i + 32])
    for p, q in zip(net.parameters(), net2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_torch_state_dict_hooks_see_newtons_whole_state():
    """A lifecycle probe: torch.optim's state-dict post hooks got the dict before Newton added its
    "newton" entry, load pre hooks got it with "newton" already removed (a hook reading it: KeyError), and
    load post hooks ran before Newton's state was restored (they saw 0 steps)."""
    X, y = _batches()[0]
    opt = ho.Newton(_small(), nn.CrossEntropyLoss(), seed=0)
    for _ in range(3):
        opt.step(X, y)
    seen: dict = {}
    opt.register_state_dict_post_hook(lambda o, sd: seen.update(post="newton" in sd))
    sd = opt.state_dict()
    assert seen["post"] and "newton" in sd
    other = ho.Newton(_small(), nn.CrossEntropyLoss(), seed=0)

    def pre(o, d):  # (a pre hook may return a rewritten dict, as torch.optim's)
        seen["pre"] = d["newton"]["step"]
        d = dict(d)
        d["newton"] = {**d["newton"], "step": 7}
        return d

    other.register_load_state_dict_pre_hook(pre)
    other.register_load_state_dict_post_hook(lambda o: seen.update(after=o.steps))
    other.load_state_dict(sd)
    assert seen["pre"] == 3 and seen["after"] == 7 and other.steps == 7
    assert sd["newton"]["step"] == 3  # the caller's dict is not rewritten


@pytest.mark.parametrize("frozen_at_load", [False, True])
def test_a_layer_unfrozen_after_resuming_joins_the_group_this_optimizer_gave_it(frozen_at_load):
    """Gradual unfreezing across a checkpoint: a layer frozen when the checkpoint was written, in group 0
    (lr 0.5) of the optimizer that loads it. The load replaced this optimizer's record of that group by the
    checkpoint's (none), and the step after unfreezing refused the layer with advice that, followed, met
    the same refusal (a probe). It now joins group 0 and moves at that group's lr."""
    torch.manual_seed(0)
    X, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    lf = nn.CrossEntropyLoss()
    m[0].requires_grad_(False)
    opt = ho.Newton(m, lf, params=[{"params": m[2].parameters(), "lr": 0.5}, {"params": m[4].parameters()}])
    for _ in range(3):
        opt.step(X, y)
    sd = opt.state_dict()
    m[0].requires_grad_(not frozen_at_load)
    first = list(m[0].parameters())
    groups = [{"params": first + list(m[2].parameters()), "lr": 0.5}, {"params": m[4].parameters()}]
    opt2 = ho.Newton(m, lf, params=groups)
    opt2.load_state_dict(sd)
    m[0].requires_grad_(True)
    before = m[0].weight.detach().clone()
    opt2.step(X, y)
    assert not torch.equal(m[0].weight.detach(), before)
    (home,) = [g for g in opt2.param_groups if any(p is m[0].weight for p in g["params"])]
    assert home["lr"] == 0.5
