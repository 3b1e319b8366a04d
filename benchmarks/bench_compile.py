"""torch.compile under Sentinel: compiled plain training against compiled training under
Sentinel, step by step in one run.

    python benchmarks/bench_compile.py [--size small] [--steps 14] [--workloads gpt,mlp]
        [--backend inductor] [--budgets 50%,min] [--compile blocks]

Each workload's repeated blocks (the layers Sentinel finds in the eager model) are compiled
one by one (``--compile blocks``, the way large models are usually compiled), or the whole
model is (``--compile model``). Two copies train from the same seed: a plain compiled twin
and one under Sentinel, steps alternating, each twin with its own RNG state. Per budget the
table gives the budget and audited peak as shares of the all-fast peak, the bytes moved, the
median step time of each over the steady steps (each paired with the plain step just before
it) and their ratio, the compiled regions entered per steady step by each (torch.profiler),
and whether losses and final parameters are bitwise equal. Deterministic algorithms are on
(``torch.use_deterministic_algorithms(True)``): without them, inductor's CPU scatter-add (the
embedding's backward, when the whole GPT is compiled) sums in a varying order, and two plain
compiled runs of it differ from the first step's gradients on. Writes
benchmarks/results/compile_<size>_<compile>_cpu<cores>_<date>.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import RESULTS, environment, with_tuned_malloc, write_results


def main() -> int:
    with_tuned_malloc()
    import torch

    import sentinel_hm as sh
    from sentinel_hm.trace.layers import find_layers
    from sentinel_hm.workloads import make_workload

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="gpt,mlp")
    p.add_argument("--size", default="small")
    p.add_argument("--steps", type=int, default=14, help="steps per run (default 14)")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--budgets", default="50%,min")
    p.add_argument("--compile", choices=("blocks", "model"), default="blocks")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.use_deterministic_algorithms(True)  # see the docstring: bitwise twins need it

    def compiled_workload(name: str) -> Any:
        wl = make_workload(name, size=args.size, seed=0)
        if args.compile == "model":
            wl.model.compile(backend=args.backend)
        else:
            for _, block in find_layers(wl.model):
                block.compile(backend=args.backend)
        return wl

    def regions(step: Callable[[], Any]) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        return sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region"))

    def run(name: str, budget: str) -> dict[str, Any]:
        plain, wl = compiled_workload(name), compiled_workload(name)
        rng = {"plain": torch.get_rng_state(), "ours": torch.get_rng_state()}
        sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget)
        losses: dict[str, list[torch.Tensor]] = {"plain": [], "ours": []}
        pairs: list[tuple[float, float]] = []
        counted: dict[str, int] = {}
        refused = None
        for i in range(args.steps):
            print(f"\r{name} {budget}: step {i + 1}/{args.steps}", end="", file=sys.stderr,
                  flush=True)
            if i == args.steps - 2:
                sentinel.audit()
            last = i == args.steps - 1  # counted, not timed (the profiler slows it)
            torch.set_rng_state(rng["plain"])
            start = time.perf_counter()
            if last:
                counted["plain"] = regions(lambda: losses["plain"].append(plain.step()))
            else:
                losses["plain"].append(plain.step())
            plain_s = time.perf_counter() - start
            rng["plain"] = torch.get_rng_state()
            torch.set_rng_state(rng["ours"])
            timed = len(sentinel.steady_step_times)

            def ours() -> None:
                with sentinel.step():
                    losses["ours"].append(wl.step())

            start = time.perf_counter()
            try:
                if last:
                    counted["ours"] = regions(ours)
                else:
                    ours()
            except sh.SentinelError as e:
                refused = str(e)
                break
            ours_s = time.perf_counter() - start
            rng["ours"] = torch.get_rng_state()
            if len(sentinel.steady_step_times) > timed and not last:
                pairs.append((plain_s, ours_s))
        print(file=sys.stderr)
        st = sentinel.stats()
        sentinel.close()
        row: dict[str, Any] = {"workload": name, "budget": budget, "refused": refused,
                               "steps_run": len(losses["ours"]), "paired_steps": len(pairs),
                               "regions_plain": counted.get("plain"),
                               "regions_sentinel": counted.get("ours")}
        row.update({k: st[k] for k in (
            "phase", "budget_bytes", "all_fast_peak_bytes", "audited_peak_fast_bytes",
            "bytes_to_slow_per_step", "bytes_to_fast_per_step", "median_stall_s",
            "predicted_step_s", "profiles", "mismatches")})
        row["losses_equal"] = len(losses["plain"]) == len(losses["ours"]) and all(
            torch.equal(a, b) for a, b in zip(losses["plain"], losses["ours"], strict=True))
        row["params_equal"] = all(torch.equal(a, b) for a, b in zip(
            plain.model.parameters(), wl.model.parameters(), strict=True))
        if pairs:
            row["plain_median_step_s"] = statistics.median(a for a, _ in pairs)
            row["median_step_s"] = statistics.median(b for _, b in pairs)
            row["ratio"] = row["median_step_s"] / row["plain_median_step_s"]
        return row

    rows = [run(name, budget) for name in args.workloads.split(",")
            for budget in args.budgets.split(",")]
    env = environment(steps=args.steps, backend=args.backend, compile=args.compile)
    write_results(args.out_dir, f"compile_{args.size}_{args.compile}_cpu{env['cores']}_"
                  f"{env['day']}", {"env": env, "size": args.size, "rows": rows},
                  report(args, env, rows))
    return 0


def report(args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]]
           ) -> list[str]:
    cmd = " ".join(["python benchmarks/bench_compile.py", *sys.argv[1:]])
    lines = [
        f"# torch.compile under Sentinel, size {args.size}, {args.compile} compiled with "
        f"{args.backend}",
        "",
        f"`{cmd}` on {env['cores']} cores, torch {env['torch']}, {env['date']}; "
        f"{args.steps} steps per run, plain compiled and Sentinel compiled alternating; "
        "medians over paired steady steps; deterministic algorithms on.",
        "",
        "| workload | budget | share of all-fast peak | audited peak | moved out per step "
        "| plain step | Sentinel step | ratio | compiled regions per step (plain / Sentinel) "
        "| bitwise |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["refused"]:
            lines.append(f"| {r['workload']} | {r['budget']} | refused: {r['refused'][:160]} "
                         "| | | | | | | |")
            continue
        peak = r["all_fast_peak_bytes"]
        moved = r["bytes_to_slow_per_step"] or 0
        times = (f"{r['plain_median_step_s'] * 1e3:.1f} ms | {r['median_step_s'] * 1e3:.1f} ms "
                 f"| x{r['ratio']:.3f}") if "ratio" in r else "no steady step | | "
        bitwise = "yes" if r["losses_equal"] and r["params_equal"] else "NO"
        lines.append(
            f"| {r['workload']} | {r['budget']} | {r['budget_bytes'] / peak:.1%} "
            f"| {(r['audited_peak_fast_bytes'] or 0) / peak:.1%} | {moved / 2**20:.1f} MiB "
            f"| {times} | {r['regions_plain']} / {r['regions_sentinel']} | {bitwise} |")
    lines += ["", "Phase reached, profiles and mismatches per run are in the JSON file."]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
