"""GPU benchmark: Sentinel against plain training, PyTorch's offloading and checkpointing.

    PYTHONPATH=src python3 benchmarks/bench_gpu.py [--quick] [--steps N] [--workloads gpt,cnn]

Workloads: the reference GPT (bf16 autocast, PyTorch's fused attention), its
batch doubled while plain training peaks under half of the GPU's memory (4 in
quick mode, 4 layers x 1024), and the reference CNN, its ``AdaptiveAvgPool2d(1)`` replaced by a
mean over the image (the same values; that layer's CUDA backward has no
deterministic kernel).

Modes: plain; ``torch.autograd.graph.save_on_cpu(pin_memory=True)``; activation
checkpointing of every block (non-reentrant); offload-all (every saved
activation out after forward and back when used, torchtune's design, run by
Sentinel's runtime with ``policy="offload-all"`` at ``fast_memory="min"``);
Sentinel at ``fast_memory`` "min" and 50% (quick) or 20%, 30%, 50% and "min".

Every mode trains the same number of steps from the same seed: enough for
Sentinel to reach its steady phase (warm-up, profiled step, trials, audited
trial and its re-plans), then ``--steps`` more. Only steady steps are timed:
for the other modes every step after two warm-up steps; for Sentinel the steps
that begin and end in the steady phase and that it counts itself
(``steady_step_times``, audited steps excluded). ``torch.cuda.synchronize()``
brackets each step (every stream, copies included); a step's time is the wall
time between, its device time the compute stream's CUDA events. Peak:
the allocator's peak of active bytes (``active_bytes.all.peak``: allocated
blocks and blocks a side stream still copies from) over each timed step
(reset before it), the largest.

Determinism: ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before CUDA starts and
``torch.use_deterministic_algorithms(True)`` (strict) for every mode alike;
``--nondeterministic`` allows the faster kernels, and bitwise equality is then
reported, not required. Uninitialised memory is not filled (``torch.empty``
costs what it costs without determinism).

A Sentinel row (offload-all, sentinel@...) passes when it ran without error (a
refusal is a failure), reached at least ``--steps`` timed steady steps, moved
bytes both ways at a budget below the all-fast peak, peaked within its budget,
and trained bit for bit like plain (every step's loss, the final parameters). A
failing row stays in the table and the program exits 1; so does any row that
raised (baselines too).

Lower bound of a Sentinel row: the larger of plain's median step (measured in
this run, synchronised only at step boundaries) and the time to move the bytes
the budget forces out (all-fast peak minus budget: at the peak they are not in
GPU memory, so without recomputation they leave and come back every step) over
each direction of the link. Bandwidths are measured here, the fastest of several
256 MiB pinned copies, so the bound holds. Also given: the copy time of the
bytes the plan actually moved.

Quick mode (scripts/gpu_check.sh) keeps to about a minute: ``trials=1`` (each trial is one
more step), a row stops before a step that would take it past ``--row-limit-s`` (20 s; a
step still running 15 s later is interrupted), rows not started within ``--time-limit-s``
(60 s) fail as not run.

Writes benchmarks/results/gpu_<device>_<quick|full>_<date>.md and .json,
rewritten after every row (a run cut short keeps what it measured). Exit status:
0 every row passed, 1 a row failed, 2 no CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import re
import signal
import statistics
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from _common import RESULTS, environment, write_results

TRIALS = 3  # Sentinel's test-and-trial steps (its default; --trials, 1 in quick mode)
GRACE_S = 15.0  # a step still running this long after its row's limit is interrupted
PLAIN_WARMUP = 2  # untimed first steps of the other modes
MAX_BATCH = 64
PEAK_SHARE = {True: 1 / 16, False: 1 / 2}  # quick / full: plain GPT peak as a share of memory
LINK_PROBE_BYTES = 256 << 20
STATS_KEYS = ("phase", "budget_bytes", "planned_for_bytes", "all_fast_peak_bytes",
              "audited_peak_fast_bytes", "bytes_to_slow_per_step", "bytes_to_fast_per_step",
              "median_stall_s", "median_step_s", "predicted_step_s", "predicted_peak_fast_bytes",
              "chosen_interval", "mismatches", "note")


@dataclass(frozen=True)
class Mode:
    name: str
    fast_memory: str | None = None  # Sentinel's budget; None for the other modes
    policy: str = "sentinel"

    @property
    def sentinel(self) -> bool:
        return self.fast_memory is not None


def modes(quick: bool) -> list[Mode]:
    budgets = ("min", "50%") if quick else ("20%", "30%", "50%", "min")
    return [Mode("plain"), Mode("save_on_cpu"), Mode("checkpoint"),
            Mode("offload-all", "min", "offload-all"),
            *(Mode(f"sentinel@{b}", b) for b in budgets)]


def steps_to_steady(trials: int = TRIALS) -> int:
    """The most steps Sentinel takes before its first steady step: warm-up, the profiled step
    and its second profile when it recomputes layers, the trials, the audited trial step and
    its re-plans."""
    from sentinel_hm.runtime.manager import MAX_REPLANS, WARMUP_STEPS

    return WARMUP_STEPS + 2 + trials + 1 + MAX_REPLANS


class RowTimeout(Exception):
    """A row ran past its time limit."""


@contextlib.contextmanager
def interrupt_after(seconds: float) -> Iterator[None]:
    """Raise `RowTimeout` in the main thread once ``seconds`` have passed (a step that hangs
    or crawls); off again when the block ends."""
    def fire(*_: Any) -> None:
        raise RowTimeout(f"a step was still running {seconds:.0f} s into its row: interrupted")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_time(began: float, last: float, limit_s: float, done: int, total: int) -> None:
    """Raise `RowTimeout` if the next step (as long as the last) would end past the limit."""
    spent = time.perf_counter() - began
    if spent + last > limit_s:
        raise RowTimeout(f"out of time: {done} of {total} steps in {spent:.1f} s (row limit "
                         f"{limit_s:.0f} s, last step {last:.1f} s)")


def device_slug(device: torch.device | None = None) -> str:
    """``NVIDIA H200`` -> ``nvidia-h200``: the device part of the result files' names."""
    name = torch.cuda.get_device_name(device)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# -- workloads -------------------------------------------------------------------------------


