"""``sentinel demo``: train the reference GPT with and without Sentinel and compare.

Same seed, same steps: plain training first, then training under Sentinel at a
20% budget (or the smallest budget the plan allows, said plainly). Prints step
times, the measured peak of fast-tier bytes against the budget, bytes moved,
and whether losses and final parameters are bitwise equal; writes
``sentinel-report/`` (a PNG of fast-tier bytes over one step with and without
Sentinel, the Chrome trace of an audited steady step, the trace and the plan).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sentinel_hm.cli.progress import progress
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.io import save_plan
from sentinel_hm.report.tables import format_table
from sentinel_hm.runtime import Sentinel, fast_bytes_curve
from sentinel_hm.trace import save_chrome_trace, save_trace
from sentinel_hm.units import format_bytes
from sentinel_hm.workloads import SIZES, make_workload


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the reference GPT with and without Sentinel",
                       description=__doc__.split("\n\n")[1] if __doc__ else None)
    p.add_argument("--size", default="small", choices=SIZES, help="GPT size (default small)")
    p.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    p.add_argument("--budget", default="20%", help="fast memory for Sentinel (default 20%%)")
    p.add_argument("--out-dir", type=Path, default=Path("sentinel-report"),
                   help="where to write the report (default sentinel-report)")
    p.set_defaults(run=run)


@dataclass
class _Run:
    losses: list[torch.Tensor]
    params: list[torch.Tensor]
    sentinel: Sentinel | None
    step_s: list[float]


def _train(args: argparse.Namespace, sentinel_budget: str | None) -> _Run:
    torch.manual_seed(0)
    wl = make_workload("gpt", size=args.size, seed=0)
    sentinel = Sentinel(wl.model, wl.optimizer, fast_memory=sentinel_budget) \
        if sentinel_budget else None
    label = "with Sentinel" if sentinel else "plain"
    losses: list[torch.Tensor] = []
    times: list[float] = []
    for i in range(args.steps):
        progress(f"{label}: step {i + 1}/{args.steps}")
        start = time.perf_counter()
        with sentinel.step() if sentinel else contextlib.nullcontext():
            losses.append(wl.step())
        times.append(time.perf_counter() - start)
    progress(f"{label}: {args.steps} steps done", done=True)
    return _Run(losses, [p.detach().clone() for p in wl.model.parameters()], sentinel, times)


def run(args: argparse.Namespace) -> int:
    if args.steps < 9:
        raise SentinelError(f"--steps {args.steps} is too few: Sentinel needs two warm-up "
                            "steps, a profiled step, up to three trial steps and an audited step "
                            "before steady steps; give 9 or more")
    plain = _train(args, None)
    ours = _train(args, args.budget)
    sentinel = ours.sentinel
    assert sentinel is not None and sentinel.trace is not None
    stats = sentinel.stats()
    same_losses = all(torch.equal(a, b) for a, b in zip(plain.losses, ours.losses, strict=True))
    same_params = all(torch.equal(a, b) for a, b in zip(plain.params, ours.params, strict=True))
    t_plain = statistics.median(plain.step_s[1:])  # the first step pays one-off costs
    t_ours = stats["median_step_s"]
    peak, budget = stats["audited_peak_fast_bytes"], stats["budget_bytes"]
    all_fast = stats["all_fast_peak_bytes"]
    rows = [
        ("step time (median)", f"{t_plain * 1e3:.0f} ms", f"{t_ours * 1e3:.0f} ms",
         f"x{t_ours / t_plain:.2f}"),
        ("fast-tier peak (measured)", format_bytes(all_fast), format_bytes(peak),
         f"{peak / all_fast:.0%} of plain"),
        ("budget", "-", f"{format_bytes(budget)} ({budget / all_fast:.0%})",
         "within" if peak <= budget else "OVER"),
        ("moved per step", "-", f"{format_bytes(stats['bytes_to_slow_per_step'])} out, "
         f"{format_bytes(stats['bytes_to_fast_per_step'])} in", ""),
        ("stall per step", "-", f"{stats['median_stall_s'] * 1e3:.1f} ms", ""),
        ("predicted (simulator)", "-", f"{stats['predicted_step_s'] * 1e3:.0f} ms, peak "
         f"{format_bytes(stats['predicted_peak_fast_bytes'])}", ""),
        ("losses bitwise equal", "", "yes" if same_losses else "NO", ""),
        ("final parameters bitwise equal", "", "yes" if same_params else "NO", ""),
    ]
    print(f"GPT/{args.size}, {args.steps} steps each, tiers: {stats['tiers']}")
    print("\n".join(format_table(("", "plain", "Sentinel", ""), rows, left=1)))
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    save_trace(sentinel.trace, out / "trace.json.gz")
    if sentinel.plan is not None:
        save_plan(sentinel.plan, out / "plan.json")
    written = [out / "trace.json.gz", out / "plan.json"]
    audit = sentinel.audit_trace
    if audit is not None:
        written.append(save_chrome_trace(audit, out / "steady_step.chrome.json"))
        try:
            from sentinel_hm.report.plots import plot_fast_bytes

            written.append(plot_fast_bytes(
                {"plain": sentinel.trace.live_bytes, "with Sentinel": fast_bytes_curve(audit)},
                out / "fast_bytes.png", budget_bytes=budget,
                title=f"GPT/{args.size}: fast-tier bytes over one step"))
        except SentinelError as e:
            print(f"no PNG: {e}", file=sys.stderr)
    print("\nwrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0 if same_losses and same_params and peak <= budget else 1
