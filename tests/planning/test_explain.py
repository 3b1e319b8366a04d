"""Peak explanations: the simulator's per-storage snapshot, `explain_peak`, and refusals that
say where the smallest plan peaks and what is live there."""

from __future__ import annotations

import dataclasses
import gc
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sentinel_hm as sh
from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Move, Plan, Tier
from sentinel_hm.planning import planner
from sentinel_hm.planning.explain import PeakExplanation, explain_peak
from sentinel_hm.planning.planner import context, explain_min_budget, min_budget
from sentinel_hm.planning.policies import DIRECT_ONLY, POLICIES
from sentinel_hm.sim.replay import SimResult
from sentinel_hm.trace.model import Kind, Phase, Trace
from sentinel_hm.workloads import make_workload

from .tracegen import MiB, chain, hardware, layered

MIGRATE = hardware(Access.MIGRATE)
SLOW_LINK = hardware(Access.MIGRATE, link_bytes_per_s=256 * MiB)


def _live_by_kind(trace: Trace, op: int) -> dict[Kind, int]:
    """Bytes of each kind live during ``op``: what an all-fast plan holds, from the trace alone."""
    return {k: trace.live_bytes_of(s for s in trace.storages if s.kind is k)[op] for k in Kind}


def _peak_op(result: SimResult) -> int:
    return result.fast_bytes.index(result.peak_fast_bytes)


# --- the simulator's snapshot -------------------------------------------------------------


def test_snapshot_counts_an_eviction_in_flight():
    # A0 is dirty (made in the step), so its eviction before f2 copies 1 MiB over a 256 MiB/s
    # link (3.9 ms): during f2 its space is still held although none of it is fast any more.
    trace = chain()
    plan = Plan("hand", SLOW_LINK.name, 3 * MiB, len(trace.ops), len(trace.storages),
                moves=(Move(0, Tier.SLOW, 2, MiB), Move(0, Tier.FAST, 4, MiB)))
    result = sh.simulate(trace, plan, SLOW_LINK, snapshot_at=2)
    assert result.fast_bytes[2] == 3 * MiB
    assert result.fast_at_snapshot == {0: MiB, 1: MiB, 2: MiB}
    # before the eviction: A0 and A1 only (A2 does not exist yet)
    assert sh.simulate(trace, plan, SLOW_LINK, snapshot_at=1).fast_at_snapshot == {0: MiB,
                                                                                   1: MiB}


def test_snapshot_is_off_by_default_and_checks_the_op():
    trace = chain()
    plan = sh.plan(trace, MIGRATE, "100%", "all-fast")
    assert sh.simulate(trace, plan, MIGRATE).fast_at_snapshot is None
    for bad in (-1, len(trace.ops)):
        with pytest.raises(sh.SentinelError, match="snapshot_at"):
            sh.simulate(trace, plan, MIGRATE, snapshot_at=bad)


def test_snapshot_leaves_the_replay_unchanged():
    trace = chain()
    plan = sh.plan(trace, SLOW_LINK, 2 * MiB, "sentinel")
    plain = sh.simulate(trace, plan, SLOW_LINK, timeline=True)
    snap = sh.simulate(trace, plan, SLOW_LINK, timeline=True, snapshot_at=3)
    assert snap.fast_at_snapshot is not None
    assert plain == dataclasses.replace(snap, fast_at_snapshot=None)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trace=st.builds(
        layered,
        n_layers=st.integers(1, 4),
        sizes=st.lists(st.integers(4096, 2 * MiB), min_size=1, max_size=6),
        durations=st.lists(st.floats(1e-5, 2e-3), min_size=1, max_size=6),
        saved_mask=st.lists(st.booleans(), min_size=1, max_size=4),
    ),
    access=st.sampled_from([Access.DIRECT, Access.MIGRATE]),
    link_bytes_per_s=st.sampled_from([64 * MiB, 16384 * MiB]),
    share=st.floats(0.05, 1.0),
)
def test_snapshot_sums_to_the_occupancy_at_every_op(trace, access, link_bytes_per_s, share):
    hw = hardware(access, link_bytes_per_s)
    ctx = context(trace, hw)
    budget = max(1, int(trace.peak_bytes * share))
    for policy in POLICIES:
        if policy in DIRECT_ONLY and access is not Access.DIRECT:
            continue
        try:
            plan = sh.plan(trace, hw, budget, policy, ctx=ctx)
        except sh.SentinelError:
            continue
        for i in range(len(trace.ops)):
            result = sh.simulate(trace, plan, hw, cost=ctx.cost, snapshot_at=i)
            assert result.fast_at_snapshot is not None
            assert sum(result.fast_at_snapshot.values()) == result.fast_bytes[i], (policy, i)
            assert all(b > 0 for b in result.fast_at_snapshot.values()), (policy, i)