class MeanPool(nn.Module):
    """``AdaptiveAvgPool2d(1)`` as a mean: the same values, a deterministic CUDA backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


def _on_gpu(wl: Any, device: torch.device) -> Any:
    from sentinel_hm.workloads import Workload

    wl.model.to(device)  # parameters keep their identity: the optimizer still holds them
    make = wl.make_batch
    return Workload(wl.name, wl.model, wl.optimizer,
                    lambda: tuple(t.to(device) for t in make()))


def gpt_workload(batch: int, quick: bool, device: torch.device) -> Any:
    from sentinel_hm.workloads import gpt

    cfg = gpt.GPTConfig(vocab_size=32768, seq_len=1024, d_model=1024 if quick else 2048,
                        n_layers=4 if quick else 16, n_heads=16, dropout=0.1, batch_size=batch)
    torch.manual_seed(0)  # the GPU's generator too: every mode draws the same dropout masks
    return _on_gpu(gpt.from_config(cfg, 0), device)


def cnn_workload(batch: int, device: torch.device) -> Any:
    from sentinel_hm.workloads import cnn

    cfg = cnn.CNNConfig((64, 128, 256, 512), 2, 64, 3, 100, batch)
    torch.manual_seed(0)
    wl = cnn.from_config(cfg, 0)
    wl.model.pool = MeanPool()
    return _on_gpu(wl, device)


@contextlib.contextmanager
def checkpointed(model: nn.Module) -> Iterator[None]:
    """Checkpoint every repeated block (non-reentrant): the layers of a class that occurs
    more than once (a GPT's blocks, a ResNet's residual blocks)."""
    from sentinel_hm.trace.layers import find_layers

    layers = [block for _, block in find_layers(model)]
    repeated = Counter(type(block) for block in layers)
    originals = {}
    for block in layers:
        if repeated[type(block)] < 2:
            continue
        originals[block] = block.forward
        block.forward = (lambda f: lambda *a: checkpoint(f, *a, use_reentrant=False))(
            block.forward)
    try:
        yield
    finally:
        for block, forward in originals.items():
            block.forward = forward


# -- measuring -------------------------------------------------------------------------------


def measure_link(device: torch.device) -> dict[str, float]:
    """Bytes per second each way between pinned host memory and the GPU: the fastest of
    several copies (an upper bound on the bandwidth, so bytes over it bound time from below)."""
    host = torch.empty(LINK_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(LINK_PROBE_BYTES, dtype=torch.uint8, device=device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    rates = {}
    for name, (dst, src) in (("h2d", (dev, host)), ("d2h", (host, dev))):
        best = math.inf
        for _ in range(6):
            torch.cuda.synchronize(device)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        rates[f"{name}_bytes_per_s"] = LINK_PROBE_BYTES / best
    return rates


def one_step(wl: Any, mode: Mode, sentinel: Any) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        if mode.name == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu(pin_memory=True):
                return wl.step()
        if mode.name == "checkpoint":
            with checkpointed(wl.model):
                return wl.step()
        if sentinel is not None:
            with sentinel.step():
                return wl.step()
        return wl.step()


def probe_peak(make: Callable[[], Any], device: torch.device) -> int:
    """Plain training's peak over three steps (the first creates the optimizer's state)."""
    wl = make()
    peak = 0
    for _ in range(3):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        one_step(wl, Mode("plain"), None)
        torch.cuda.synchronize(device)
        peak = max(peak, torch.cuda.max_memory_allocated(device))
    del wl
    _free()
    return peak


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:400]}"


@dataclass
class Run:
    """What one mode left: its row, and the losses and final parameters for bitwise checks."""

    row: dict[str, Any]
    losses: torch.Tensor | None = None
    params: list[torch.Tensor] | None = None


def run_mode(make: Callable[[], Any], mode: Mode, total_steps: int,
             device: torch.device, trials: int = TRIALS, limit_s: float = math.inf) -> Run:
    import sentinel_hm as sh

    row: dict[str, Any] = {"mode": mode.name, "sentinel": mode.sentinel,
                           "fast_memory": mode.fast_memory, "policy": mode.policy,
                           "steps": total_steps, "limit_s": limit_s}
    run = Run(row)
    began = time.perf_counter()
    last = 0.0
    wl = sentinel = None
    losses: list[torch.Tensor] = []
    times: list[float] = []
    device_times: list[float] = []
    peaks: list[int] = []
    phases: list[str] = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        with interrupt_after(limit_s + GRACE_S):
            wl = make()
            if mode.sentinel:
                sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=mode.fast_memory,
                                       tiers="cuda", policy=mode.policy, trials=trials)
            for i in range(total_steps):
                check_time(began, last, limit_s, i, total_steps)
                before = sentinel.stats()["phase"] if sentinel is not None else None
                counted = len(sentinel.steady_step_times) if sentinel is not None else 0
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                start.record()
                losses.append(one_step(wl, mode, sentinel))
                end.record()
                torch.cuda.synchronize(device)
                wall = last = time.perf_counter() - t0
                if sentinel is None:
                    steady = i >= PLAIN_WARMUP
                else:
                    after = sentinel.stats()["phase"]
                    phases.append(after)
                    steady = (before == after == "steady"
                              and len(sentinel.steady_step_times) > counted)
                if steady:
                    times.append(wall)
                    device_times.append(start.elapsed_time(end) / 1e3)
                    # active bytes: blocks a side stream still copies from count too
                    peaks.append(torch.cuda.memory_stats(device)["active_bytes.all.peak"])
            run.losses = torch.stack(losses).float().cpu()
            if sentinel is not None:
                stats = sentinel.stats()
                row["stats"] = {k: stats.get(k) for k in STATS_KEYS}
                row["trials"] = stats.get("trials")
                s, sentinel = sentinel, None
                s.close()  # everything back on the GPU: the parameters as training left them
            run.params = [p.detach().cpu() for p in wl.model.parameters()]
    except Exception as e:  # a failed row is reported, then fails the run
        if not isinstance(e, RowTimeout):
            traceback.print_exc()
        row["error"] = _one_line(e)
        if sentinel is not None:
            with contextlib.suppress(Exception):
                row["stats"] = {k: sentinel.stats().get(k) for k in STATS_KEYS}
    finally:
        if sentinel is not None:
            with contextlib.suppress(Exception):
                sentinel.close()
        del wl, sentinel
        _free()
    row.update(phases=phases, steady_steps=len(times), step_s=times,
               row_s=time.perf_counter() - began)
    if times:
        row.update(median_step_s=statistics.median(times),
                   median_device_step_s=statistics.median(device_times), peak_bytes=max(peaks))
    return run


# -- judging ---------------------------------------------------------------------------------


def compare(run: Run, plain: Run | None) -> None:
    """Bitwise against plain: every step's loss and the final parameters."""
    row = run.row
    if plain is None or plain.losses is None or plain.params is None:
        row["losses_equal"] = row["params_equal"] = None
        return
    if run.losses is not None:
        row["losses_equal"] = (run.losses.shape == plain.losses.shape
                               and torch.equal(run.losses, plain.losses))
    if run.params is not None:
        row["params_equal"] = all(torch.equal(a, b)
                                  for a, b in zip(run.params, plain.params, strict=True))


