"""The residency code under copies that race like a GPU's (racing_tiers.py): late, out of order
across directions, the host running ahead. Training stays bitwise equal to plain training at
binding budgets, and the races a GPU would produce are each made to happen: a prefetch issued
while the eviction of the same storage is still copying, fast memory and arena slots reused
while a copy still reads them, an in-place write while an eviction copies, and reads between
steps (``optimizer.state_dict()``, ``torch.save``) while copies were in flight."""

from __future__ import annotations

import contextlib
import io
import random
import time

import pytest
import torch
from torch import nn

import sentinel_hm as sh
import sentinel_hm.runtime.manager as manager
from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Tier
from sentinel_hm.runtime import audit
from sentinel_hm.runtime.mover import Mover
from sentinel_hm.runtime.residency import HeldEntry, SavedEntry

from .racing_tiers import CUDA_REUSE, RacingEngine, RacingTiers, Sweeping
from .test_everything_moves import OPTIMIZERS, _tied
from .test_everything_moves import _train as train_all
from .test_sentinel import CONFIGS, assert_same, assert_steady_within_budget, train

SLOW_COPY_S = 0.05  # a copy held back this long is certainly still running when the host acts


def _slow(direction: Tier, seconds: float = SLOW_COPY_S):
    """A delay: copies toward ``direction`` take ``seconds``, the others none."""
    return lambda _rng, to: seconds if to is direction else 0.0


@pytest.fixture
def racing(monkeypatch):
    """Sentinel's ``auto`` and ``host`` tiers become racing tiers; call with the tiers' options
    before training. Returns the tiers made, so a test can read their engines' counts."""
    made: list[RacingTiers] = []
    options: dict = {}
    real = manager.open_tiers

    def open_tiers(spec: str, device=None):
        if spec == "host:direct":  # the compute reads the arena: every wait blocks
            made.append(RacingTiers(seed=len(made), gpu_waits=False, access=Access.DIRECT))
        elif spec in ("auto", "host"):
            made.append(RacingTiers(seed=len(made), **options))
        else:
            return real(spec, device)
        return made[-1]

    monkeypatch.setattr(manager, "open_tiers", open_tiers)

    def configure(**kw) -> list[RacingTiers]:
        options.update(kw)
        return made

    return configure


def _engine(made: list[RacingTiers]) -> RacingEngine:
    assert len(made) == 1 and len(made[0].engines) == 1
    return made[0].engines[0]


# -- whole training runs ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_bitwise_equal_under_racing_copies(racing, name, budget):
    made = racing()
    plain_losses, plain_params, _ = train(name, None)
    try:
        losses, params, sentinel = train(name, budget)
    except sh.SentinelError as e:
        assert "smallest it can honour" in str(e) and budget != "min"
        pytest.skip(f"{name} at {budget} is below the plan's floor: {e}")
    assert_same(plain_losses, losses)
    assert_same(plain_params, params)
    assert_steady_within_budget(sentinel)
    engine = _engine(made)
    # the races happened: the compute reached copies still running, and did not always block
    assert engine.host_ahead > 0 and engine.not_blocked > 0, vars(engine)
    sentinel.close()


def test_copies_complete_out_of_order_and_the_host_runs_ahead(racing):
    made = racing()
    plain = train("gpt", None)
    ours = train("gpt", "min")
    assert_same(plain[0], ours[0])
    assert_same(plain[1], ours[1])
    engine = _engine(made)
    assert engine.overtaken > 0 and engine.in_flight_at_drain > 0, vars(engine)
    ours[2].close()


def test_everything_moves_under_racing_copies(racing):
    """Parameters and optimizer state stream through the arena while copies race; gradient
    accumulation, clipping and an LR schedule on top."""
    racing()
    kw = {"accumulate": 2, "clip": True, "schedule": True}
    make = lambda seed: _tied(seed, OPTIMIZERS["adamw-for-loop"])  # noqa: E731
    plain_losses, plain_state, _ = train_all(make, None, **kw)
    losses, state, sentinel = train_all(make, "min", **kw)
    assert_same(plain_losses, losses)
    assert_same(plain_state, state)
    assert_steady_within_budget(sentinel)
    assert sentinel.schedule is not None and sentinel.schedule.params and sentinel.schedule.states
    sentinel.close()


def test_host_tiers_waits_with_gradients_moving(racing):
    """As host tiers are used: every wait blocks the host, gradients move too."""
    made = racing(gpu_waits=False)
    make = lambda seed: _tied(seed, OPTIMIZERS["sgd-nesterov-wd"])  # noqa: E731
    plain_losses, plain_state, _ = train_all(make, None, clip=True)
    losses, state, sentinel = train_all(make, "min", clip=True)
    assert_same(plain_losses, losses)
    assert_same(plain_state, state)
    assert sentinel.schedule is not None and sentinel.schedule.grads
    assert _engine(made).host_ahead > 0
    sentinel.close()


