"""Planner and simulator: speed, and predicted slowdowns of every policy on the reference traces.

    python benchmarks/bench_planner.py [--size small] [--repeats 5]

1. Speed: plan a 48-layer GPT trace with the sentinel policy at a 20% budget
   (target: at most 1 s) and replay it (target: at least 200,000 ops/s).
2. Policies: profile the reference GPT and CNN here, then `sentinel simulate`
   them on dram-optane and h100-sxm at budgets 10%..100%. On dram-optane at 20%:
   targets sentinel within 8% of all-fast, and at least 15% faster than
   first-touch and page-lru. Where sentinel misses, `sentinel plan` says why
   (stalls, in-place slow access, traffic).
3. Recompute (keep, move or recompute): sentinel with and without recomputation,
   checkpoint-all, checkpoint-selective (products kept, cheap ops rerun) and
   offload-all at 10/20/30/50%, and the floors (smallest
   feasible budgets) with and without. Targets on h100-sxm at 20%: GPT at most
   x1.25, CNN at most x1.5; with recompute never slower than the best other
   policy at any budget; floors no higher than without.

Writes benchmarks/results/planner_<size>_<date>.md and .json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, environment, with_tuned_malloc, write_results

BUDGETS = "10%,20%,...,100%"


def gpt48_trace():  # type: ignore[no-untyped-def]
    """A 48-layer GPT (narrow, so it profiles in a second here): the planner's scaling case."""
    import torch

    import sentinel_hm as sh
    from sentinel_hm.workloads import Workload
    from sentinel_hm.workloads.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=256, seq_len=32, d_model=32, n_layers=48, n_heads=2,
                    dropout=0.1, batch_size=2)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.parameters())
    gen = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    wl = Workload("gpt48", model, opt, batch)
    wl.step()
    return sh.profile(wl.step, model=model, optimizer=opt)


def speed(repeats: int) -> dict[str, object]:
    import sentinel_hm as sh
    from sentinel_hm.planning.planner import context

    trace = gpt48_trace()
    out: dict[str, object] = {"ops": len(trace.ops), "storages": len(trace.storages),
                              "layers": len(trace.layers)}
    for hw in ("dram-optane", "h100-sxm"):
        plan_s, sim_s = [], []
        for _ in range(repeats):
            ctx = context(trace, hw)  # fresh: no cached minimum budgets
            start = time.perf_counter()
            plan = sh.plan(trace, hw, "20%", "sentinel", ctx=ctx)
            plan_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            sh.simulate(trace, plan, ctx.hardware, cost=ctx.cost)
            sim_s.append(time.perf_counter() - start)
        # simulate() replays the step twice (steady state): count both replays
        out[hw] = {"plan_median_s": statistics.median(plan_s),
                   "simulate_median_s": statistics.median(sim_s),
                   "replayed_ops_per_s": 2 * len(trace.ops) / statistics.median(sim_s),
                   "trace_ops_per_s": len(trace.ops) / statistics.median(sim_s)}
    return out


def floors(trace_path: Path, hw: str) -> dict[str, float]:
    """The sentinel policy's smallest feasible budget, with and without recompute, as shares
    of the all-fast peak."""
    from sentinel_hm.planning.planner import context, min_budget
    from sentinel_hm.trace.io import load_trace

    trace = load_trace(trace_path)
    return {("recompute" if rc else "no_recompute"):
            min_budget(context(trace, hw, recompute=rc), "sentinel") / trace.peak_bytes
            for rc in (True, False)}


def cli(*argv: str) -> str:
    from sentinel_hm.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(argv))
    if code != 0:
        raise SystemExit(f"sentinel {' '.join(argv)} exited {code}")
    return buf.getvalue()


