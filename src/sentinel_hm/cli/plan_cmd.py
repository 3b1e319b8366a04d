"""``sentinel plan``: plan a trace on modeled hardware within a budget, save it, summarize it.

Also holds what the planning commands (plan, simulate, min-budget) share: the
trace and ``--hardware`` arguments, and the all-fast baseline every slowdown is
measured against.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sentinel_hm.core.plan import Plan, Tier
from sentinel_hm.core.presets import PRESETS, parse_hardware
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.explain import explain_peak
from sentinel_hm.planning.io import save_plan
from sentinel_hm.planning.planner import context, make_plan
from sentinel_hm.planning.policies import POLICIES, Context, recomputing
from sentinel_hm.sim.chrome import save_sim_chrome
from sentinel_hm.sim.replay import SimResult, simulate
from sentinel_hm.trace.io import load_trace
from sentinel_hm.units import format_bytes, parse_budget


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="plan where each tensor lives within a fast-memory budget",
        description="Plan a profiled step on modeled hardware within a fast-memory budget, "
                    "save the plan, and print its simulated cost.",
    )
    add_trace_args(p)
    p.add_argument("--budget", required=True,
                   help="fast-memory budget: a share of the all-fast peak ('20%%') or a size "
                        "('4GiB')")
    p.add_argument("--policy", default="sentinel", metavar="NAME",
                   help=f"one of {', '.join(POLICIES)} (default sentinel)")
    p.add_argument("--out", type=Path, default=Path("plan.json"),
                   help="plan file to write (.json or .json.gz; default plan.json)")
    p.add_argument("--chrome", type=Path, metavar="PATH",
                   help="also write the simulated step (ops, copies, stalls, fast bytes) in "
                        "Chrome trace format (Perfetto)")
    p.set_defaults(run=run)


def add_trace_args(p: argparse.ArgumentParser) -> None:
    """The trace file and ``--hardware``, as every planning command takes them."""
    p.add_argument("trace", type=Path, help="a trace file written by `sentinel profile`")
    p.add_argument("--hardware", required=True, metavar="SPEC",
                   help=f"a preset ({', '.join(PRESETS)}), a preset with overrides "
                        "('h100-sxm,h2d=50GB/s'), or a .json hardware file")
    p.add_argument("--no-recompute", dest="recompute", action="store_false",
                   help="the sentinel policy only keeps or moves saved activations (by "
                        "default it may also recompute layers: docs/planning.md)")


@dataclass(frozen=True)
class Setup:
    """A trace on one hardware: the shared planning context and the all-fast baseline."""

    ctx: Context
    all_fast: SimResult

    @property
    def peak(self) -> int:
        return self.ctx.trace.peak_bytes

    def slowdown(self, result: SimResult) -> float:
        return result.step_s / self.all_fast.step_s

    def budget_text(self, budget: int) -> str:
        return f"{format_bytes(budget)} ({budget:,} B, {budget / self.peak:.1%} of the peak)"

    def evaluate(
        self, budget: int, policy: str, *, timeline: bool = False
    ) -> tuple[Plan, SimResult]:
        """The policy's plan and its replay; `SentinelError` if the policy refuses."""
        ctx = self.ctx
        plan = make_plan(ctx.trace, ctx.hardware, budget, policy, ctx=ctx)
        return plan, simulate(ctx.trace, plan, ctx.hardware, cost=ctx.cost, timeline=timeline)


def load_setup(trace_path: Path, hardware_spec: str, recompute: bool = True) -> Setup:
    """Parse the hardware first (cheap, a common typo), then load the trace and build the
    context once; every plan of the command reuses it."""
    hw = parse_hardware(hardware_spec)
    trace = load_trace(trace_path)
    if trace.peak_bytes <= 0:
        raise SentinelError(f"{trace_path}: the trace holds no memory (peak 0 B): nothing to plan")
    ctx = context(trace, hw, recompute=recompute)
    plan = make_plan(trace, hw, trace.peak_bytes, "all-fast", ctx=ctx)
    return Setup(ctx, simulate(trace, plan, hw, cost=ctx.cost))


def check_policy_name(policy: str) -> str:
    if policy not in POLICIES:
        raise SentinelError(f"unknown policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return policy


def format_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def _info_value(key: str, value: object) -> str:
    if key == "layers_per_interval" and isinstance(value, float) and 0 < value < 1:
        return f"1/{round(1 / value)} layer"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict) and key.endswith("_bytes"):
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in value.items())
    if isinstance(value, dict):  # e.g. the interval-length search: label -> step s or reason
        return ", ".join(
            f"{k} {format_ms(v) if isinstance(v, float) else v}" for k, v in value.items()
        )
    return str(value)


def _moved_by_kind(ctx: Context, plan: Plan) -> str:
    """What the planned moves to fast memory carry, by kind of storage, most first: what the
    link must bring in each step."""
    storages = recomputing(ctx, plan.recompute, plan.recompute_keeps).trace.storages
    by_kind: dict[str, int] = {}
    for m in plan.moves:
        if m.to is Tier.FAST:
            kind = storages[m.storage].kind.value.replace("_", " ")
            by_kind[kind] = by_kind.get(kind, 0) + m.nbytes
    parts = [f"{kind} {format_bytes(n)}" for kind, n in
             sorted(by_kind.items(), key=lambda kv: -kv[1])]
    return "planned to fast by kind: " + (", ".join(parts) if parts else "nothing")