def bounds(row: dict[str, Any], plain_s: float | None, link: dict[str, float]) -> None:
    stats = row.get("stats")
    if plain_s is None or "error" in row or not stats or stats.get("budget_bytes") is None:
        return
    h2d, d2h = link["h2d_bytes_per_s"], link["d2h_bytes_per_s"]
    forced = max(0, stats["all_fast_peak_bytes"] - stats["budget_bytes"])
    row["forced_bytes"] = forced
    row["lower_bound_s"] = max(plain_s, forced / d2h, forced / h2d)
    out, back = stats.get("bytes_to_slow_per_step") or 0, stats.get("bytes_to_fast_per_step") or 0
    row["plan_copy_s"] = max(out / d2h, back / h2d)


def failures(row: dict[str, Any], need_steady: int, deterministic: bool) -> list[str]:
    """Why a row fails (empty: it passes)."""
    if "error" in row:
        return [row["error"]]
    if not row["sentinel"]:
        return []
    why = []
    stats = row["stats"]
    if row["steady_steps"] < need_steady:
        why.append(f"{row['steady_steps']} timed steady steps, fewer than {need_steady} "
                   f"(phases: {' '.join(row['phases'])})")
    if stats["mismatches"]:
        why.append(f"steps did not match the profile: {stats['mismatches'][0]}")
    if stats["budget_bytes"] >= stats["all_fast_peak_bytes"]:
        why.append(f"budget {stats['budget_bytes']} bytes does not bind (all-fast peak "
                   f"{stats['all_fast_peak_bytes']}): nothing moves")
    elif not (stats["bytes_to_slow_per_step"] and stats["bytes_to_fast_per_step"]):
        why.append("nothing moved at a binding budget")
    if "peak_bytes" in row and row["peak_bytes"] > stats["budget_bytes"]:
        why.append(f"steady peak {row['peak_bytes']} bytes ({_bytes(row['peak_bytes'])}) over "
                   f"the budget {stats['budget_bytes']} ({_bytes(stats['budget_bytes'])})")
    if deterministic and not (row.get("losses_equal") and row.get("params_equal")):
        why.append(f"not bitwise equal to plain (losses {row.get('losses_equal')}, "
                   f"parameters {row.get('params_equal')})")
    return why


