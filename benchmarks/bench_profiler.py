"""Profiler overhead: median profiled-step time over median plain-step time, per workload.

Plain and profiled steps alternate on the same model in the same run, so both
see the same machine state. Target (issue 2): at most 1.25 for the GPT and the CNN.

    python benchmarks/bench_profiler.py [--size small] [--repeats 7] [--workloads gpt,cnn]

Writes benchmarks/results/profiler_<size>_cpu<cores>_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from _common import RESULTS, TUNABLES, environment, with_tuned_malloc, write_results

TARGET = {"gpt": 1.25, "cnn": 1.25}


def main() -> int:
    with_tuned_malloc()
    import torch

    import sentinel_hm as sh
    from sentinel_hm.trace.crosscheck import profile_with_reference, step_allocated_peak
    from sentinel_hm.workloads import WORKLOADS, make_workload

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--size", default="small")
    p.add_argument("--repeats", type=int, default=7, help="timed pairs of steps (default 7)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.workloads.split(","):
        wl = make_workload(name, size=args.size, seed=0)
        for _ in range(2):
            wl.step()
        plain, profiled, ops = [], [], 0
        for i in range(args.repeats):
            print(f"\r{name}/{args.size}: pair {i + 1}/{args.repeats}", end="", file=sys.stderr,
                  flush=True)
            start = time.perf_counter()
            wl.step()
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            trace = sh.profile(wl.step, model=wl.model, optimizer=wl.optimizer)
            profiled.append(time.perf_counter() - start)
            ops = len(trace.ops)
        row = {
            "workload": name,
            "size": args.size,
            "ops": ops,
            "plain_median_s": statistics.median(plain),
            "profiled_median_s": statistics.median(profiled),
            "plain_s": plain,
            "profiled_s": profiled,
        }
        row["ratio"] = row["profiled_median_s"] / row["plain_median_s"]
        # one more profiled step, under torch.profiler: traced peak vs allocator-level peak
        trace, reference = profile_with_reference(wl.step, model=wl.model, optimizer=wl.optimizer)
        row["traced_peak_bytes"] = step_allocated_peak(trace)
        row["torch_profiler_peak_bytes"] = reference
        row["target"] = TARGET.get(name) if args.size == "small" else None  # default size
        rows.append(row)
        print(f"\r{name}/{args.size}: plain {row['plain_median_s'] * 1e3:.1f} ms, profiled "
              f"{row['profiled_median_s'] * 1e3:.1f} ms, ratio {row['ratio']:.3f}",
              file=sys.stderr)

    env = environment(host=platform.node(), cpu=platform.processor() or platform.machine(),
                      glibc_tunables=TUNABLES, repeats=args.repeats)
    lines = [
        f"# Profiler overhead, {env['day']}",
        "",
        f"`python benchmarks/bench_profiler.py --size {args.size} --repeats {args.repeats}` on "
        f"{env['cores']} CPU cores ({env['threads']} torch threads), torch {env['torch']}, "
        f"Python {env['python']}, GLIBC_TUNABLES set. Medians of {args.repeats} alternating "
        "plain/profiled steps of the same model.",
        "",
        "| workload | ops | plain step (ms) | profiled step (ms) | ratio | target "
        "| traced peak / torch.profiler peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        target = f"<= {r['target']}" if r["target"] else "-"
        lines.append(
            f"| {r['workload']}/{r['size']} | {r['ops']} | {r['plain_median_s'] * 1e3:.1f} | "
            f"{r['profiled_median_s'] * 1e3:.1f} | {r['ratio']:.3f} | {target} | "
            f"{r['traced_peak_bytes'] / r['torch_profiler_peak_bytes']:.3f} |"
        )
    lines += [
        "",
        "The last column compares the trace's peak of step-allocated bytes with torch.profiler's "
        "allocator-level peak for one step; below 1 means kernel scratch buffers the trace cannot "
        "see (oneDNN convolution and RNN workspaces).",
    ]
    write_results(args.out_dir, f"profiler_{args.size}_cpu{env['cores']}_{env['day']}",
                  {"env": env, "rows": rows}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