def _link_bound(setup: Setup, result: SimResult) -> list[str]:
    """A line when the traffic alone keeps one direction of the link busy for longer than the
    all-fast step: then no schedule hides the copies, only moving less does."""
    link = setup.ctx.hardware.link
    all_fast_s = setup.all_fast.step_s
    busy = [(direction, nbytes / bandwidth) for direction, nbytes, bandwidth in (
        ("to fast", result.bytes_to_fast, link.h2d_bytes_per_s),
        ("to slow", result.bytes_to_slow, link.d2h_bytes_per_s)) if nbytes]
    over = [(d, s) for d, s in busy if s > all_fast_s]
    if not over:
        return []
    parts = ", ".join(f"{d} {format_ms(s)}" for d, s in over)
    return [f"link-bound: the traffic alone keeps the link busy longer than the all-fast step "
            f"({format_ms(all_fast_s)}): {parts}; no schedule can hide that, a larger budget "
            "moves less"]


def _stalls(result: SimResult) -> str:
    """Where the replayed step waits: ops waiting for copies or room, by phase, and the copies
    still running after the last op."""
    text = f"stalls {format_ms(result.stall_s)}"
    parts = [f"{phase} {format_ms(s)}" for phase, s in result.stall_by_phase.items() if s > 0]
    tail = result.step_s - result.compute_s - result.stall_s
    if tail > 1e-6 * max(result.step_s, 1e-9):
        parts.append(f"copies after the last op {format_ms(tail)}")
    return f"{text} ({', '.join(parts)})" if parts else text


def summarize_plan(setup: Setup, plan: Plan, result: SimResult) -> str:
    """The lines ``sentinel plan`` prints: what was planned, what it costs in replay, and
    where it peaks (a refusal's error explains the smallest plan's peak the same way)."""
    hw = setup.ctx.hardware
    peak = explain_peak(setup.ctx, plan, result)
    to_fast = [m for m in plan.moves if m.to is Tier.FAST]
    lines = [
        f"plan: policy {plan.policy} on {hw.name}, budget {setup.budget_text(plan.budget_bytes)}"
        f"; all-fast peak {format_bytes(setup.peak)}",
        f"moves: {len(plan.moves)} ({len(to_fast)} to fast, {len(plan.moves) - len(to_fast)} "
        f"to slow), {len(plan.managed)} storages managed; planned "
        f"{format_bytes(plan.moved_bytes(Tier.FAST))} to fast, "
        f"{format_bytes(plan.moved_bytes(Tier.SLOW))} to slow",
        f"simulated step: {format_ms(result.step_s)}, x{setup.slowdown(result):.3f} over "
        f"all-fast ({format_ms(setup.all_fast.step_s)}); {_stalls(result)}",
        f"simulated traffic: {format_bytes(result.bytes_to_fast)} to fast, "
        f"{format_bytes(result.bytes_to_slow)} to slow; peak fast "
        f"{format_bytes(result.peak_fast_bytes)} ({result.peak_fast_bytes / plan.budget_bytes:.0%}"
        " of the budget)",
        _moved_by_kind(setup.ctx, plan),
        *_link_bound(setup, result),
        f"peak: {peak.summary()}; {peak.hint}",
    ]
    if plan.recompute:
        ctx = setup.ctx
        parts = []
        for i in plan.recompute:
            layer = ctx.recomputable[i]
            dropped = sum(ctx.trace.storages[sid].nbytes for sid in layer.saved)
            rerun = layer.rerun_s(ctx.cost.base_s)
            parts.append(f"{ctx.trace.layers[i].name} ({format_bytes(dropped)} saved, rerun "
                         f"{format_ms(rerun)})")
        lines.append("recomputed layers (their forward reruns before their backward): "
                     + ", ".join(parts))
    lines += [f"{key}: {_info_value(key, value)}" for key, value in plan.info.items()]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    check_policy_name(args.policy)
    setup = load_setup(args.trace, args.hardware, args.recompute)
    budget = parse_budget(args.budget, setup.peak)
    plan, result = setup.evaluate(budget, args.policy, timeline=args.chrome is not None)
    out = write_or_fail(lambda: save_plan(plan, args.out), args.out)
    print(f"wrote {out}", file=sys.stderr)
    if args.chrome:
        chrome = args.chrome
        step = recomputing(setup.ctx, plan.recompute, plan.recompute_keeps).trace  # the step the plan runs
        out = write_or_fail(lambda: save_sim_chrome(step, result, chrome), chrome)
        print(f"wrote {out}", file=sys.stderr)
    print(summarize_plan(setup, plan, result))
    return 0


def write_or_fail(write: Callable[[], Path], path: Path) -> Path:
    """Run ``write()``; an unwritable path becomes a one-line error, not a traceback."""
    try:
        return write()
    except OSError as e:
        raise SentinelError(f"{path}: cannot write: {e.strerror or e}") from None