def test_direct_access_under_racing_copies(racing):
    """Direct access: backward reads saved activations and moved parameters in the arena
    itself, right after their evictions, which are still copying."""
    made = racing()
    plain = train("gpt", None)
    ours = train("gpt", "min", tiers="host:direct")
    assert_same(plain[0], ours[0])
    assert_same(plain[1], ours[1])
    assert_steady_within_budget(ours[2])
    assert ours[2].schedule is not None and ours[2].schedule.params
    assert _engine(made).host_ahead > 0
    ours[2].close()


def test_plans_reuse_the_arena_while_copies_race(racing):
    """Trials re-plan between steps: a new plan's slots overlap the old plan's in the same
    arena, so no copy of one plan may still run when the next one starts."""
    made = racing()
    make = lambda seed: _tied(seed, OPTIMIZERS["adamw-foreach"])  # noqa: E731
    plain_losses, plain_state, _ = train_all(make, None, steps=9)
    losses, state, sentinel = train_all(make, "50%", steps=9, trials=3)
    assert_same(plain_losses, losses)
    assert_same(plain_state, state)
    assert len(sentinel.stats()["trials"]) > 1  # more than one plan ran
    assert _engine(made).in_flight_at_drain > 0
    sentinel.close()


def _saved(obj: object) -> dict:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)


def test_reads_between_steps_see_complete_bytes(racing):
    """After each step, the optimizer's and the model's state dicts (through torch.save)
    equal those of a plain twin trained side by side, although the step ended with copies
    toward the slow tier still running (each takes a few ms; the host does not wait for them
    inside the step, as a GPU's host would not)."""
    made = racing(delay=lambda rng, to: rng.uniform(1e-3, 3e-3) if to is Tier.SLOW else 0.0)
    plain, ours = (_tied(0, OPTIMIZERS["adamw-for-loop"]) for _ in range(2))
    sentinel = sh.Sentinel(ours.model, ours.optimizer, fast_memory="min", trials=0)
    gen = torch.Generator().manual_seed(1)
    in_slow = 0
    for _ in range(10):
        idx = torch.randint(0, 64, (16, 32), generator=gen)
        for wl, ctx in ((plain, contextlib.nullcontext()), (ours, sentinel.step())):
            with ctx:
                wl.model(idx, torch.roll(idx, -1, 1)).backward()
                wl.optimizer.step()
                wl.optimizer.zero_grad()
        in_slow += any(sentinel.tiers.is_slow(t.untyped_storage())
                       for st in ours.optimizer.state.values() for t in st.values())
        theirs, mine = _saved(plain.optimizer.state_dict()), _saved(ours.optimizer.state_dict())
        assert theirs["state"].keys() == mine["state"].keys()
        for index, state in theirs["state"].items():
            assert_same(list(state.values()), [mine["state"][index][k] for k in state])
        assert_same(list(_saved(plain.model.state_dict()).values()),
                    list(_saved(ours.model.state_dict()).values()))
    assert sentinel.stats()["phase"] == "steady"
    engine = _engine(made)
    assert in_slow > 0, "no state was in the slow tier between steps: nothing was tested"
    assert engine.in_flight_at_drain > 0 and engine.not_blocked > 0, vars(engine)
    sentinel.close()


def test_an_exception_with_copies_in_flight_leaves_the_model_usable(racing):
    racing(delay=_slow(Tier.SLOW, 5e-3))
    wl = CONFIGS["gpt"](0)
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory="min", trials=0)
    for _ in range(5):
        with sentinel.step():
            wl.step()
    assert sentinel.stats()["phase"] == "steady"
    with pytest.raises(RuntimeError, match="boom"), sentinel.step():
        wl.model(*wl.make_batch()).backward()
        raise RuntimeError("boom")
    arena = sentinel.tiers.arena()
    assert arena is not None
    for p in wl.model.parameters():
        assert not sentinel.tiers.is_slow(p.untyped_storage())
    for state in wl.optimizer.state.values():
        for t in state.values():
            assert not sentinel.tiers.is_slow(t.untyped_storage())
    sentinel.close()


# -- one entry, one race at a time --------------------------------------------------------------


def _setup(delay, nbytes: int = 1 << 16) -> tuple[RacingTiers, Mover]:
    tiers = RacingTiers(delay=delay)
    tiers.reserve(2 * nbytes)
    return tiers, Mover(tiers)


