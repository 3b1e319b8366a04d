"""`make_plan` and `min_budget`: run a policy, check its plan in simulation, explain refusals
(`explain_min_budget`: what sets the smallest budget)."""

from __future__ import annotations

import weakref

from sentinel_hm.core.cost import CostModel
from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.plan import Plan
from sentinel_hm.core.presets import parse_hardware
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.explain import PeakExplanation, explain_peak
from sentinel_hm.planning.policies import (
    DIRECT_ONLY,
    POLICIES,
    REGISTRY,
    Context,
    Infeasible,
    recomputing,
)
from sentinel_hm.sim.replay import SimResult, simulate
from sentinel_hm.trace.model import Kind, Trace
from sentinel_hm.units import format_bytes, parse_budget

_MIN_BUDGET_RESOLUTION = 1 / 256  # bisection stops within this share of the all-fast peak

# explain_min_budget's answers by (id(ctx), policy, budget): a sweep meets the same refusal
# many times. A Context is unhashable, so it is keyed by id and dropped when it dies.
_FLOORS: dict[tuple[int, str, int], PeakExplanation] = {}


def context(
    trace: Trace,
    hardware: Hardware | str,
    *,
    movable: frozenset[Kind] | None = None,
    stream_optimizer: bool = True,
    clock: tuple[int, ...] | None = None,
    device: str | None = None,
    recompute: bool = False,
) -> Context:
    """What policies plan against; ``movable``/``stream_optimizer``/``clock``/``device``/
    ``recompute`` describe what the runtime that will execute the plan can do (see
    `Context`)."""
    hw = parse_hardware(hardware) if isinstance(hardware, str) else hardware
    return Context(trace, hw, CostModel(trace, hw), movable, stream_optimizer, clock=clock,
                   device=device, recompute=recompute)


def check_policy(policy: str, hardware: Hardware) -> None:
    if policy not in REGISTRY:
        raise SentinelError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    if policy in DIRECT_ONLY and hardware.access is not Access.DIRECT:
        raise SentinelError(
            f"policy {policy} models OS page placement, which needs direct access to the slow "
            f"tier; {hardware.name} uses {hardware.access.value} access: pick another policy"
        )


def _try(ctx: Context, budget: int, policy: str) -> tuple[Plan, SimResult] | None:
    """The policy's plan and its replay, or None if it does not honour ``budget``."""
    try:
        plan = REGISTRY[policy](ctx, budget)
    except Infeasible:
        return None
    step = recomputing(ctx, plan.recompute, plan.recompute_keeps)  # the step the plan runs
    result = simulate(step.trace, plan, ctx.hardware, cost=step.cost)
    if result.overflow_bytes or result.peak_fast_bytes > budget:
        return None
    return plan, result


def min_budget(ctx: Context, policy: str) -> int:
    """The smallest budget (to 1/256 of the all-fast peak) at which ``policy`` fits.

    Found by bisection, assuming a policy that fits a budget fits any larger one;
    remembered per context.
    """
    check_policy(policy, ctx.hardware)
    if policy in ctx.min_budgets:
        return ctx.min_budgets[policy]
    hi = ctx.trace.peak_bytes
    if _try(ctx, hi, policy) is None:
        hi *= 2  # a policy may need headroom above the peak (demand fetches)
        if _try(ctx, hi, policy) is None:
            raise SentinelError(f"policy {policy} does not fit even twice the all-fast peak")
    lo, step = 0, max(1, int(ctx.trace.peak_bytes * _MIN_BUDGET_RESOLUTION))
    while hi - lo > step:
        mid = (lo + hi) // 2
        if _try(ctx, mid, policy) is None:
            lo = mid
        else:
            hi = mid
    ctx.min_budgets[policy] = hi
    return hi


def explain_min_budget(ctx: Context, policy: str) -> PeakExplanation:
    """Where the policy's plan at `min_budget` peaks and what is live there: what sets the
    floor, so what would lower it (see `PeakExplanation.hint`)."""
    need = min_budget(ctx, policy)
    key = (id(ctx), policy, need)
    if key in _FLOORS:
        return _FLOORS[key]
    found = _try(ctx, need, policy)
    if found is None:  # min_budget saw this budget honoured; policies are deterministic
        raise SentinelError(f"policy {policy} no longer honours its minimum budget "
                            f"{format_bytes(need)}: this is a bug, please report it")
    if not any(k[0] == key[0] for k in _FLOORS):
        weakref.finalize(ctx, _forget, key[0])
    _FLOORS[key] = explain_peak(ctx, *found)
    return _FLOORS[key]


def _forget(ctx_id: int) -> None:
    for key in [k for k in _FLOORS if k[0] == ctx_id]:
        del _FLOORS[key]


def make_plan(
    trace: Trace,
    hardware: Hardware | str,
    budget: str | int,
    policy: str = "sentinel",
    *,
    ctx: Context | None = None,
    recompute: bool = True,
) -> Plan:
    """Plan ``trace`` on ``hardware`` within ``budget`` (bytes, "4GiB", or "20%" of the peak).

    ``recompute``: the sentinel policy may recompute layers instead of keeping or moving
    their saved activations (NOTE [Recompute as a trace]); ignored when ``ctx`` is given
    (its own ``recompute`` holds).

    Raises `SentinelError` naming the smallest budget the policy can honour
    when it cannot honour this one, and where that smallest plan peaks and what
    is live there (`explain_min_budget`).
    """
    ctx = ctx or context(trace, hardware, recompute=recompute)
    check_policy(policy, ctx.hardware)
    budget_bytes = parse_budget(budget, trace.peak_bytes)
    found = _try(ctx, budget_bytes, policy)
    if found is None:
        need = min_budget(ctx, policy)
        floor = explain_min_budget(ctx, policy)
        raise SentinelError(
            f"policy {policy} cannot honour a budget of {format_bytes(budget_bytes)} "
            f"({budget_bytes / trace.peak_bytes:.0%} of the all-fast peak) on "
            f"{ctx.hardware.name}: the smallest it can honour is {format_bytes(need)} "
            f"({need} bytes, {need / trace.peak_bytes:.0%}): raise the budget"
            + ("" if policy == "sentinel" else " or try policy=sentinel")
            + f"; {floor.describe('the smallest plan')}"
        )
    return found[0]
