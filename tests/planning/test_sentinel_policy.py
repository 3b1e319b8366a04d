"""Sentinel policy choices: intervals finer than a quarter layer, and in-place reads after a gap."""

from __future__ import annotations

import dataclasses

import pytest

import sentinel_hm as sh
from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Move, Tier
from sentinel_hm.planning.planner import context
from sentinel_hm.planning.policies.sentinel import plan_intervals
from sentinel_hm.trace.model import Kind, Phase

from .tracegen import Builder, GiB, MiB, hardware


def one_big_layer(n_ops: int = 16) -> sh.Trace:
    """One layer of ``n_ops`` ops, each saving 1 MiB for backward (a ResNet stage found as
    one module): forward op i saves A_i, backward reads A_i and frees it, in reverse."""
    b = Builder()
    acts = [b.storage(MiB, Kind.SAVED_ACTIVATION, saved=True) for _ in range(n_ops)]
    for i in range(n_ops):
        b.op(Phase.FORWARD, 0, reads=acts[i - 1 : i], creates=[acts[i]])
    for i in reversed(range(n_ops)):
        b.op(Phase.BACKWARD, 0, reads=[acts[i]], frees=[acts[i]])
    return b.build(1)


def test_a_big_layer_is_cut_finer_than_a_quarter():
    # Prefetching one interval ahead holds two intervals' activations at once: a quarter of
    # this layer (4 ops) needs 8 MiB, a sixteenth (one op) fits 3 MiB at all-fast speed.
    hw = hardware(Access.MIGRATE)
    trace = one_big_layer()
    quarter = dataclasses.replace(context(trace, hw), interval_lengths=((1, 4),))
    with pytest.raises(sh.SentinelError, match=r"smallest it can honour is 8\.0 MiB"):
        sh.plan(trace, hw, 3 * MiB, "sentinel", ctx=quarter)
    plan = sh.plan(trace, hw, 3 * MiB, "sentinel")
    assert plan.info["layers_per_interval"] == 1 / 16
    result = sh.simulate(trace, plan, hw)
    assert result.peak_fast_bytes <= 3 * MiB and not result.overflow_bytes
    assert result.step_s == pytest.approx(32e-3)  # 32 ops of 1 ms, nothing waits


def chain_with_gradients(n_layers: int = 4) -> sh.Trace:
    """Forward layer i saves A_i; backward layer i reads A_i and the incoming gradient G_i+1,
    writes G_i, and frees A_i and G_i+1."""
    b = Builder()
    acts = [b.storage(MiB, Kind.SAVED_ACTIVATION, saved=True) for _ in range(n_layers)]
    grads = [b.storage(MiB, Kind.TEMPORARY) for _ in range(n_layers)]
    for i in range(n_layers):
        b.op(Phase.FORWARD, i, reads=acts[i - 1 : i], creates=[acts[i]])
    for i in reversed(range(n_layers)):
        incoming = grads[i + 1 : i + 2]
        b.op(Phase.BACKWARD, i, reads=[acts[i], *incoming], creates=[grads[i]],
             frees=[acts[i], *incoming])
    b.op(Phase.OTHER, None, reads=[grads[0]], frees=[grads[0]])
    return b.build(n_layers)


def test_direct_access_reads_in_place_only_after_the_gap():
    # At 3 MiB, backward layer i holds A_i, G_i+1 and G_i; prefetching A_i-1 too is one MiB
    # too many, so something must be used in slow memory in place. A0 and A1 are written and
    # read fast in forward, evicted after, and read in place by b0 and b1 (no prefetch):
    # only those two reads are slow. Keeping them slow for their whole life also slows
    # the forward ops that write and read them.
    hw = hardware(Access.DIRECT, slow_ratio=100)
    trace = chain_with_gradients()
    plan = sh.plan(trace, hw, 3 * MiB, "sentinel")
    assert plan.placement == {}
    assert set(plan.moves) == {Move(0, Tier.SLOW, 2, MiB), Move(1, Tier.SLOW, 3, MiB)}
    result = sh.simulate(trace, plan, hw)
    assert result.peak_fast_bytes <= 3 * MiB and not result.overflow_bytes
    fast, slow = hw.fast.read_bytes_per_s, hw.slow.read_bytes_per_s
    in_place_b = MiB / slow + MiB / fast + MiB / hw.fast.write_bytes_per_s  # A slow, G fast
    assert result.step_s == pytest.approx(7e-3 + 2 * in_place_b)
    whole_life = dataclasses.replace(plan, placement={0: 0, 1: 0}, moves=())
    assert sh.simulate(trace, whole_life, hw).step_s > result.step_s + 10e-3