def _saved_entry(tiers: RacingTiers, t: torch.Tensor) -> tuple[SavedEntry, object]:
    nbytes = t.untyped_storage().nbytes()
    entry = SavedEntry(0, nbytes, tiers.slot(0, nbytes), 0, t.untyped_storage())
    return entry, entry.handle(t)


def test_a_prefetch_issued_while_its_eviction_still_copies():
    """The eviction of a saved tensor takes 50 ms; its prefetch, issued right after, copies at
    once unless ordered after the eviction: it would read the slot before the bytes arrive."""
    tiers, mover = _setup(_slow(Tier.SLOW))
    t = torch.randn(1 << 14)
    expected = t.clone()
    entry, handle = _saved_entry(tiers, t)
    entry.evict(mover, tiers)
    eviction = entry.future
    del t  # the program no longer holds it: only the slot will have the bytes
    entry.prefetch(mover, tiers)
    assert eviction is not None and not eviction.done()  # the race is on
    got = entry.materialize(handle, mover, tiers)
    assert torch.equal(got, expected)
    assert not entry.program_held
    mover.close()


def test_fast_memory_is_not_reused_while_an_eviction_reads_it():
    """The eviction's source is dropped when the eviction is issued; its memory is reused by
    new tensors (same size, written at once) while the copy, held back 50 ms, has not read
    it yet. The engine keeps it until the copy is done (``record_stream`` on a GPU)."""
    tiers, mover = _setup(_slow(Tier.SLOW))
    t = torch.randn(1 << 14)
    expected = t.clone()
    entry, handle = _saved_entry(tiers, t)
    entry.evict(mover, tiers)
    del t
    assert entry.future is not None and not entry.future.done()
    scribbles = [torch.full((1 << 14,), float(i)) for i in range(64)]
    mover.drain()
    assert torch.equal(entry.slot.view(torch.float32), expected)
    assert torch.equal(entry.materialize(handle, mover, tiers), expected)
    del scribbles
    mover.close()


def test_the_arena_slot_is_rewritten_only_after_a_copy_has_read_it():
    """A held tensor (optimizer state) goes out, comes back, is updated in place and goes out
    again through the same slot, with copies toward the fast tier held back 50 ms: the second
    eviction must not overwrite the slot before the prefetch has read it."""
    tiers, mover = _setup(_slow(Tier.FAST))
    state = {"exp_avg": torch.randn(1 << 14)}
    first = state["exp_avg"].clone()
    nbytes = first.numel() * first.element_size()
    entry = HeldEntry(0, lambda: state.get("exp_avg"),
                      lambda t: state.__setitem__("exp_avg", t), tiers.slot(0, nbytes))
    entry.evict(mover, tiers)
    entry.commit(mover)
    assert tiers.is_slow(state["exp_avg"].untyped_storage())
    entry.prefetch(mover, tiers)
    prefetch = entry.future
    entry.commit(mover)  # the compute uses it next: waits for the prefetch
    assert prefetch is not None and prefetch.done()
    assert not tiers.is_slow(state["exp_avg"].untyped_storage())
    assert torch.equal(state["exp_avg"], first)
    state["exp_avg"].mul_(2)  # the optimizer's update
    entry.evict(mover, tiers)
    entry.restore(mover, tiers)
    assert torch.equal(state["exp_avg"], first * 2)
    mover.close()


def test_an_in_place_write_during_the_eviction_copy_is_an_error_at_unpack():
    """On a GPU an eviction copies after the host has moved on: a write to the saved tensor
    issued after the eviction races the copy. It is refused when backward unpacks it."""
    tiers, mover = _setup(_slow(Tier.SLOW))
    t = torch.randn(1 << 14)
    entry, handle = _saved_entry(tiers, t)
    entry.evict(mover, tiers)
    assert entry.future is not None and not entry.future.done()
    t.add_(1)  # the program writes it while the copy is pending
    with pytest.raises(sh.SentinelError, match="modified in place"):
        entry.materialize(handle, mover, tiers)
    mover.close()


