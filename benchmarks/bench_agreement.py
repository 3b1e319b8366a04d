"""Simulator against the runtime: predicted vs measured step and stall time under emulated links.

    python benchmarks/bench_agreement.py [--size small] [--steps 10]
    python benchmarks/bench_agreement.py --budgets 20% --links 16GB/s --no-stall

The reference GPT and CNN train under `throttled` tiers (host arenas joined by an
emulated link: each copy takes at least latency + bytes / bandwidth, see
tiers/throttled.py) at several bandwidths and budgets. For each case the
simulator predicts the step from the same trace, plan and hardware (the emulated
link is an exact description; op times are the profile's, with the per-op
overhead calibrated from the faster plain warm-up step). Target: median absolute error
of the step time at most 15% (each row also says whether its own error is).
A budget the runtime refuses is a row marked refused, with its message: nothing
falls back to another budget. Also measured in the same run (unless --no-stall):
stall time of sentinel and offload-all at the same budget on a link slow enough
that offload-all stalls.

Threads: torch computes on ``--threads`` threads (default: one fewer than the cores),
so that the mover threads have a core of their own, as a GPU's copy engines are
hardware of their own. The simulator models copies beside compute, not copies that
take compute's cores: with every core computing (``--threads`` = the cores), each
memcpy slows the compute beside it, and the prediction is low by about that. A
plain twin of each model steps in alternation with it, to show the link's cost.

Writes benchmarks/results/agreement_<size>[_<budgets>_<links>][_threads<n>]_cpu<cores>_<date>.*,
the middle parts only when --budgets or --links, or --threads, differ from the defaults.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

from _common import (
    RESULTS,
    add_threads_argument,
    environment,
    set_threads,
    with_tuned_malloc,
    write_results,
)

LINKS = ("16GB/s", "4GB/s", "1GB/s")
BUDGETS = ("50%", "min")
MAX_ERROR = 0.15  # |predicted - measured| / measured step time


def main() -> int:
    with_tuned_malloc()
    import torch

    import sentinel_hm as sh
    from sentinel_hm.planning.planner import make_plan
    from sentinel_hm.sim.replay import simulate
    from sentinel_hm.workloads import make_workload

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workloads", default="gpt,cnn")
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--links", default=",".join(LINKS), help="bandwidth each way, per case")
    p.add_argument("--no-stall", action="store_true",
                   help="skip the stall comparison (GPT, 60%%, 1GB/s)")
    add_threads_argument(p)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    threads = set_threads(p, args)

    def run(name: str, budget: str, link: str, policy: str = "sentinel") -> dict[str, object]:
        torch.manual_seed(0)
        wl = make_workload(name, size=args.size, seed=0)
        twin = make_workload(name, size=args.size, seed=0)  # plain, for the link's cost
        sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, policy=policy,
                               tiers=f"throttled:h2d={link},d2h={link},latency=10us")
        plain_s: list[float] = []
        for i in range(args.steps):
            print(f"\r{name} {budget} {link} {policy}: step {i + 1}/{args.steps}", end="",
                  file=sys.stderr, flush=True)
            start = time.perf_counter()
            twin.step()
            plain_s.append(time.perf_counter() - start)
            with sentinel.step():
                wl.step()
        print(file=sys.stderr)
        st = sentinel.stats()
        assert sentinel.prediction is not None
        steady = len(sentinel.steady_step_times)
        row = {"workload": name, "budget": budget, "link": link, "policy": policy,
               "budget_share": st["budget_bytes"] / st["all_fast_peak_bytes"],
               "measured_step_s": st["median_step_s"], "measured_stall_s": st["median_stall_s"],
               # the twin's steps beside the steady ones (the last `steady` of the run)
               "plain_step_s": statistics.median(plain_s[-steady:]) if steady else None,
               "predicted_step_s": sentinel.prediction.step_s,
               "predicted_stall_s": sentinel.prediction.stall_s,
               "steady_steps": steady,
               "audited_peak_fast_bytes": st["audited_peak_fast_bytes"],
               "budget_bytes": st["budget_bytes"], "chosen_interval": st["chosen_interval"],
               # what the prediction rests on: the warm-up step calibrates the per-op overhead
               "trials": st["trials"], "warmup_steps_s": sentinel._plain_step_s,
               "op_overhead_s": sentinel._ctx.hardware.op_overhead_s}
        row["error"] = (row["predicted_step_s"] - row["measured_step_s"]) / row["measured_step_s"]
        # the same prediction as a slowdown over all-fast, against the measured one over the
        # plain twin: free of the machine's speed drifting between warm-up and steady steps
        ctx = sentinel._ctx
        all_fast = simulate(sentinel.trace, make_plan(sentinel.trace, ctx.hardware,
                                                      sentinel.trace.peak_bytes, "all-fast",
                                                      ctx=ctx),
                            ctx.hardware, cost=ctx.cost)
        row["predicted_all_fast_s"] = all_fast.step_s
        row["predicted_ratio"] = row["predicted_step_s"] / all_fast.step_s
        if row["plain_step_s"]:
            row["measured_ratio"] = row["measured_step_s"] / row["plain_step_s"]
            row["ratio_error"] = (row["predicted_ratio"] - row["measured_ratio"]) \
                / row["measured_ratio"]
        sentinel.close()
        return row

    rows: list[dict[str, object]] = []
    refused: list[dict[str, str]] = []
    for w in args.workloads.split(","):
        for b in args.budgets.split(","):
            for link in args.links.split(","):
                try:
                    rows.append(run(w, b, link))
                except sh.SentinelError as e:  # a budget below this size's minimum
                    print(f"{w} {b} {link}: refused ({e})", file=sys.stderr)
                    refused.append({"workload": w, "budget": b, "link": link, "refused": str(e)})
    errors = [abs(r["error"]) for r in rows]  # type: ignore[arg-type]
    median_error = statistics.median(errors) if errors else None
    ratio_errors = [abs(r["ratio_error"]) for r in rows if "ratio_error" in r]  # type: ignore[arg-type]
    median_ratio_error = statistics.median(ratio_errors) if ratio_errors else None
    stall_cases = []
    stall_refused = None
    if not args.no_stall:
        try:
            stall_cases = [run("gpt", "60%", "1GB/s", policy)
                           for policy in ("sentinel", "offload-all")]
        except sh.SentinelError as e:
            print(f"stall comparison at 60%: refused ({e})", file=sys.stderr)
            stall_refused = str(e)

    env = environment(steps=args.steps)  # records the torch threads
    cases = ""
    if (args.budgets, args.links) != (",".join(BUDGETS), ",".join(LINKS)):
        cases = f" --budgets {args.budgets} --links {args.links}"
    command = (f"python benchmarks/bench_agreement.py --size {args.size} --steps {args.steps} "
               f"--workloads {args.workloads}{cases} --threads {args.threads}"
               f"{' --no-stall' if args.no_stall else ''}")
    lines = [f"# Simulator vs runtime under throttled links, {env['day']}", "",
             f"`{command}` on "
             f"{env['cores']} CPU cores ({env['threads']} torch threads), torch {env['torch']}. "
             "Measured: median of the steady steps of one run; predicted: the simulator on the "
             "same trace, plan and hardware (the emulated link, latency 10 us); plain: a twin "
             "of the model without Sentinel, stepped before each Sentinel step (median of as "
             "many of its last steps). "
             + ("The mover threads have a core of their own." if env["threads"] < env["cores"]
                else "Every core computes: copies take compute's cores, which the simulator "
                     "does not model."), "",
             "Two errors: of the step time as predicted, and of the slowdown (predicted step "
             "over the simulator's all-fast step, against measured step over the plain twin), "
             "which the machine's speed drifting between the warm-up steps (they calibrate "
             "the op times) and the steady ones does not move.", "",
             "| workload | budget | link | interval | plain (ms) | measured (ms) | "
             "measured over plain | predicted (ms) | predicted over all-fast | step error | "
             "slowdown error | n | measured stall (ms) | predicted stall (ms) |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio_error = f"{r['ratio_error']:+.1%}" if "ratio_error" in r else "-"
        lines.append(
            f"| {r['workload']}/{args.size} | {r['budget']} ({r['budget_share']:.0%}) | "
            f"{r['link']} | {r['chosen_interval'] or '-'} | {_ms(r['plain_step_s'])} | "
            f"{r['measured_step_s'] * 1e3:.0f} | {_over(r)} | "
            f"{r['predicted_step_s'] * 1e3:.0f} | x{r['predicted_ratio']:.2f} | "
            f"{r['error']:+.1%} | {ratio_error} | {r['steady_steps']} | "
            f"{r['measured_stall_s'] * 1e3:.1f} | {r['predicted_stall_s'] * 1e3:.1f} |")
    for r in refused:
        lines.append(f"| {r['workload']}/{args.size} | {r['budget']} **refused** (below) | "
                     f"{r['link']} |" + " - |" * 11)
    lines += [""]
    if median_error is not None:
        lines += [f"Median absolute error of the step time: **{median_error:.1%}**; of the "
                  f"slowdown: **{_pct(median_ratio_error)}** (target: at most {MAX_ERROR:.0%}): "
                  f"step time {_met(median_error)}, slowdown {_met(median_ratio_error)}."]
    else:
        lines += ["No case ran: no error to report (target **missed**)."]
    if refused:
        lines += ["", "Refused (the runtime's message, verbatim):", "",
                  *(f"- {r['workload']}/{args.size} at {r['budget']}, {r['link']}: {r['refused']}"
                    for r in refused)]
    if not args.no_stall:
        lines += ["", "## Stalls at the same budget on a slow link (GPT, 60%, 1 GB/s each way)",
                  ""]
        if stall_refused is not None:
            lines += [f"Refused: {stall_refused}"]
        else:
            lines += ["| policy | measured step (ms) | measured stall (ms) | predicted stall "
                      "(ms) |", "|---|---:|---:|---:|"]
        for r in stall_cases:
            lines.append(f"| {r['policy']} | {r['measured_step_s'] * 1e3:.0f} | "
                         f"{r['measured_stall_s'] * 1e3:.1f} | "
                         f"{r['predicted_stall_s'] * 1e3:.1f} |")
    tag = re.sub(r"[^A-Za-z0-9]+", "-", f"{args.budgets}_{args.links}".replace("%", "pct"))
    stem = (f"agreement_{args.size}{'_' + tag if cases else ''}{threads}_cpu{env['cores']}_"
            f"{env['day']}")
    write_results(args.out_dir, stem,
                  {"env": env, "rows": rows, "refused": refused, "median_abs_error": median_error,
                   "median_abs_ratio_error": median_ratio_error,
                   "stall": stall_cases, "stall_refused": stall_refused}, lines)
    return 0


def _ms(seconds: object) -> str:
    return "-" if seconds is None else f"{float(seconds) * 1e3:.0f}"  # type: ignore[arg-type]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _met(error: float | None) -> str:
    return "met" if error is not None and error <= MAX_ERROR else "**missed**"


def _over(r: dict[str, object]) -> str:
    plain = r["plain_step_s"]
    return "-" if not plain else f"x{float(r['measured_step_s']) / float(plain):.2f}"  # type: ignore[arg-type]


if __name__ == "__main__":
    raise SystemExit(main())
