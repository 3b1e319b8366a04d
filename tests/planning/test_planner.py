"""Planner on hand-built traces with known optimal plans: not binding, binding, infeasible."""

from __future__ import annotations

import dataclasses

import pytest

import sentinel_hm as sh
from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Move, Tier
from sentinel_hm.planning.planner import context, min_budget

from .tracegen import MiB, chain, hardware

MIGRATE = hardware(Access.MIGRATE)
DIRECT = hardware(Access.DIRECT, slow_ratio=100)  # ops become memory-bound on slow data


def test_chain_fixture_is_what_the_tests_assume():
    trace = chain()
    assert trace.live_bytes == (MiB, 2 * MiB, 3 * MiB, 3 * MiB, 2 * MiB, MiB)
    assert trace.peak_bytes == 3 * MiB


def test_budget_not_binding_moves_nothing():
    trace = chain()
    plan = sh.plan(trace, MIGRATE, "100%", "sentinel")
    assert plan.moves == () and plan.placement == {}
    fast = sh.simulate(trace, sh.plan(trace, MIGRATE, "100%", "all-fast"), MIGRATE)
    assert sh.simulate(trace, plan, MIGRATE).step_s == fast.step_s


def test_budget_binding_evicts_the_activation_needed_last():
    # At 2 MiB one activation must leave while f2 and b2 run. A0 (last read by f1) is needed
    # again last, by b0; A1 is read by f2 and needed again by b1, too soon to leave. Optimal:
    # move A0 only: out after f1, back one interval before b0.
    trace = chain()
    plan = sh.plan(trace, MIGRATE, 2 * MiB, "sentinel")
    assert set(plan.moves) == {Move(0, Tier.SLOW, 2, MiB), Move(0, Tier.FAST, 4, MiB)}
    result = sh.simulate(trace, plan, MIGRATE)
    assert result.peak_fast_bytes == 2 * MiB
    assert result.bytes_to_slow == result.bytes_to_fast == MiB
    # f2 must wait for A0's eviction to make room for A2 (no schedule avoids it: A0 is read
    # until f1 ends); A0's prefetch hides behind b1.
    copy_s = MiB / MIGRATE.link.d2h_bytes_per_s
    assert result.stall_s == pytest.approx(copy_s)
    assert result.step_s == pytest.approx(6e-3 + copy_s)


def test_budget_infeasible_names_the_minimum():
    # b2 holds A2 while A1 must arrive for b1: 2 MiB is the least any schedule needs.
    trace = chain()
    with pytest.raises(sh.SentinelError, match=r"smallest it can honour is 2\.0 MiB"):
        sh.plan(trace, MIGRATE, MiB, "sentinel")


def test_all_fast_refuses_below_the_peak_and_all_slow_is_slowest():
    trace = chain()
    with pytest.raises(sh.SentinelError, match="all-fast"):
        sh.plan(trace, MIGRATE, "50%", "all-fast")
    fast = sh.simulate(trace, sh.plan(trace, DIRECT, "100%", "all-fast"), DIRECT).step_s
    slow = sh.simulate(trace, sh.plan(trace, DIRECT, "100%", "all-slow"), DIRECT).step_s
    assert slow > fast


def test_slow_link_stalls_exactly():
    # 1 MiB over 256 MiB/s takes c = 3.9 ms; ops take 1 ms. A0's eviction starts after f1:
    # f2 waits c for room. A0's prefetch is issued at b1 and lands c later; b0 waits c - 1 ms.
    slow_link = hardware(Access.MIGRATE, link_bytes_per_s=256 * MiB)
    trace = chain()
    result = sh.simulate(trace, sh.plan(trace, slow_link, 2 * MiB, "sentinel"), slow_link)
    c = MiB / (256 * MiB)
    assert result.stall_s == pytest.approx(c + (c - 1e-3))
    assert result.step_s == pytest.approx(6e-3 + result.stall_s)


def test_a_runtime_moves_only_storages_on_the_fast_tiers_device():
    # a CUDA runtime: activations on the GPU, one (Adam's step count, say) on the CPU
    trace = chain(n_layers=6)
    on_cpu = trace.storages[2]
    trace = dataclasses.replace(trace, storages=tuple(
        dataclasses.replace(s, device="cpu" if s.id == on_cpu.id else "cuda:0")
        for s in trace.storages))
    hw = hardware(Access.MIGRATE)
    gpu = context(trace, hw, device="cuda:0")
    assert not gpu.may_move(trace.storages[on_cpu.id]) and gpu.may_move(trace.storages[0])
    for policy in ("sentinel", "all-slow"):
        plan = sh.plan(trace, hw, min_budget(gpu, policy), policy, ctx=gpu)
        assert on_cpu.id not in plan.managed
        assert plan.managed  # the others still move
    # without a device (the planner on its own) every storage may move
    assert context(trace, hw).may_move(trace.storages[on_cpu.id])
