"""Keep, move or recompute in real training: Sentinel with and without recomputation, and
full activation checkpointing, each against a plain twin in the same run.

    python benchmarks/bench_recompute.py [--size small] [--steps 12] [--workloads gpt,cnn]
                                         [--links "throttled:h2d=2GB/s,d2h=2GB/s;..."]
                                         [--threads N]

On the throttled host tiers (the emulated link at 0.25, 2 and 8 GB/s each way), each
workload runs: Sentinel at 20% with recompute=False (at its "min" when 20% is refused),
Sentinel at the same budget in bytes with recompute=True, and plain training with every
detected layer wrapped in torch.utils.checkpoint (no Sentinel; its fast-memory peak is one
profiled step's). Each is stepped in alternation with a plain twin (same seed, own RNG
state): ratios are medians of steady steps over the paired plain step. Sentinel rows are
checked bit for bit against the twin (losses and final parameters) and give the simulator's
prediction for the plan that ran; target: measured within 15% of it. Torch computes on
``--threads`` threads (default: the cores but one), so that the mover threads have a core of
their own, as in bench_agreement.py. Writes
benchmarks/results/recompute_<size>[_threads<n>]_cpu<cores>_<date>.json and .md (the middle
part when --threads is not the default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

from _common import (
    RESULTS,
    add_threads_argument,
    environment,
    set_threads,
    with_tuned_malloc,
    write_results,
)

# the two links, and one slow enough that a 2-core CPU's compute cannot hide the copies
LINKS = "throttled:h2d=0.25GB/s,d2h=0.25GB/s;throttled:h2d=2GB/s,d2h=2GB/s;" \
        "throttled:h2d=8GB/s,d2h=8GB/s"
MAX_PREDICTION_ERROR = 0.15


def main() -> int:
    with_tuned_malloc()
    import torch
    import torch.utils.checkpoint

    import sentinel_hm as sh
    from sentinel_hm.trace.layers import find_layers
    from sentinel_hm.workloads import make_workload

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="gpt,cnn")
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=12, help="steps per run (default 12)")
    p.add_argument("--links", default=LINKS, help="tiers specs separated by ';'")
    add_threads_argument(p)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    threads = set_threads(p, args)

    def run(name: str, tiers: str, mode: str, budget: str | int) -> dict[str, Any]:
        plain = make_workload(name, size=args.size, seed=0)
        wl = make_workload(name, size=args.size, seed=0)
        sentinel = None
        row: dict[str, Any] = {"workload": name, "tiers": tiers, "mode": mode}
        if mode == "checkpoint every layer":
            for _, module in find_layers(wl.model):
                module.forward = partial(torch.utils.checkpoint.checkpoint, module.forward,
                                         use_reentrant=False)
            wl.step()  # the profile below must see a step like the timed ones
            row["peak_bytes"] = sh.profile(wl.step, model=wl.model,
                                           optimizer=wl.optimizer).peak_bytes
            plain.step()
            plain.step()  # the twin has taken as many steps
        else:
            sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, tiers=tiers,
                                   recompute=mode == "sentinel, recompute")
        rng = {"plain": torch.get_rng_state(), "ours": torch.get_rng_state()}
        losses: dict[str, list[torch.Tensor]] = {"plain": [], "ours": []}
        pairs: list[tuple[float, float]] = []
        for i in range(args.steps):
            print(f"\r{name} {tiers} {mode}: step {i + 1}/{args.steps}", end="",
                  file=sys.stderr, flush=True)
            if sentinel is not None and i == args.steps - 1:
                sentinel.audit()
            torch.set_rng_state(rng["plain"])
            start = time.perf_counter()
            losses["plain"].append(plain.step())
            plain_s = time.perf_counter() - start
            rng["plain"] = torch.get_rng_state()
            torch.set_rng_state(rng["ours"])
            timed = len(sentinel.steady_step_times) if sentinel else i
            start = time.perf_counter()
            try:
                if sentinel is None:
                    losses["ours"].append(wl.step())
                else:
                    with sentinel.step():
                        losses["ours"].append(wl.step())
            except sh.SentinelError as e:
                row["refused"] = str(e)
                break
            ours_s = time.perf_counter() - start
            rng["ours"] = torch.get_rng_state()
            steady = len(sentinel.steady_step_times) > timed if sentinel else i >= 2
            if steady:
                pairs.append((plain_s, ours_s))
        print(file=sys.stderr)
        if sentinel is not None:
            st = sentinel.stats()
            row.update({k: st[k] for k in (
                "phase", "budget_bytes", "all_fast_peak_bytes", "audited_peak_fast_bytes",
                "predicted_step_s", "plain_step_s", "bytes_to_slow_per_step", "median_stall_s",
                "recomputed_layers", "profiles")})
            sentinel.close()
            row["bitwise"] = (len(losses["plain"]) == len(losses["ours"]) and all(
                torch.equal(a, b) for a, b in zip(losses["plain"], losses["ours"], strict=True))
                and all(torch.equal(a, b) for a, b in zip(
                    plain.model.parameters(), wl.model.parameters(), strict=True)))
        if pairs:
            row["paired_steps"] = len(pairs)
            row["plain_median_step_s"] = statistics.median(a for a, _ in pairs)
            row["median_step_s"] = statistics.median(b for _, b in pairs)
            row["ratio"] = row["median_step_s"] / row["plain_median_step_s"]
            if row.get("predicted_step_s"):
                row["prediction_error"] = row["median_step_s"] / row["predicted_step_s"] - 1
                # the prediction as a slowdown over the plain warm-up step it is calibrated on,
                # against the measured one over the plain twin: free of the machine's speed
                # drifting between warm-up and steady steps
                row["predicted_ratio"] = row["predicted_step_s"] / row["plain_step_s"]
                row["ratio_error"] = row["ratio"] / row["predicted_ratio"] - 1
        return row

    rows = []
    for name in args.workloads.split(","):
        for tiers in args.links.split(";"):
            base = run(name, tiers, "sentinel, no recompute", "20%")
            if "refused" in base:
                base = run(name, tiers, "sentinel, no recompute", "min")
                base["asked"] = "min (20% refused)"
            else:
                base["asked"] = "20%"
            rows.append(base)
            budget = base.get("budget_bytes") or "min"
            rows.append(run(name, tiers, "sentinel, recompute", budget) | {"asked": budget})
            rows.append(run(name, tiers, "checkpoint every layer", budget))
    env = environment(steps=args.steps)
    lines = report(args, env, rows)
    write_results(args.out_dir, f"recompute_{args.size}{threads}_cpu{env['cores']}_{env['day']}",
                  {"env": env, "size": args.size, "rows": rows,
                   "max_prediction_error": MAX_PREDICTION_ERROR}, lines)
    return 0


def report(args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]]
           ) -> list[str]:
    def mib(x: Any) -> str:
        return "-" if not isinstance(x, int | float) else f"{x / 2**20:.1f}"

    def ms(x: Any) -> str:
        return "-" if not isinstance(x, int | float) else f"{x * 1e3:.0f}"

    lines = [f"# Keep, move or recompute on throttled host tiers, {env['day']}", "",
             f"`python benchmarks/bench_recompute.py --size {args.size} --steps {args.steps} "
             f"--workloads {args.workloads} --threads {args.threads}` on {env['cores']} CPU "
             f"cores ({env['threads']} torch threads), torch {env['torch']}. "
             "Medians of steady steps, each over the plain twin's step just before it.", "",
             "Two comparisons with the simulator: of the step time, and of the slowdown "
             "(predicted step over the plain warm-up step its op times are calibrated on, "
             "against measured step over the plain twin), which the machine's speed drifting "
             "between warm-up and steady steps does not move.", "",
             "| workload | link | mode | budget (MiB) | peak: audited or profiled (MiB) | "
             "recomputed layers | plain (ms) | ours (ms) | ratio | predicted (ms) | "
             "step: measured vs predicted | predicted ratio | ratio: measured vs predicted | "
             "bitwise |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    misses: dict[str, list[str]] = {"prediction_error": [], "ratio_error": []}
    compared = 0

    def verdict(r: dict[str, Any], key: str, link: str) -> str:
        err = r.get(key)
        if err is None:
            return "-"
        ok = abs(err) <= MAX_PREDICTION_ERROR
        if not ok:
            misses[key].append(f"{r['workload']} {link} {r['mode']}")
        return f"{err:+.1%}" + ("" if ok else " **missed**")

    for r in rows:
        link = r["tiers"].split(":")[1].split(",")[0].removeprefix("h2d=")
        if "ratio" not in r:
            lines.append(f"| {r['workload']} | {link} | {r['mode']} | "
                         + ("refused" if "refused" in r else "-") + " |" + " - |" * 10)
            continue
        compared += r.get("prediction_error") is not None
        step, ratio = verdict(r, "prediction_error", link), verdict(r, "ratio_error", link)
        predicted = r.get("predicted_ratio")
        peak = r.get("audited_peak_fast_bytes", r.get("peak_bytes"))
        bitwise = {True: "yes", False: "**NO**"}.get(r.get("bitwise"), "-")  # type: ignore[arg-type]
        lines.append(
            f"| {r['workload']} | {link} | {r['mode']} | {mib(r.get('budget_bytes'))} | "
            f"{mib(peak)} | {', '.join(r.get('recomputed_layers', [])) or '-'} | "
            f"{ms(r.get('plain_median_step_s'))} | {ms(r.get('median_step_s'))} | "
            f"{r['ratio']:.3f} | {ms(r.get('predicted_step_s'))} | {step} | "
            f"{'-' if predicted is None else f'{predicted:.3f}'} | {ratio} | {bitwise} |")

    def met(key: str) -> str:
        missed = misses[key]
        return (f"met for all {compared} Sentinel rows" if not missed else
                f"met for {compared - len(missed)} of {compared}; missed for "
                + "; ".join(missed))

    lines += ["", f"Target: measured within {MAX_PREDICTION_ERROR:.0%} of the simulator. "
              f"Step time: {met('prediction_error')}. Slowdown: {met('ratio_error')}.",
              "", "The throttled tiers' copies are memcpy on mover threads: "
              + ("they have a core of their own (torch computes on the others), as a GPU's "
                 "copy engines are their own hardware." if env["threads"] < env["cores"] else
                 "every core computes, so copies take compute's cores (PITFALLS.md), which "
                 "the simulator does not charge.")]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
