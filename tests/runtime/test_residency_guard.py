"""The residency guard (NOTE [Residency guard]): under migrate access an op that reads a
slow-tier tensor fails on this CPU as it would on a GPU, naming the op, the tensor and the
layer; views and the runtime's own copies between tiers pass. Run over steady, asynchronous
steps on the racing tiers (the host running ahead of its copies, as on a GPU), on every
reference workload at "min" with every layer recomputed: a recomputed layer's rerun must find
its parameters in the fast tier (issue 22 item 2)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

import sentinel_hm as sh
import sentinel_hm.runtime.manager as manager
from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Tier
from sentinel_hm.runtime.mover import Mover
from sentinel_hm.runtime.recompute import CheckpointedLayers
from sentinel_hm.runtime.residency_guard import ResidencyError, ResidencyGuard
from sentinel_hm.tiers.host import HostTiers

from .racing_tiers import RacingTiers

with contextlib.suppress(ImportError):  # the shared fixture, until conftest.py holds it
    from .test_recompute import every_layer_recomputed  # noqa: F401
from .test_sentinel import CONFIGS

# -- the guard itself ---------------------------------------------------------------------------


def _slow(tiers: HostTiers, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """A copy of ``like`` in the slow tier: a view of the arena, as the runtime makes them."""
    nbytes = like.numel() * like.element_size()
    t = tiers.slot(offset, nbytes).view(like.dtype).view(like.shape)
    t.copy_(like)
    return t


def _tiers(access: Access = Access.MIGRATE) -> HostTiers:
    tiers = HostTiers(access)
    tiers.reserve(1 << 16)
    return tiers


class _Lookup(nn.Module):
    """Uses a tensor that is not a parameter (as a saved activation or state would be)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.table


def test_a_matmul_on_a_slow_tensor_fails_naming_the_op_the_tensor_and_the_layer():
    tiers = _tiers()
    model = nn.Sequential(nn.Linear(8, 6), _Lookup(_slow(tiers, torch.randn(6, 5))))
    with pytest.raises(ResidencyError) as caught, ResidencyGuard(tiers, model):
        model(torch.randn(3, 8))
    message = str(caught.value)
    assert "aten.mm.default read a tensor in the slow tier (shape (6, 5), torch.float32" in message
    assert "in layer '1' (_Lookup), during forward" in message
    assert isinstance(caught.value, sh.SentinelError)


def test_a_slow_parameter_is_named_in_forward_and_backward():
    tiers = _tiers()
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    model[2].weight.data = _slow(tiers, model[2].weight.detach())
    guard = ResidencyGuard(tiers, model, collect=True)
    with guard:
        out = model(torch.randn(3, 8))  # the op runs: collecting lets the step go on
        out.sum().backward()
    found = [str(v) for v in guard.violations]
    assert found == [
        "aten.addmm.default read parameter '2.weight' in the slow tier (shape (6, 4), "
        "torch.float32, tensor input 2) in layer '2' (Linear), during forward",
        "aten.mm.default read parameter '2.weight' in the slow tier (shape (4, 6), "
        "torch.float32, tensor input 1) in layer '2' (Linear), the parameter's owner, during "
        "backward (AddmmBackward0)",
    ]
    with pytest.raises(ResidencyError, match=r"2 op input\(s\) read the slow tier"):
        guard.check()
    guard.check()  # forgotten once raised


def test_a_checkpoint_rerun_that_reads_the_slow_tier_is_named_as_one():
    """The rerun calls the bound forward, without the module's hooks: its frames still name
    the layer, and the guard says the op ran in a rerun."""
    tiers = _tiers()
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    x = torch.randn(4, 8, requires_grad=True)
    guard = ResidencyGuard(tiers, model, collect=True)
    with guard:
        y = torch.utils.checkpoint.checkpoint(model[1], model[0](x), use_reentrant=False)
        model[1].weight.data = _slow(tiers, model[1].weight.detach())  # moved after forward
        y.sum().backward()
    first = guard.violations[0]
    assert first.op == "aten.native_layer_norm.default" and first.parameter == "1.weight"
    assert first.layer == "layer '1' (LayerNorm)"
    assert first.context == "a checkpoint rerun in backward (NativeLayerNormBackward0)"


def test_views_and_copies_between_tiers_pass():
    tiers = _tiers()
    fast = torch.randn(4, 8)
    slow = _slow(tiers, fast)
    with ResidencyGuard(tiers) as guard:
        # views and metadata: no bytes read
        slow.t(), slow[1:], slow.view(-1), slow.reshape(8, 4), slow.detach(), slow.expand(2, 4, 8)
        slow.unsqueeze(0).as_strided((2, 2), (1, 1)), slow.view(torch.uint8), slow.size()
        # empty views of the arena read nothing
        empty = tiers.slot(0, 0).view(torch.float32)
        assert (empty + torch.empty(0)).numel() == 0
        # the tier copies: copy_ either way, .to(device), set_ over the arena's storage
        back = torch.empty_like(fast)
        back.copy_(slow)
        slow.copy_(fast * 2)
        assert torch.equal(slow.to(device="cpu", copy=True), fast * 2)
        torch.empty(0).set_(slow.untyped_storage(), 0, (4, 8), (8, 1))
        tiers.copy(back.view(torch.uint8).view(-1), tiers.slot(0, 128))  # a memmove
    assert guard.violations == [] and guard.ops_checked > 0
    assert torch.equal(back, fast * 2)