def test_the_racing_engine_keeps_one_order_per_direction():
    """The test engine itself: copies toward one tier complete in submission order (one CUDA
    stream), the two directions overtake each other, and ``after`` orders across them."""
    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    engine = RacingEngine(copy, seed=3,
                          delay=lambda rng, to: rng.uniform(0, 2e-3 if to is Tier.SLOW else 1e-4))
    rng = random.Random(0)
    copies = []
    for i in range(60):
        to = Tier.SLOW if rng.random() < 0.5 else Tier.FAST
        dst, src = torch.zeros(4), torch.full((4,), float(i))
        copies.append((to, i, engine.submit(to, dst, src), dst))
    engine.drain()
    for to in Tier:
        mine = [c for d, _, c, _ in copies if d is to]
        assert [c.seq for c in mine] == sorted(c.seq for c in mine)
    assert engine.overtaken > 0
    for _, i, c, dst in copies:
        assert c.done() and torch.equal(dst, torch.full((4,), float(i)))
    # ``after``: a fast copy waits for a slow one submitted before it, whatever their delays
    slot, src, back = torch.zeros(4), torch.ones(4), torch.zeros(4)
    engine = RacingEngine(copy, delay=_slow(Tier.SLOW))
    out = engine.submit(Tier.SLOW, slot, src)
    start = time.perf_counter()
    engine.compute_wait(engine.submit(Tier.FAST, back, slot, after=out))
    assert time.perf_counter() - start >= SLOW_COPY_S * 0.9 and torch.equal(back, src)
    engine.close()


def test_a_failed_copy_is_raised_after_every_copy_has_ended():
    calls: list[int] = []

    def copy(dst: torch.Tensor, src: torch.Tensor) -> None:
        calls.append(int(src[0]))
        if int(src[0]) == 1:
            raise OSError("copy failed")
        time.sleep(0.01)
        dst.copy_(src)

    engine = RacingEngine(copy, delay=lambda rng, to: 0.0)
    later = torch.zeros(1)
    engine.submit(Tier.SLOW, torch.zeros(1), torch.ones(1))
    engine.submit(Tier.SLOW, later, torch.full((1,), 2.0))
    with pytest.raises(OSError, match="copy failed"):
        engine.drain()
    assert calls == [1, 2] and later.item() == 2.0
    engine.close()


def test_a_module_with_saves_evicted_and_prefetched_under_racing_copies(racing):
    """A deep stack of cheap layers (low arithmetic density: copies are as long as compute),
    every saved activation moving, bitwise."""
    racing(delay=lambda rng, to: rng.uniform(0, 1e-3))

    def run(budget: str | None) -> tuple[list[torch.Tensor], sh.Sentinel | None]:
        torch.manual_seed(0)
        model = nn.Sequential(*(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(12)))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sentinel = sh.Sentinel(model, opt, fast_memory=budget, trials=0) if budget else None
        g = torch.Generator().manual_seed(0)
        out = []
        for _ in range(7):
            x = torch.randn(256, 32, generator=g)
            with sentinel.step() if sentinel else contextlib.nullcontext():
                loss = model(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad()
            out.append(loss.detach())
        return out + [p.detach().clone() for p in model.parameters()], sentinel

    plain, _ = run(None)
    ours, sentinel = run("min")
    assert_same(plain, ours)
    assert sentinel is not None and sentinel.stats()["bytes_to_slow_per_step"] > 0
    sentinel.close()


def test_the_thread_engine_drains_every_copy_before_raising_the_first_error():
    """Host tiers' engine: a failed copy is raised only once every other copy has ended (an
    arena is restored right after a failed drain: no copy may still be writing it)."""
    from sentinel_hm.tiers.throttled import ThrottledTiers

    tiers = ThrottledTiers(1e6, 1e6)  # 64 KiB take 65 ms
    tiers.reserve(1 << 16)
    engine = tiers.engine()
    bad = engine.submit(Tier.SLOW, tiers.slot(0, 8), torch.zeros(16, dtype=torch.uint8))
    slow = engine.submit(Tier.FAST, torch.zeros(1 << 16, dtype=torch.uint8),
                         tiers.slot(0, 1 << 16))
    with pytest.raises(sh.SentinelError, match="unequal buffers"):
        engine.drain()
    assert bad.done() and slow.done()
    engine.close()


# -- evictions in flight (NOTE [Evictions in flight]) ---------------------------------------------


def _traced_steady_peak(sentinel: sh.Sentinel, run_step) -> int:
    """The fast-tier peak of one steady step as it really runs, copies racing: traced like an
    audit, but without making the copies synchronous."""
    tracer = sentinel._tracer(track_saved=False)
    tracer.start()
    arena = sentinel.tiers.arena()
    if arena is not None:
        tracer.tag_external(arena, audit.ARENA_NAME)
    try:
        with sentinel.step():
            run_step()
    finally:
        trace = tracer.stop()
    return max(audit.fast_bytes_curve(trace))


@pytest.mark.parametrize(("name", "budget"), [("gpt", "min"), ("cnn", "50%")])
def test_evictions_in_flight_keep_a_steady_step_within_its_budget(racing, monkeypatch, name,
                                                                  budget):
    # every eviction takes 6 ms: without a bound the host runs ahead, and the fast bytes
    # each eviction still holds pile up beyond what the (synchronous) audit measured
    made = racing(delay=_slow(Tier.SLOW, 0.006))
    torch.manual_seed(0)
    wl = CONFIGS[name](0)
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, trials=0)

    def run_step() -> None:
        wl.model(*wl.make_batch()).backward()
        wl.optimizer.step()
        wl.optimizer.zero_grad()

    try:
        while sentinel.stats()["phase"] != "steady":
            with sentinel.step():
                run_step()
    except sh.SentinelError as e:
        assert "smallest it can honour" in str(e) and budget != "min"
        pytest.skip(f"{name} at {budget} is below the plan's floor: {e}")
    for _ in range(2):
        with sentinel.step():
            run_step()
    peak = _traced_steady_peak(sentinel, run_step)
    stats = sentinel.stats()
    assert stats["phase"] == "steady" and not stats["mismatches"]
    assert stats["bytes_to_slow_per_step"] > 0
    assert _engine(made).host_ahead > 0
    assert peak <= stats["budget_bytes"], (peak, stats["budget_bytes"])
    # the same step without the bound: the evictions in flight take the step over its budget
    # (the races this test sets up are real)
    monkeypatch.setattr(Mover, "bound_evictions", lambda self, limit: None)
    unbounded = _traced_steady_peak(sentinel, run_step)
    assert unbounded > stats["budget_bytes"], (unbounded, stats["budget_bytes"])
    sentinel.close()


