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
that offload-all stalls. Writes
benchmarks/results/agreement_<size>[_<budgets>_<links>]_cpu<cores>_<date>.*, the
middle part only when --budgets or --links differ from the defaults.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

from _common import RESULTS, environment, with_tuned_malloc, write_results

LINKS = ("16GB/s", "4GB/s", "1GB/s")
BUDGETS = ("50%", "min")
MAX_ERROR = 0.15  # |predicted - measured| / measured step time


def main() -> int:
    with_tuned_malloc()
    import torch

    import sentinel_hm as sh
    from sentinel_hm.workloads import make_workload

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--workloads", default="gpt,cnn")
    p.add_argument("--budgets", default=",".join(BUDGETS))
    p.add_argument("--links", default=",".join(LINKS), help="bandwidth each way, per case")
    p.add_argument("--no-stall", action="store_true",
                   help="skip the stall comparison (GPT, 60%%, 1GB/s)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()

    def run(name: str, budget: str, link: str, policy: str = "sentinel") -> dict[str, object]:
        torch.manual_seed(0)
        wl = make_workload(name, size=args.size, seed=0)
        sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, policy=policy,
                               tiers=f"throttled:h2d={link},d2h={link},latency=10us")
        for i in range(args.steps):
            print(f"\r{name} {budget} {link} {policy}: step {i + 1}/{args.steps}", end="",
                  file=sys.stderr, flush=True)
            with sentinel.step():
                wl.step()
        print(file=sys.stderr)
        st = sentinel.stats()
        assert sentinel.prediction is not None
        row = {"workload": name, "budget": budget, "link": link, "policy": policy,
               "budget_share": st["budget_bytes"] / st["all_fast_peak_bytes"],
               "measured_step_s": st["median_step_s"], "measured_stall_s": st["median_stall_s"],
               "predicted_step_s": sentinel.prediction.step_s,
               "predicted_stall_s": sentinel.prediction.stall_s,
               "steady_steps": len(sentinel.steady_step_times),
               "audited_peak_fast_bytes": st["audited_peak_fast_bytes"],
               "budget_bytes": st["budget_bytes"], "chosen_interval": st["chosen_interval"],
               # what the prediction rests on: the warm-up step calibrates the per-op overhead
               "trials": st["trials"], "warmup_steps_s": sentinel._plain_step_s,
               "op_overhead_s": sentinel._ctx.hardware.op_overhead_s}
        row["error"] = (row["predicted_step_s"] - row["measured_step_s"]) / row["measured_step_s"]
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
    stall_cases = []
    stall_refused = None
    if not args.no_stall:
        try:
            stall_cases = [run("gpt", "60%", "1GB/s", policy)
                           for policy in ("sentinel", "offload-all")]
        except sh.SentinelError as e:
            print(f"stall comparison at 60%: refused ({e})", file=sys.stderr)
            stall_refused = str(e)

    env = environment(steps=args.steps)
    cases = ""
    if (args.budgets, args.links) != (",".join(BUDGETS), ",".join(LINKS)):
        cases = f" --budgets {args.budgets} --links {args.links}"
    command = (f"python benchmarks/bench_agreement.py --size {args.size} --steps {args.steps} "
               f"--workloads {args.workloads}{cases}{' --no-stall' if args.no_stall else ''}")
    lines = [f"# Simulator vs runtime under throttled links, {env['day']}", "",
             f"`{command}` on "
             f"{env['cores']} CPU cores ({env['threads']} torch threads), torch {env['torch']}. "
             "Measured: median of the steady steps of one run; predicted: the simulator on the "
             "same trace, plan and hardware (the emulated link, latency 10 us).", "",
             "| workload | budget | link | interval | measured step (ms) | predicted (ms) | "
             "error | within 15% | n | measured stall (ms) | predicted stall (ms) |",
             "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['workload']}/{args.size} | {r['budget']} ({r['budget_share']:.0%}) | "
            f"{r['link']} | {r['chosen_interval'] or '-'} | {r['measured_step_s'] * 1e3:.0f} | "
            f"{r['predicted_step_s'] * 1e3:.0f} | {r['error']:+.1%} | "
            f"{'yes' if abs(r['error']) <= MAX_ERROR else '**no**'} | {r['steady_steps']} | "
            f"{r['measured_stall_s'] * 1e3:.1f} | {r['predicted_stall_s'] * 1e3:.1f} |")
    for r in refused:
        lines.append(f"| {r['workload']}/{args.size} | {r['budget']} **refused** (below) | "
                     f"{r['link']} |" + " - |" * 8)
    lines += [""]
    if median_error is not None:
        lines += [f"Median absolute error of the step time: **{median_error:.1%}** (target: at "
                  f"most {MAX_ERROR:.0%}): {'met' if median_error <= MAX_ERROR else '**missed**'}."]
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
    stem = f"agreement_{args.size}{'_' + tag if cases else ''}_cpu{env['cores']}_{env['day']}"
    write_results(args.out_dir, stem,
                  {"env": env, "rows": rows, "refused": refused, "median_abs_error": median_error,
                   "stall": stall_cases, "stall_refused": stall_refused}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