class _CopyTiers(HostTiers):
    """Host tiers whose copies are ``copy_`` ops, as CUDA tiers' are (host tiers memmove,
    which dispatches nothing)."""

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)


@pytest.mark.parametrize("tiers_type", [HostTiers, RacingTiers, _CopyTiers])
def test_the_compute_threads_own_fetches_pass(tiers_type):
    """``Mover.fetch_now`` and ``compute_copy`` are copies made on the compute thread, under
    the guard; the mover threads' copies are not seen (a dispatch mode is thread-local)."""
    tiers = tiers_type()
    tiers.reserve(1 << 12)
    mover = Mover(tiers)
    try:
        src = torch.randn(64)
        slot = tiers.slot(0, 256)
        with ResidencyGuard(tiers) as guard:
            mover.submit(Tier.SLOW, slot, src.view(torch.uint8))
            mover.drain()
            fast = tiers.fast_empty(256)
            mover.fetch_now(fast, slot)
            mover.engine.compute_copy(fast, slot)
            total = fast.view(torch.float32).sum()  # the fetched bytes: fast
        assert guard.violations == []
        assert torch.equal(total, src.sum())
    finally:
        mover.close()


def test_direct_access_and_an_unentered_guard_cost_nothing():
    """Under direct access an op may read the slow tier in place: the guard installs no mode.
    Not entered, it does nothing at all; after its block, nothing of it is left."""
    depth = torch._C._len_torch_dispatch_stack()
    direct = _tiers(Access.DIRECT)
    table = _slow(direct, torch.randn(6, 5))
    guard = ResidencyGuard(direct)
    with guard:
        assert torch._C._len_torch_dispatch_stack() == depth
        torch.randn(3, 6) @ table
    assert not guard.checking and guard.ops_checked == 0
    tiers = _tiers()
    table = _slow(tiers, torch.randn(6, 5))
    guard = ResidencyGuard(tiers)
    torch.randn(3, 6) @ table  # not entered
    with pytest.raises(ResidencyError), guard:
        assert torch._C._len_torch_dispatch_stack() == depth + 1
        torch.randn(3, 6) @ table
    assert torch._C._len_torch_dispatch_stack() == depth
    torch.randn(3, 6) @ table


# -- over steady, asynchronous training steps ---------------------------------------------------


@pytest.fixture
def racing(monkeypatch) -> list[RacingTiers]:
    """Sentinel's ``auto`` tiers become racing tiers (migrate access, GPU-like waits: the host
    runs ahead of its copies); returns the tiers made."""
    made: list[RacingTiers] = []
    real = manager.open_tiers

    def open_tiers(spec: str, device=None):
        if spec != "auto":
            return real(spec, device)
        made.append(RacingTiers(seed=len(made)))
        return made[-1]

    monkeypatch.setattr(manager, "open_tiers", open_tiers)
    return made


def guarded_training(name: str, fast_memory: str, *, steady: int = 2, max_steps: int = 14,
                     recompute: bool = True) -> tuple[sh.Sentinel, ResidencyGuard]:
    """Train reference workload ``name`` (its test size) under Sentinel until ``steady``
    steady, unaudited (asynchronous) steps have run under a collecting residency guard,
    counting the steps from the phases seen (trials or re-plans may add steps). The guard
    watches every step from the first that runs a plan (trial or steady); returns it
    unchecked."""
    torch.manual_seed(0)
    wl = CONFIGS[name](0)
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=fast_memory, trials=0,
                           recompute=recompute)
    guard = ResidencyGuard(sentinel.tiers, wl.model, collect=True)
    seen = 0
    for _ in range(max_steps):
        phase = sentinel.stats()["phase"]
        planned = phase in ("trial", "steady")
        with sentinel.step(), guard if planned else contextlib.nullcontext():
            loss = wl.model(*wl.make_batch())
            loss.backward()
            wl.optimizer.step()
            wl.optimizer.zero_grad()
        seen += phase == "steady"
        if seen == steady:
            break
    assert seen == steady, f"{name} ran {seen} steady steps of {max_steps}: {sentinel.stats()}"
    return sentinel, guard


def _check(sentinel: sh.Sentinel, guard: ResidencyGuard, racing: list[RacingTiers]) -> None:
    stats = sentinel.stats()
    sentinel.close()
    assert stats["phase"] == "steady" and not stats["mismatches"], stats
    assert stats["bytes_to_slow_per_step"] > 0, stats  # the budget binds: things really move
    assert guard.ops_checked > 0
    # the racing engines really ran ahead of the host (asynchronous steps)
    assert sum(e.host_ahead for t in racing for e in t.engines) > 0
    guard.check()