def skip_chain(n_layers: int = 8) -> sh.Trace:
    """A chain whose first activation A0 (the biggest) is read again by the last forward layer
    (a skip connection): between those reads the program itself holds A0."""
    b = Builder()
    acts = [b.storage((4 if i == 0 else 1) * MiB, Kind.SAVED_ACTIVATION, saved=True)
            for i in range(n_layers)]
    scratch = b.storage(4 * MiB, Kind.TEMPORARY)  # the step's peak: mid-forward
    for i in range(n_layers):
        skip = [acts[0]] if i == n_layers - 1 else []
        mid = [scratch] if i == n_layers // 2 else []
        b.op(Phase.FORWARD, i, reads=[*acts[i - 1 : i], *skip], creates=[acts[i], *mid],
             frees=mid)
    for i in reversed(range(n_layers)):
        b.op(Phase.BACKWARD, i, reads=[acts[i]], frees=[acts[i]])
    return b.build(n_layers)


@pytest.mark.parametrize("access", [Access.MIGRATE, Access.DIRECT])
def test_a_runtime_plan_moves_no_activation_the_program_still_holds(access):
    # NOTE [Held by the program]: a study of the trace may evict A0 between its forward
    # reads, around the scratch peak, and bring it back for the skip read; a runtime cannot,
    # since the program holds A0 there. Once an audit found A0 held until its last forward
    # read (held_until), the runtime's plan keeps it fast until then, and its floor is higher
    # by what that costs
    hw = hardware(access, link_bytes_per_s=64 * GiB)
    trace = skip_chain()
    last_forward_read = 7

    def early_evictions(plan: sh.Plan) -> list[Move]:
        return [m for m in plan.moves
                if m.storage == 0 and m.to is Tier.SLOW and m.issue_at <= last_forward_read]

    assert early_evictions(sh.plan(trace, hw, 9 * MiB, "sentinel"))
    first = context(trace, hw, movable=frozenset({Kind.SAVED_ACTIVATION}))
    assert not first.held_in_forward  # nothing found held yet: the first plan may evict it
    # an audit found every activation held by the program (each until its next layer's read)
    found = tuple((s.id, 0) for s in trace.storages if s.kind is Kind.SAVED_ACTIVATION)
    runtime = dataclasses.replace(first, held_until=found)
    assert runtime.held_in_forward[0] == last_forward_read  # held, so until its last read
    with pytest.raises(sh.SentinelError, match=r"smallest it can honour is 10\.0 MiB"):
        sh.plan(trace, hw, 9 * MiB, "sentinel", ctx=runtime)
    plan = sh.plan(trace, hw, 10 * MiB, "sentinel", ctx=runtime)
    assert plan.moves and not early_evictions(plan)


def test_a_prefetch_longer_than_an_interval_is_issued_earlier_where_memory_has_room():
    # Layers alternate 1 ms and 3 ms of compute and each saves 1 MiB, whose copy takes 2 ms:
    # the link keeps up on average, but a prefetch issued one interval ahead of a use after a
    # 1 ms layer arrives 1 ms late. Issued earlier, where the 4 MiB budget has room, none is.
    b = Builder()
    n = 8
    acts = [b.storage(MiB, Kind.SAVED_ACTIVATION, saved=True) for _ in range(n)]
    for i in range(n):
        b.op(Phase.FORWARD, i, reads=acts[i - 1 : i], creates=[acts[i]],
             duration_s=3e-3 if i % 2 else 1e-3)
    for i in reversed(range(n)):
        b.op(Phase.BACKWARD, i, reads=[acts[i]], frees=[acts[i]],
             duration_s=3e-3 if i % 2 else 1e-3)
    trace = b.build(n)
    hw = hardware(Access.MIGRATE, link_bytes_per_s=MiB / 2e-3)
    ctx = context(trace, hw)
    one_ahead, _ = plan_intervals(ctx, 4 * MiB, 1, lead=1)
    late = sh.simulate(trace, one_ahead, hw)
    assert late.stall_s == pytest.approx(2e-3)
    assert late.stall_by_phase == pytest.approx({"backward": 2e-3})  # who waited

    plan = sh.plan(trace, hw, 4 * MiB, "sentinel")
    result = sh.simulate(trace, plan, hw)
    assert result.stall_s == 0 and result.step_s == pytest.approx(32e-3)
    assert result.peak_fast_bytes <= 4 * MiB and not result.overflow_bytes
    ahead = [m.issue_at for m in plan.moves if m.to is Tier.FAST]
    assert ahead < [m.issue_at for m in one_ahead.moves if m.to is Tier.FAST]