# --- explain_peak on hand-built traces ----------------------------------------------------


def test_all_fast_peak_is_the_trace_peak_and_its_live_bytes_by_kind():
    trace = layered(3, sizes=[MiB, 3 * MiB, 2 * MiB], durations=[1e-3], saved_mask=[True, False])
    ctx = context(trace, MIGRATE)
    e = explain_peak(ctx, sh.plan(trace, MIGRATE, "100%", "all-fast", ctx=ctx))
    assert e.op == trace.peak_op
    assert e.fast_bytes == trace.peak_bytes
    assert e.fast_bytes_by_kind == _live_by_kind(trace, e.op)
    op = trace.ops[e.op]
    assert (e.op_name, e.phase) == (op.name, op.phase)
    assert e.layer == ("no layer" if op.layer is None else f"layer{op.layer}")


def test_binding_plan_peaks_where_the_simulator_says():
    # the known optimal plan at 2 MiB (test_planner): A0 leaves before f2, so the first op at
    # the 2 MiB peak is f1, holding A0 and A1
    trace = chain()
    ctx = context(trace, MIGRATE)
    plan = sh.plan(trace, MIGRATE, 2 * MiB, "sentinel", ctx=ctx)
    result = sh.simulate(trace, plan, MIGRATE)
    e = explain_peak(ctx, plan)
    assert e == explain_peak(ctx, plan, result)
    assert e.op == _peak_op(result) == 1
    assert e.fast_bytes == result.peak_fast_bytes == 2 * MiB
    assert e.fast_bytes_by_kind == {**dict.fromkeys(Kind, 0), Kind.SAVED_ACTIVATION: 2 * MiB}
    assert (e.phase, e.layer) == (Phase.FORWARD, "layer1")
    assert e.summary() == ("op 1 (aten::test, forward, layer layer1): 2.0 MiB fast = "
                           "saved activations 2.0 MiB")


def test_refusal_names_where_the_smallest_plan_peaks():
    trace = chain()
    with pytest.raises(sh.SentinelError) as refused:
        sh.plan(trace, MIGRATE, MiB, "sentinel")
    message = str(refused.value)
    assert "\n" not in message  # the CLI prints it as one line
    assert ("smallest it can honour is 2.0 MiB (2101248 bytes, 67%): raise the budget; the smallest plan "
            "peaks at op 1 (aten::test, forward, layer layer1): 2.0 MiB fast = saved "
            "activations 2.0 MiB; 100% is activations: a smaller batch or a chunked loss "
            "lowers it") in message


def _explanation(**by_kind: int) -> PeakExplanation:
    counts = {**dict.fromkeys(Kind, 0), **{Kind(k): v for k, v in by_kind.items()}}
    return PeakExplanation(7, "aten::mm", Phase.BACKWARD, "no layer", sum(counts.values()),
                           counts)


def test_hint_follows_what_fills_the_peak():
    state = _explanation(parameter=3 * MiB, gradient=2 * MiB, temporary=4 * MiB)
    assert state.hint == ("56% is model state: it needs more fast memory, or fewer parameters "
                          "kept in fast memory")
    temps = _explanation(parameter=3 * MiB, temporary=4 * MiB, saved_activation=MiB)
    assert temps.hint == "62% is activations: a chunked loss or a smaller batch lowers it"
    saved = _explanation(input=MiB, saved_activation=4 * MiB, temporary=MiB)
    assert saved.hint == "100% is activations: a smaller batch or a chunked loss lowers it"
    assert _explanation().hint == "nothing is in fast memory"
    assert state.describe("the smallest plan") == (
        "the smallest plan peaks at op 7 (aten::mm, backward, no layer): 9.0 MiB fast = "
        "temporaries 4.0 MiB, parameters 3.0 MiB, gradients 2.0 MiB; " + state.hint)