# -- when freed fast memory is reusable (NOTE [CUDA copies]; issue 22, item 5) --------------------


def _steady(racing, name: str, budget: str, **options) -> tuple[sh.Sentinel, object, RacingEngine]:
    made = racing(**options)
    torch.manual_seed(0)
    wl = CONFIGS[name](0)
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, trials=0)

    def run_step() -> None:
        wl.model(*wl.make_batch()).backward()
        wl.optimizer.step()
        wl.optimizer.zero_grad()

    while sentinel.stats()["phase"] != "steady":
        with sentinel.step():
            run_step()
    for _ in range(2):
        with sentinel.step():
            run_step()
    return sentinel, run_step, _engine(made)


def _asynchronous_audit(sentinel: sh.Sentinel, run_step, engine: RacingEngine) -> int:
    """The fast-tier peak of one steady, asynchronous step, blocks that were freed but are not
    reusable yet included (the engine keeps them; `Sweeping` lets go of them at the first op
    where an allocator could reuse them)."""
    with Sweeping(engine):
        return _traced_steady_peak(sentinel, run_step)


BOTH_WAYS_SLOW = lambda rng, to: rng.uniform(2e-3, 6e-3)  # noqa: E731


@pytest.mark.parametrize(("name", "budget"), [("gpt", "min"), ("cnn", "50%")])
def test_a_steady_step_stays_within_budget_as_cuda_frees_fast_memory(racing, name, budget):
    """The engine frees fast memory as `CudaEngine` does (``CUDA_REUSE``), both directions
    copying slowly, so that copies queue on each lane while the program drops the buffers
    they used: the asynchronous step's peak, blocks not yet reusable included, is within the
    budget."""
    sentinel, run_step, engine = _steady(racing, name, budget, delay=BOTH_WAYS_SLOW,
                                         reuse=CUDA_REUSE)
    peak = _asynchronous_audit(sentinel, run_step, engine)
    stats = sentinel.stats()
    assert stats["phase"] == "steady" and not stats["mismatches"]
    assert stats["bytes_to_slow_per_step"] > 0 and stats["bytes_to_fast_per_step"] > 0
    assert engine.host_ahead > 0
    assert peak <= stats["budget_bytes"], (peak, stats["budget_bytes"], vars(engine))
    sentinel.close()


def test_record_stream_keeps_freed_blocks_past_any_bound(racing):
    """Why `CudaEngine` no longer calls ``record_stream``: a block the program drops is reusable
    only once its lane has passed every copy queued before the drop, a moment the host never
    sees; the same steady step then holds more than its budget. (The GPT at "min": about 46%
    over; the CNN at 50% is over by 6% in most runs, too close to assert.)"""
    sentinel, run_step, engine = _steady(racing, "gpt", "min", delay=BOTH_WAYS_SLOW,
                                         reuse="record_stream")
    peak = _asynchronous_audit(sentinel, run_step, engine)
    budget_bytes = sentinel.stats()["budget_bytes"]
    assert engine.peak_unreusable > 0
    assert peak > budget_bytes, (peak, budget_bytes, engine.peak_unreusable)
    sentinel.close()
