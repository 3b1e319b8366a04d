"""``sentinel min-budget``: the smallest fast-memory budget within a given slowdown.

The question a user sizing hardware asks: "how little fast memory can I buy
and stay within 5% of all-fast?" Answered by bisection over the budget, each
probe a plan replayed in simulation. Bisection assumes more fast memory is
never slower; where a policy breaks that, the answer still meets the limit
but a smaller budget may too (``sentinel simulate`` over a finer range shows it).
"""

from __future__ import annotations

import argparse
import math

from sentinel_hm.cli.plan_cmd import (
    Setup,
    add_trace_args,
    check_policy_name,
    format_ms,
    load_setup,
)
from sentinel_hm.cli.progress import progress
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.planner import min_budget
from sentinel_hm.planning.policies import POLICIES
from sentinel_hm.units import format_bytes

RESOLUTION = 1 / 256  # of the all-fast peak, as `min_budget` bisects


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "min-budget",
        help="smallest budget whose simulated slowdown stays within a limit",
        description="Find the smallest fast-memory budget (to 1/256 of the all-fast peak) at "
                    "which the policy's plan, replayed in simulation, is at most --max-slowdown "
                    "slower than all-fast on the same hardware. Bisection: the answer meets "
                    "the limit, and is the smallest such budget when the slowdown does not grow "
                    "with the budget. Exit status 1 when even the all-fast peak is not enough.",
    )
    add_trace_args(p)
    p.add_argument("--max-slowdown", required=True, metavar="SHARE",
                   help="allowed slowdown over all-fast: '5%%' or 0.05")
    p.add_argument("--policy", default="sentinel", metavar="NAME",
                   help=f"one of {', '.join(POLICIES)} (default sentinel)")
    p.set_defaults(run=run)


def parse_share(text: str) -> float:
    """``'5%'`` or ``'0.05'`` -> 0.05. A bare number of 1 or more is refused as ambiguous
    (``5`` could mean 5% or 500%); write such limits as percentages (``'150%'``)."""
    raw = text.strip()
    percent = raw.endswith("%")
    try:
        value = float(raw[:-1] if percent else raw)
    except ValueError:
        value = math.nan
    example = "write e.g. '5%' or 0.05"
    if not math.isfinite(value):
        raise SentinelError(f"--max-slowdown {text!r} is not a share; {example}")
    if value < 0:
        raise SentinelError(f"--max-slowdown {text!r} is negative; {example}")
    if percent:
        return value / 100
    if value >= 1:
        raise SentinelError(
            f"--max-slowdown {text!r} is ambiguous as a bare number: write {value:g}% for "
            f"{value:g} percent, or {value * 100:g}% for x{1 + value:g} the all-fast step time"
        )
    return value


def _slowdown(setup: Setup, budget: int, policy: str) -> float | None:
    """Simulated slowdown of the policy's plan at ``budget``; None if the policy refuses."""
    try:
        _plan, result = setup.evaluate(budget, policy)
    except SentinelError:
        return None
    return setup.slowdown(result)


def run(args: argparse.Namespace) -> int:
    limit = parse_share(args.max_slowdown)
    policy = check_policy_name(args.policy)
    setup = load_setup(args.trace, args.hardware, args.recompute)
    peak, hw = setup.peak, setup.ctx.hardware
    target = 1 + limit
    print(f"min-budget: policy {policy} on {hw.name}, at most x{target:.4g} the all-fast step "
          f"({format_ms(setup.all_fast.step_s)} simulated); all-fast peak {format_bytes(peak)}")

    progress(f"min-budget: smallest budget {policy} can honour")
    lo = min_budget(setup.ctx, policy)  # SentinelError (exit 2) if it never fits
    hi = max(lo, peak)  # some policies need headroom above the peak
    probes = 0

    def meets(budget: int) -> tuple[bool, float | None]:
        nonlocal probes
        probes += 1
        progress(f"min-budget: probe {probes}, budget {format_bytes(budget)}")
        s = _slowdown(setup, budget, policy)
        return s is not None and s <= target * (1 + 1e-12), s

    ok, slowdown = meets(lo)
    if not ok:
        ok, slowdown = meets(hi)
        if not ok:
            progress(f"min-budget: {probes} probe{'s' if probes > 1 else ''}", done=True)
            shown = "refused" if slowdown is None else f"x{slowdown:.3f}"
            print(f"not reached: at {setup.budget_text(hi)} policy {policy} is {shown}, over "
                  f"x{target:.4g}; allow more slowdown or try --policy sentinel")
            return 1
        step = max(1, math.floor(peak * RESOLUTION))
        while hi - lo > step:  # invariant: lo misses the limit, hi meets it
            mid = (lo + hi) // 2
            mid_ok, mid_slowdown = meets(mid)
            if mid_ok:
                hi, slowdown = mid, mid_slowdown
            else:
                lo = mid
        lo = hi
    progress(f"min-budget: {probes} probe{'s' if probes > 1 else ''}", done=True)
    assert slowdown is not None
    print(f"budget: {setup.budget_text(lo)}, slowdown x{slowdown:.3f} "
          f"(resolution {format_bytes(max(1, math.floor(peak * RESOLUTION)))})")
    return 0