def main() -> int:
    with_tuned_malloc()
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="small", help="size of the profiled GPT and CNN")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(1)

    print("planner speed on a 48-layer GPT trace...", file=sys.stderr)
    speed_row = speed(args.repeats)
    tables: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in ("gpt", "cnn"):
            trace_path = Path(tmp) / f"{workload}.json.gz"
            cli("profile", "--workload", workload, "--size", args.size, "--out", str(trace_path),
                "--quiet")
            for hw in ("dram-optane", "h100-sxm"):
                json_path = Path(tmp) / f"{workload}-{hw}.json"
                text = cli("simulate", str(trace_path), "--hardware", hw, "--budgets", BUDGETS,
                           "--policies", "all", "--json", str(json_path))
                try:
                    why = cli("plan", str(trace_path), "--hardware", hw, "--budget", "20%",
                              "--out", str(Path(tmp) / "plan.json"))
                except SystemExit:  # refused: the simulate table says so too
                    why = "20% refused (see the refused cells above)"
                tables[f"{workload}/{hw}"] = {"table": text.strip(), "sentinel_at_20": why.strip(),
                                              "data": json.loads(json_path.read_text())}
                plain_path = Path(tmp) / f"{workload}-{hw}-no-recompute.json"
                cli("simulate", str(trace_path), "--hardware", hw, "--budgets", BUDGETS,
                    "--policies", "sentinel", "--no-recompute", "--json", str(plain_path))
                tables[f"{workload}/{hw}"]["no_recompute"] = json.loads(plain_path.read_text())
                tables[f"{workload}/{hw}"]["floors"] = floors(trace_path, hw)

    def slowdown(key: str, budget: str, policy: str, data: str = "data") -> float | None:
        for row in tables[key][data]["rows"]:  # type: ignore[index]
            if row["budget"] == budget:
                cell = row["cells"].get(policy, {})
                return cell.get("slowdown") if isinstance(cell, dict) else None
        return None

    recompute_rows = []
    for key in tables:
        hw = key.split("/")[1]
        for budget in ("10%", "20%", "30%", "50%"):
            others = {pol: slowdown(key, budget, pol) for pol in
                      ("checkpoint-all", "checkpoint-selective", "offload-all", "vdnn",
                       "all-slow", "page-lru", "first-touch")}
            best_other = min((v for v in others.values() if v is not None), default=None)
            rc = slowdown(key, budget, "sentinel")
            recompute_rows.append({
                "key": key, "budget": budget, "recompute": rc,
                "no_recompute": slowdown(key, budget, "sentinel", "no_recompute"),
                "checkpoint_all": others["checkpoint-all"],
                "checkpoint_selective": others["checkpoint-selective"],
                "offload_all": others["offload-all"],
                "best_other": best_other,
                "never_slower": best_other is None or (rc is not None
                                                        and rc <= best_other * (1 + 1e-9)),
                "target": ({"gpt": 1.25, "cnn": 1.5}[key.split("/")[0]]
                           if hw == "h100-sxm" and budget == "20%" else None),
            })

    checks = []
    for workload in ("gpt", "cnn"):
        key = f"{workload}/dram-optane"
        s, ft, lru = (slowdown(key, "20%", p) for p in ("sentinel", "first-touch", "page-lru"))
        checks.append({"workload": workload, "sentinel_20": s, "first_touch_20": ft,
                       "page_lru_20": lru,
                       "within_8pct": s is not None and s <= 1.08,
                       "vs_first_touch": None if s is None or ft is None else 1 - s / ft,
                       "vs_page_lru": None if s is None or lru is None else 1 - s / lru})

    env = environment(size=args.size, repeats=args.repeats)
    lines = [f"# Planner and simulator, {env['day']}", "",
             f"`python benchmarks/bench_planner.py --size {args.size}` on {env['cores']} CPU "
             f"cores, torch {env['torch']}, Python {env['python']}. Traces profiled here; "
             "slowdowns are the simulator's predictions on the named hardware model.", "",
             "## Speed (48-layer GPT trace, "
             f"{speed_row['ops']} ops, {speed_row['layers']} layers; medians of {args.repeats})",
             "", "| hardware | plan sentinel @20% (s) | target | replay (trace ops/s) | target |",
             "|---|---:|---:|---:|---:|"]
    for hw in ("dram-optane", "h100-sxm"):
        r = speed_row[hw]
        lines.append(f"| {hw} | {r['plan_median_s']:.3f} | <= 1 | "  # type: ignore[index]
                     f"{r['trace_ops_per_s']:,.0f} | >= 200,000 |")  # type: ignore[index]
    lines += ["", "A replay covers two steps (steady state); trace ops/s counts one.", "",
              "## Targets on dram-optane at a 20% budget", "",
              "| workload | sentinel | first-touch | page-lru | sentinel within 8% | "
              "faster than first-touch | faster than page-lru |", "|---|---:|---:|---:|---|---:|---:|"]
    for c in checks:
        def pct(x: object) -> str:
            return "-" if x is None else f"{x:.0%}"

        def num(x: object) -> str:
            return "refused" if x is None else f"x{x:.3f}"

        lines.append(f"| {c['workload']} | {num(c['sentinel_20'])} | {num(c['first_touch_20'])} | "
                     f"{num(c['page_lru_20'])} | {'yes' if c['within_8pct'] else 'no'} | "
                     f"{pct(c['vs_first_touch'])} | {pct(c['vs_page_lru'])} |")
    lines += ["", "## Recompute: keep, move or recompute", "",
              "Predicted slowdown over all-fast; sentinel decides per layer whether to keep, "
              "move or recompute its saved activations (docs/planning.md).", "",
              "| trace / hardware | budget | sentinel | sentinel, no recompute | checkpoint-all "
              "| checkpoint-selective | offload-all | best other | never slower than the others "
              "| target |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]

    def cell(x: object) -> str:
        return "refused" if x is None else f"x{x:.3f}"

    for r in recompute_rows:
        target = r["target"]
        verdict = "-"
        if target is not None:
            met = r["recompute"] is not None and r["recompute"] <= target
            verdict = f"<= x{target}: {'met' if met else '**missed**'}"
        lines.append(f"| {r['key']} | {r['budget']} | {cell(r['recompute'])} | "
                     f"{cell(r['no_recompute'])} | {cell(r['checkpoint_all'])} | "
                     f"{cell(r['checkpoint_selective'])} | "
                     f"{cell(r['offload_all'])} | {cell(r['best_other'])} | "
                     f"{'yes' if r['never_slower'] else '**no**'} | {verdict} |")
    lines += ["", "| trace / hardware | floor with recompute | floor without | lower or equal |",
              "|---|---:|---:|---|"]
    for key, v in tables.items():
        f = v["floors"]
        lines.append(f"| {key} | {f['recompute']:.1%} | {f['no_recompute']:.1%} | "  # type: ignore[index]
                     f"{'yes' if f['recompute'] <= f['no_recompute'] else '**no**'} |")  # type: ignore[index]
    for key, v in tables.items():
        lines += ["", f"## {key}: slowdown over all-fast", "", "```", str(v["table"]), "```", "",
                  "`sentinel plan --budget 20%`:", "", "```", str(v["sentinel_at_20"]), "```"]
    write_results(args.out_dir, f"planner_{args.size}_{env['day']}",
                  {"env": env, "speed": speed_row, "checks": checks, "recompute": recompute_rows,
                   "tables": {k: v["data"] for k, v in tables.items()}}, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
