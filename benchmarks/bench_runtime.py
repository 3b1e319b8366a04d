"""Runtime overhead and cost: median step time with Sentinel over without, in the same run.

    python benchmarks/bench_runtime.py [--size small] [--steps 12]

At a budget of 100% nothing moves (target: at most 1.03 on the GPT and the CNN).
At 20% (or the smallest budget the plan allows, when 20% is refused) on the host
tiers the copies are real memcpy on this machine: the ratio says what they cost
here, where copies share two cores with compute. Plain and Sentinel steps
alternate; steady steps only (the warm-up, profiled and audited trial steps are
excluded), each paired with the plain step just before it. Writes
benchmarks/results/runtime_<size>_cpu<cores>_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from _common import RESULTS, environment, with_tuned_malloc, write_results

TARGET = {"gpt": 1.03, "cnn": 1.03}


def main() -> int:
    with_tuned_malloc()
    import torch

    import sentinel_hm as sh
    from sentinel_hm.workloads import make_workload

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="gpt,cnn")
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=16, help="steps per run (default 16)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()

    def run(name: str, budget: str) -> tuple[dict[str, object], dict[str, object]]:
        """Plain and Sentinel training of the same model, step by step in alternation, so
        that both see the same machine state (this machine is shared and noisy)."""
        torch.manual_seed(0)
        plain = make_workload(name, size=args.size, seed=0)
        torch.manual_seed(0)
        wl = make_workload(name, size=args.size, seed=0)
        sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget)
        plain_s: list[float] = []
        refused = None
        for i in range(args.steps):
            print(f"\r{name} {budget}: step {i + 1}/{args.steps}", end="", file=sys.stderr,
                  flush=True)
            start = time.perf_counter()
            plain.step()
            plain_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            try:
                with sentinel.step():
                    wl.step()
            except sh.SentinelError as e:
                refused = str(e)
                sentinel.fast_memory = "min"
        print(file=sys.stderr)
        st = sentinel.stats()
        sentinel.close()
        # pair each steady Sentinel step with the plain step just before it
        steady_steps = sentinel.steady_step_times
        paired_plain = plain_s[-len(steady_steps):]
        return ({"median_step_s": statistics.median(paired_plain), "steps": len(paired_plain)},
                {"median_step_s": statistics.median(steady_steps), "steps": len(steady_steps),
                 "budget_bytes": st["budget_bytes"],
                 "all_fast_peak_bytes": st["all_fast_peak_bytes"],
                 "audited_peak_fast_bytes": st["audited_peak_fast_bytes"],
                 "median_stall_s": st["median_stall_s"],
                 "bytes_to_slow_per_step": st["bytes_to_slow_per_step"],
                 "bytes_to_fast_per_step": st["bytes_to_fast_per_step"],
                 "predicted_step_s": st["predicted_step_s"], "refused": refused})

    rows = []
    for name in args.workloads.split(","):
        for budget in ("100%", "20%"):
            plain, ours = run(name, budget)
            ratio = ours["median_step_s"] / plain["median_step_s"]  # type: ignore[operator]
            rows.append({"workload": name, "budget": budget, "plain": plain, "sentinel": ours,
                         "ratio": ratio,
                         "target": TARGET.get(name) if budget == "100%" else None})
            print(f"{name} {budget}: x{ratio:.3f}", file=sys.stderr)

    env = environment(steps=args.steps)
    mib = 2**20
    lines = [f"# Runtime on host tiers, {env['day']}", "",
             f"`python benchmarks/bench_runtime.py --size {args.size} --steps {args.steps}` on "
             f"{env['cores']} CPU cores ({env['threads']} torch threads), torch {env['torch']}. "
             "Medians of steady steps; plain and Sentinel steps alternate in the same process.", "",
             "| workload | budget | plain (ms) | Sentinel (ms) | ratio | target | budget (MiB, % "
             "of peak) | measured peak (MiB) | out / in per step (MiB) | stall (ms) | "
             "predicted (ms) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        s, pl = r["sentinel"], r["plain"]
        budget = r["budget"] if not s["refused"] else f"{r['budget']} refused: min"
        lines.append(
            f"| {r['workload']}/{args.size} | {budget} | {pl['median_step_s'] * 1e3:.0f} | "
            f"{s['median_step_s'] * 1e3:.0f} | {r['ratio']:.3f} | "
            f"{'<= ' + str(r['target']) if r['target'] else '-'} | "
            f"{s['budget_bytes'] / mib:.1f} ({s['budget_bytes'] / s['all_fast_peak_bytes']:.0%}) | "
            f"{s['audited_peak_fast_bytes'] / mib:.1f} | "
            f"{s['bytes_to_slow_per_step'] / mib:.0f} / {s['bytes_to_fast_per_step'] / mib:.0f} | "
            f"{s['median_stall_s'] * 1e3:.1f} | {s['predicted_step_s'] * 1e3:.0f} |")
    lines += ["", "On this machine the host tiers' copies are memcpy on the same two cores as "
              "compute: they cannot hide behind it (PITFALLS.md), so the 20% rows show what "
              "moving the bytes costs here, not what a GPU's copy engines would."]
    write_results(args.out_dir, f"runtime_{args.size}_cpu{env['cores']}_{env['day']}",
                  {"env": env, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