# Issue 22 item 2: the rerun of a recomputed layer calls its bound forward, so the layer's own
# pre-hook (which brings its moving parameters back) does not fire: a leaf layer's parameters
# are still slow when the rerun and its backward read them. Expected to fail until the fix
# (`CheckpointedLayers.before_forward`, NOTE [Safe reruns]) lands; strict, so that a fix under
# another name says so.
_ITEM_2 = pytest.mark.xfail(
    not hasattr(CheckpointedLayers(), "before_forward"), strict=True, raises=ResidencyError,
    reason="issue 22 item 2: a recomputed layer's rerun reads its own parameters from the "
           "slow tier (its module pre-hook does not fire for the rerun)")


@pytest.mark.usefixtures("every_layer_recomputed")
@pytest.mark.parametrize("name", [pytest.param(n, marks=_ITEM_2) for n in sorted(CONFIGS)])
def test_recomputed_layers_read_only_the_fast_tier(racing, name):
    """Every reference workload at "min", every layer recomputed, on racing tiers: no op of a
    steady step (forward, reruns, backward, the chunked optimizer) reads the slow tier."""
    sentinel, guard = guarded_training(name, "min")
    assert sentinel.stats()["recomputed_layers"], sentinel.stats()
    _check(sentinel, guard, racing)


@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_steady_steps_without_recompute_read_only_the_fast_tier(racing, name):
    """The control: the same steps with the planner's own choice and no recompute pass (the
    runtime's own moves, parameter fetches and the chunked optimizer make no false alarm)."""
    sentinel, guard = guarded_training(name, "min", recompute=False)
    _check(sentinel, guard, racing)


@pytest.mark.parametrize("moves_gradients", [True, False])
def test_a_slow_gradient_is_read_in_place_only_on_tiers_that_move_gradients(moves_gradients):
    """Host tiers swap ``param.grad`` for an arena view, which accumulation reads in place by
    design; on tiers that never move gradients (CUDA's, the racing tiers), a slow gradient
    read is a violation."""
    tiers = _tiers()
    tiers.moves_gradients = moves_gradients
    model = nn.Linear(8, 4)
    model(torch.randn(3, 8)).sum().backward()
    model.weight.grad = _slow(tiers, model.weight.grad)
    guard = ResidencyGuard(tiers, model, collect=True)
    with guard:
        model(torch.randn(3, 8)).sum().backward()  # accumulates into the slow gradient
    found = [(v.op, v.context) for v in guard.violations]
    assert found == ([] if moves_gradients else
                     [("aten.add_.Tensor", "backward (torch::autograd::AccumulateGrad)")])


class _TiedUse(nn.Module):
    """Reads a parameter outside its owner's forward (``h @ self.emb.weight``, as a model with
    a tied output projection may): the owner's pre-hook ran long before."""

    def __init__(self, width: int = 64, n: int = 3) -> None:
        super().__init__()
        self.emb = nn.Linear(32, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.GELU())
                                    for _ in range(n))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        return nn.functional.mse_loss(h @ self.emb.weight, y)


def test_a_parameter_read_outside_its_owners_forward_is_fast(racing):
    torch.manual_seed(0)
    model = _TiedUse()
    opt = torch.optim.AdamW(model.parameters())
    sentinel = sh.Sentinel(model, opt, fast_memory="min", trials=0)
    guard = ResidencyGuard(sentinel.tiers, model, collect=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(7):
        planned = sentinel.stats()["phase"] in ("trial", "steady")
        with sentinel.step(), guard if planned else contextlib.nullcontext():
            model(torch.randn(128, 32, generator=gen),
                  torch.randn(128, 32, generator=gen)).backward()
            opt.step()
            opt.zero_grad()
    _check(sentinel, guard, racing)


def test_an_audit_reports_what_read_the_slow_tier(monkeypatch):
    """The audit runs the guard (collecting): with the runtime's parameter fetches switched
    off, an audited step says which ops read the slow tier, in stats() and in a warning."""
    from sentinel_hm.runtime.steady import SteadyStep

    torch.manual_seed(0)
    wl = CONFIGS["mlp"](0)
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory="min", trials=0)
    for _ in range(5):
        with sentinel.step():
            wl.step()
    assert sentinel.stats()["phase"] == "steady"
    assert not sentinel.stats()["residency_violations"]
    monkeypatch.setattr(SteadyStep, "module_pre_forward", lambda self, sids: None)
    monkeypatch.setattr(SteadyStep, "need", lambda self, sid: None)
    sentinel.audit()
    with pytest.warns(UserWarning, match=r"read the slow tier \d+ time"), sentinel.step():
        wl.step()
    found = sentinel.stats()["residency_violations"]
    assert found and any("in the slow tier" in v for v in found), found
    sentinel.close()