# -- report ----------------------------------------------------------------------------------


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key] * 1e3:.1f}" if row.get(key) is not None else ""


def _bytes(x: Any) -> str:
    from sentinel_hm.units import format_bytes

    return format_bytes(x) if x is not None else ""


def _yes(x: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[x]


def report(env: dict[str, Any], rows: list[dict[str, Any]], done: bool) -> list[str]:
    quick = env["quick"]
    lines = [f"# GPU benchmark on {env['device']}, {env['day']}"
             + ("" if done else " (incomplete: still running or cut short)"), "",
             f"`PYTHONPATH=src python3 benchmarks/bench_gpu.py{' --quick' if quick else ''}` "
             f"(torch {env['torch']}, CUDA {env['cuda']}, sentinel_hm {env['sentinel_hm']}); "
             f"deterministic algorithms {'on' if env['deterministic'] else 'off'}; measured "
             f"links: h2d {env['h2d_bytes_per_s'] / 1e9:.1f} GB/s, d2h "
             f"{env['d2h_bytes_per_s'] / 1e9:.1f} GB/s; GPT batch {env['gpt_batch']}, CNN batch "
             f"{env['cnn_batch']}; {env['total_steps']} steps per mode, at least "
             f"{env['need_steady']} timed steady steps per Sentinel row; Sentinel with "
             f"trials={env.get('trials', TRIALS)}"
             + (" (its default is 3: fewer steps)" if env.get("trials", TRIALS) != 3 else "")
             + (f"; row limit {env['row_limit_s']:.0f} s, run limit "
                f"{env['time_limit_s']:.0f} s" if math.isfinite(env.get("row_limit_s", math.inf))
                else "") + ".", "",
             "Step: median wall time of the timed steady steps (n), synchronised at step "
             "boundaries; peak: the largest peak of the allocator's active bytes over them. Budget and moved "
             "bytes from `Sentinel.stats()`. Lower bound: max(plain step, forced bytes over "
             "each link direction); plan copies: the bytes this plan moved over the link.", "",
             "| workload | mode | step (ms) | n | x plain | peak | budget | out / in per step | predicted (ms) | lower bound (ms) | plan copies (ms) | bitwise "
             "(losses / params) | result |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---|"]
    failed = []
    for r in rows:
        st = r.get("stats") or {}
        plain_s = next((p.get("median_step_s") for p in rows
                        if p["workload"] == r["workload"] and p["mode"] == "plain"), None)
        ratio = (f"{r['median_step_s'] / plain_s:.2f}"
                 if r.get("median_step_s") and plain_s else "")
        moved = (f"{_bytes(st.get('bytes_to_slow_per_step'))} / "
                 f"{_bytes(st.get('bytes_to_fast_per_step'))}" if st else "")

        result = "ok" if not r["failures"] else "**FAIL**"
        lines.append(
            f"| {r['workload']} | {r['mode']} | {_ms(r, 'median_step_s')} | "
            f"{r.get('steady_steps', 0)} | {ratio} | {_bytes(r.get('peak_bytes'))} | "
            f"{_bytes(st.get('budget_bytes'))} | {moved} | {_ms(st, 'predicted_step_s')} | "
            f"{_ms(r, 'lower_bound_s')} | {_ms(r, 'plan_copy_s')} | "
            f"{_yes(r.get('losses_equal'))} / {_yes(r.get('params_equal'))} | {result} |")
        failed += [f"- {r['workload']} {r['mode']}: {why}" for why in r["failures"]]
        if r.get("lower_bound_s") and r.get("median_step_s") and \
                r["median_step_s"] < r["lower_bound_s"]:
            failed.append(f"- note: {r['workload']} {r['mode']} measured below its lower bound "
                          "(plain's median is noisy, or the bound is wrong)")
    lines += ["", "## Failures" if failed else "## Result", "",
              *(failed or ["Every row passed."])]
    return lines


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help='smaller models, fewer steps, budgets "min" and 50%% (scripts/gpu_check.sh)')
    p.add_argument("--steps", type=int, default=None,
                   help="timed steady steps per mode (default 3 quick, 8 full)")
    p.add_argument("--workloads", default="gpt,cnn")
    p.add_argument("--trials", type=int, default=None,
                   help="Sentinel's trials (default: 1 quick, to keep it short; 3, its default, "
                        "in full)")
    p.add_argument("--gpt-batch", type=int, default=None,
                   help="the GPT's batch (default: 4 quick; in full, doubled while plain "
                        "training peaks under half of the GPU's memory)")
    p.add_argument("--row-limit-s", type=float, default=None,
                   help="seconds a row may take (default: 20 quick, none in full)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="rows not started within this many seconds of the start fail as not "
                        "run (default: 60 quick, none in full)")
    p.add_argument("--nondeterministic", action="store_true",
                   help="allow nondeterministic kernels (faster); bitwise is then not required")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args()
    deterministic = not args.nondeterministic
    if deterministic:  # cuBLAS reads it when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if not torch.cuda.is_available():
        print("bench_gpu: needs CUDA (torch.cuda.is_available() is False here); nothing was "
              "measured", file=sys.stderr)
        return 2
    if deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark = False
    started = time.perf_counter()
    device = torch.device("cuda", torch.cuda.current_device())
    need_steady = args.steps if args.steps is not None else (3 if args.quick else 8)
    trials = args.trials if args.trials is not None else (1 if args.quick else TRIALS)
    total_steps = steps_to_steady(trials) + need_steady
    row_limit = args.row_limit_s or (20.0 if args.quick else math.inf)
    time_limit = args.time_limit_s or (60.0 if args.quick else math.inf)
    names = args.workloads.split(",")
    unknown = set(names) - {"gpt", "cnn"}
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}: choose from gpt, cnn")

    link = measure_link(device)
    total = torch.cuda.get_device_properties(device).total_memory
    batch = args.gpt_batch or (4 if args.quick else 1)
    if "gpt" in names and not (args.quick or args.gpt_batch):
        # double while plain's peak stays under the share of memory
        while batch < MAX_BATCH:
            print(f"gpt: sizing, batch {batch * 2}...", file=sys.stderr, flush=True)
            try:
                peak = probe_peak(lambda b=batch * 2: gpt_workload(b, args.quick, device), device)
            except torch.OutOfMemoryError:
                peak = None  # freed below, once the exception no longer holds the frames
            _free()
            if peak is None or peak > total * PEAK_SHARE[args.quick]:
                break
            batch *= 2
    cnn_batch = 64 if args.quick else 256
    env = environment(device=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                      total_memory_bytes=total, quick=args.quick, deterministic=deterministic,
                      gpt_batch=batch, cnn_batch=cnn_batch, total_steps=total_steps,
                      need_steady=need_steady, trials=trials, row_limit_s=row_limit,
                      time_limit_s=time_limit, **link)
    stem = f"gpu_{device_slug(device)}_{'quick' if args.quick else 'full'}_{env['day']}"
    makers: dict[str, Callable[[], Any]] = {
        "gpt": lambda: gpt_workload(batch, args.quick, device),
        "cnn": lambda: cnn_workload(cnn_batch, device),
    }
    rows: list[dict[str, Any]] = []

    def save(done: bool) -> None:
        write_results(args.out_dir, stem, {"env": env, "rows": rows, "done": done},
                      report(env, rows, done), quiet=not done)

    for name in names:
        plain: Run | None = None
        for mode in modes(args.quick):
            left = time_limit - (time.perf_counter() - started)
            if left < 1:
                run = Run({"mode": mode.name, "sentinel": mode.sentinel, "phases": [],
                           "steady_steps": 0, "step_s": [],
                           "error": f"not run: the run's {time_limit:.0f} s were spent"})
            else:
                print(f"{name} {mode.name}...", file=sys.stderr, flush=True)
                run = run_mode(makers[name], mode, total_steps, device, trials,
                               min(row_limit, left))
                print(f"{name} {mode.name}: {run.row['row_s']:.1f} s", file=sys.stderr,
                      flush=True)
            if mode.name == "plain":
                plain = run
            else:
                compare(run, plain)
            bounds(run.row, plain.row.get("median_step_s") if plain else None, link)
            run.row["workload"] = name
            run.row["failures"] = failures(run.row, need_steady, deterministic)
            rows.append(run.row)
            save(done=False)
    save(done=True)
    return finish("bench_gpu", args.out_dir / stem, started,
                  [f"{r['workload']} {r['mode']}" for r in rows if r["failures"]], len(rows))


def finish(bench: str, path: Path, started: float, failed: list[str], rows: int) -> int:
    """The run's last line (where its results are, how long it took, which rows failed) and
    its exit status: 1 if a row failed."""
    print(f"{bench}: {path.name}.md/.json in {path.parent}, "
          f"{time.perf_counter() - started:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else f"all {rows} rows passed"),
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