# --- a profiled step ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_trace() -> Trace:
    """One steady step of the tiny GPT (a warm-up step first, so optimizer state exists)."""
    wl = make_workload("gpt", "tiny")
    wl.step()
    return sh.profile(wl.step, model=wl.model, optimizer=wl.optimizer)


def test_profiled_step_all_fast_explanation_matches_the_trace(gpt_trace):
    ctx = context(gpt_trace, "h100-sxm")
    e = explain_peak(ctx, sh.plan(gpt_trace, "h100-sxm", "100%", "all-fast", ctx=ctx))
    assert e.op == gpt_trace.peak_op
    assert e.fast_bytes_by_kind == _live_by_kind(gpt_trace, e.op)
    assert sum(e.fast_bytes_by_kind.values()) == e.fast_bytes == gpt_trace.peak_bytes
    assert e.fast_bytes_by_kind[Kind.OPTIMIZER_STATE] > 0  # Adam's state lives all step


@pytest.mark.parametrize("policy", ["sentinel", "vdnn", "offload-all"])
def test_profiled_step_refusal_explains_the_smallest_plan(gpt_trace, policy):
    ctx = context(gpt_trace, "h100-sxm")
    with pytest.raises(sh.SentinelError) as refused:
        sh.plan(gpt_trace, "h100-sxm", "5%", policy, ctx=ctx)
    message = str(refused.value)
    m = re.search(r"the smallest plan peaks at op (\d+) \(([^,]+), (\w+), (.+?)\): ", message)
    assert m, message
    op = int(m[1])
    record = gpt_trace.ops[op]
    layer = "no layer" if record.layer is None else f"layer {gpt_trace.layers[record.layer].name}"
    assert (m[2], m[3], m[4]) == (record.name, record.phase.value, layer)
    # the op named is where the plan at the minimum budget peaks in replay
    need = min_budget(ctx, policy)
    result = sh.simulate(gpt_trace, sh.plan(gpt_trace, "h100-sxm", need, policy, ctx=ctx),
                         "h100-sxm")
    assert op == _peak_op(result)
    e = explain_min_budget(ctx, policy)
    assert e.op == op and e.fast_bytes == result.peak_fast_bytes
    assert sum(e.fast_bytes_by_kind.values()) == e.fast_bytes
    assert message.endswith(e.describe("the smallest plan"))


def test_the_floor_is_explained_once_per_context():
    # a sweep meets the same refusal many times: the explanation is kept with the context
    trace = chain()
    ctx = context(trace, MIGRATE)
    first = explain_min_budget(ctx, "sentinel")
    assert explain_min_budget(ctx, "sentinel") is first
    assert explain_min_budget(context(trace, MIGRATE), "sentinel") == first
    key = (id(ctx), "sentinel", min_budget(ctx, "sentinel"))
    assert planner._FLOORS[key] is first
    del ctx
    gc.collect()
    assert key not in planner._FLOORS


def test_a_runtime_floor_names_what_its_rules_keep_in_fast_memory():
    # the MLP's smallest runtime plan peaks in backward: the gradients flowing between
    # layers are temporaries no hook reaches, the input batch is the program's, and what an
    # autograd node unpacked stays until the node ends (the runtime acts at its events)
    wl = make_workload("mlp", "tiny")
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory="min", trials=0)
    for _ in range(3):  # two warm-up steps, then the profiled one
        with sentinel.step():
            wl.step()
    ctx = sentinel._ctx
    e = explain_min_budget(ctx, "sentinel")
    assert e.unmovable_bytes and sum(e.unmovable_bytes.values()) <= e.fast_bytes
    assert any("out of the runtime's reach" in why for why in e.unmovable_bytes)
    assert "cannot move: " in e.summary()
    # with every storage movable and no clock, no rule keeps anything
    full = explain_min_budget(context(ctx.trace, ctx.hardware), "sentinel")
    assert full.unmovable_bytes == {} and "cannot move" not in full.summary()
    sentinel.close()
