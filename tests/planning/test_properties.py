"""Properties of every policy on generated traces (hypothesis)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sentinel_hm as sh
from sentinel_hm.core.hardware import Access
from sentinel_hm.planning.planner import context
from sentinel_hm.planning.policies import DIRECT_ONLY, POLICIES

from .tracegen import MiB, hardware, layered

traces = st.builds(
    layered,
    n_layers=st.integers(1, 4),
    sizes=st.lists(st.integers(4096, 2 * MiB), min_size=1, max_size=6),
    durations=st.lists(st.floats(1e-5, 2e-3), min_size=1, max_size=6),
    saved_mask=st.lists(st.booleans(), min_size=1, max_size=4),
)
hardwares = st.builds(
    hardware,
    access=st.sampled_from([Access.DIRECT, Access.MIGRATE]),
    link_bytes_per_s=st.sampled_from([64 * MiB, 1024 * MiB, 16384 * MiB]),
    slow_ratio=st.sampled_from([2.0, 8.0, 100.0]),
)
EPS = 1e-12
# Policies that migrate without weighing the cost: on a slow link their copies hold fast
# memory and stall the step, and they can lose to never using fast memory at all (see the
# two tests at the end). Sentinel weighs its plans in simulation against the static one.
BLIND_MIGRATORS = {"page-lru", "vdnn", "offload-all"}
# recomputing every layer (wholly or its cheap ops) adds compute that keeping everything in
# slow memory does not pay
SLOWER_THAN_SLOW = BLIND_MIGRATORS | {"checkpoint-all", "checkpoint-selective"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trace=traces, hw=hardwares, share=st.floats(0.05, 1.0))
def test_policies_honour_the_budget_and_lie_between_the_bounds(trace, hw, share):
    ctx = context(trace, hw)
    budget = max(1, int(trace.peak_bytes * share))
    fast = sh.simulate(trace, sh.plan(trace, hw, "100%", "all-fast", ctx=ctx), hw).step_s
    try:  # the lower bound at the same budget (a smaller budget can add waits for room)
        slow = sh.simulate(trace, sh.plan(trace, hw, budget, "all-slow", ctx=ctx), hw).step_s
    except sh.SentinelError:
        slow = float("inf")
    times = {}
    for policy in POLICIES:
        if policy in DIRECT_ONLY and hw.access is not Access.DIRECT:
            continue
        try:
            plan = sh.plan(trace, hw, budget, policy, ctx=ctx)
        except sh.SentinelError:
            continue
        result = sh.simulate(trace, plan, hw)
        assert result.overflow_bytes == 0, policy
        assert result.peak_fast_bytes <= budget, policy
        assert max(result.fast_bytes) <= budget, policy
        assert fast - EPS <= result.step_s, policy
        if policy not in SLOWER_THAN_SLOW:
            assert result.step_s <= slow * (1 + 1e-9) + EPS, policy
        times[policy] = result.step_s
    if "sentinel" in times and "first-touch" in times:
        assert times["sentinel"] <= times["first-touch"] * (1 + 1e-9)


@settings(max_examples=30, deadline=None)
@given(trace=traces, hw=hardwares)
def test_sentinel_honours_its_own_minimum(trace, hw):
    """The minimum that refusals quote is a budget the policy does honour."""
    ctx = context(trace, hw)
    minimum = sh.planning.min_budget(ctx, "sentinel")
    plan = sh.plan(trace, hw, minimum, "sentinel", ctx=ctx)
    assert sh.simulate(trace, plan, hw).peak_fast_bytes <= minimum


def test_page_lru_can_thrash():
    trace = layered(n_layers=2, sizes=[40141, 4096], durations=[0.001953125, 1e-05],
                    saved_mask=[True])
    hw = hardware(Access.DIRECT, link_bytes_per_s=64 * MiB, slow_ratio=2.0)
    budget = trace.peak_bytes // 2
    lru = sh.simulate(trace, sh.plan(trace, hw, budget, "page-lru"), hw)
    slow = sh.simulate(trace, sh.plan(trace, hw, budget, "all-slow"), hw)
    assert lru.step_s > slow.step_s
    assert lru.bytes_to_fast > 0 and lru.stall_s > 0


def test_offloading_can_lose_to_all_slow_on_a_slow_link():
    trace = layered(n_layers=4, sizes=[4096], durations=[1e-05], saved_mask=[False])
    hw = hardware(Access.DIRECT, link_bytes_per_s=64 * MiB, slow_ratio=2.0)
    vdnn = sh.simulate(trace, sh.plan(trace, hw, "100%", "vdnn"), hw)
    slow = sh.simulate(trace, sh.plan(trace, hw, "100%", "all-slow"), hw)
    sentinel = sh.simulate(trace, sh.plan(trace, hw, "100%", "sentinel"), hw)
    assert vdnn.step_s > slow.step_s >= sentinel.step_s
