"""GPU benchmark: Sentinel against PyTorch's and torchtune-style offloading and checkpointing.

    PYTHONPATH=src python3 benchmarks/bench_gpu.py [--quick]

On the reference GPT (bf16 autocast, PyTorch's fused attention) sized so that
plain training uses about half of the GPU's memory, and on the CNN, it measures
the median step time and the peak GPU memory (max_memory_allocated over a steady
step) of: plain training; torch.autograd.graph.save_on_cpu(pin_memory=True);
offload-all (every saved activation out after forward, back when used: the
torchtune design, run by Sentinel's runtime with policy="offload-all");
activation checkpointing of every block; Sentinel at 20%, 30% and 50% of the
plain peak, with the simulator's prediction and a lower bound for each budget
(the all-fast time, or the time to move the bytes the budget forces out and
back over the measured link, whichever is larger). Writes
benchmarks/results/gpu_<device>_<date>.md and .json. Needs CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


def gpt_workload(batch: int, quick: bool):  # type: ignore[no-untyped-def]
    from sentinel_hm.workloads import Workload, gpt

    cfg = gpt.GPTConfig(vocab_size=32768, seq_len=1024, d_model=1024 if quick else 2048,
                        n_layers=8 if quick else 16, n_heads=16, dropout=0.1, batch_size=batch)
    torch.manual_seed(0)
    wl = gpt.from_config(cfg, 0)
    wl.model.cuda()
    make = wl.make_batch
    return Workload("gpt", wl.model, wl.optimizer, lambda: tuple(t.cuda() for t in make())), cfg


def cnn_workload(batch: int):  # type: ignore[no-untyped-def]
    from sentinel_hm.workloads import Workload, cnn

    cfg = cnn.CNNConfig((64, 128, 256, 512), 2, 64, 3, 100, batch)
    torch.manual_seed(0)
    wl = cnn.from_config(cfg, 0)
    wl.model.cuda()
    make = wl.make_batch
    return Workload("cnn", wl.model, wl.optimizer, lambda: tuple(t.cuda() for t in make())), cfg


@contextlib.contextmanager
def checkpointed(model: torch.nn.Module) -> Iterator[None]:
    """Checkpoint every repeated block (non-reentrant)."""
    from sentinel_hm.trace.layers import find_layers

    originals = {}
    for _, block in find_layers(model):
        originals[block] = block.forward
        block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(
            block.forward)
    try:
        yield
    finally:
        for block, forward in originals.items():
            block.forward = forward


def measure(make: Callable[[], object], mode: str, steps: int) -> dict[str, object]:
    import sentinel_hm as sh

    wl, _ = make()  # type: ignore[misc]
    sentinel = None
    if mode.startswith("sentinel") or mode == "offload-all":
        budget = mode.split("@")[1] if "@" in mode else "100%"
        policy = "offload-all" if mode == "offload-all" else "sentinel"
        sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, tiers="cuda",
                               policy=policy)
    times, peak = [], 0
    for i in range(steps):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if mode == "save_on_cpu":
                with torch.autograd.graph.save_on_cpu(pin_memory=True):
                    wl.step()
            elif mode == "checkpoint":
                with checkpointed(wl.model):
                    wl.step()
            elif sentinel is not None:
                with sentinel.step():
                    wl.step()
            else:
                wl.step()
        torch.cuda.synchronize()
        if i >= steps // 2:
            times.append(time.perf_counter() - start)
            peak = max(peak, torch.cuda.max_memory_allocated())
    row: dict[str, object] = {"mode": mode, "median_step_s": statistics.median(times),
                              "peak_bytes": peak}
    if sentinel is not None and sentinel.prediction is not None and sentinel.trace is not None:
        st = sentinel.stats()
        trace, hw = sentinel.trace, sentinel.tiers.hardware()
        fast_s = sum(op.duration_s for op in trace.ops)
        forced = max(0, trace.peak_bytes - int(st["budget_bytes"]))
        row.update(predicted_step_s=sentinel.prediction.step_s, budget_bytes=st["budget_bytes"],
                   lower_bound_s=max(fast_s, forced / hw.link.d2h_bytes_per_s,
                                     forced / hw.link.h2d_bytes_per_s),
                   steady_steps=len(sentinel.steady_step_times))
        sentinel.close()
    del wl
    torch.cuda.empty_cache()
    return row


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_gpu: needs CUDA", file=sys.stderr)
        return 2
    import sentinel_hm as sh
    from sentinel_hm.tiers.cuda import CudaTiers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller models, fewer steps")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    steps = 8 if args.quick else 16
    total = torch.cuda.get_device_properties(0).total_memory

    batch = 1  # GPT batch: double while the plain peak stays under half the memory
    while True:
        row = measure(lambda b=batch * 2: gpt_workload(b, args.quick), "plain", 3)
        if int(row["peak_bytes"]) > total // 2 or batch >= 64:  # type: ignore[call-overload]
            break
        batch *= 2
    modes = ["plain", "save_on_cpu", "offload-all", "checkpoint",
             "sentinel@20%", "sentinel@30%", "sentinel@50%"]
    rows = []
    for name, make in (("gpt", lambda: gpt_workload(batch, args.quick)),
                       ("cnn", lambda: cnn_workload(64 if args.quick else 256))):
        for mode in modes:
            print(f"{name} {mode}...", file=sys.stderr, flush=True)
            try:
                r = measure(make, mode, steps)
            except (sh.SentinelError, torch.OutOfMemoryError) as e:
                r = {"mode": mode, "error": str(e).splitlines()[0][:200]}
            r["workload"] = name
            rows.append(r)
    link = CudaTiers().hardware().link
    now = dt.datetime.now(dt.UTC)
    device = torch.cuda.get_device_name(0)
    env = {"date": now.isoformat(timespec="seconds"), "device": device,
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(), "sentinel_hm": sh.__version__,
           "gpt_batch": batch, "quick": args.quick,
           "h2d_bytes_per_s": link.h2d_bytes_per_s, "d2h_bytes_per_s": link.d2h_bytes_per_s}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    slug = device.lower().replace(" ", "-")
    stem = args.out_dir / f"gpu_{slug}_{now:%Y-%m-%d}"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    gib = 2**30
    lines = [f"# GPU benchmark on {device}, {now:%Y-%m-%d}", "",
             f"torch {env['torch']} (CUDA {env['cuda']}); measured links: h2d "
             f"{link.h2d_bytes_per_s / 1e9:.1f} GB/s, d2h {link.d2h_bytes_per_s / 1e9:.1f} GB/s; "
             f"GPT batch {batch}{' (quick mode)' if args.quick else ''}.", "",
             "| workload | mode | step (ms) | peak (GiB) | predicted (ms) | lower bound (ms) |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['workload']} | {r['mode']} | {r['error']} | | | |")
            continue
        pred = f"{r['predicted_step_s'] * 1e3:.0f}" if "predicted_step_s" in r else ""
        low = f"{r['lower_bound_s'] * 1e3:.0f}" if "lower_bound_s" in r else ""
        lines.append(f"| {r['workload']} | {r['mode']} | {r['median_step_s'] * 1e3:.1f} | "
                     f"{r['peak_bytes'] / gib:.2f} | {pred} | {low} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
