"""GPU benchmark of Hugging Face models: Sentinel against plain training, PyTorch's offloading
and Hugging Face's own gradient checkpointing.

    PYTHONPATH=src python3 benchmarks/bench_gpu_hf.py [--batch 4] [--steps 3] [--trials 1]
    PYTHONPATH=src python3 benchmarks/bench_gpu_hf.py --device cpu --tiny   (a smoke run)

Models, built from configs (random weights from seed 0, no downloads), trained with AdamW
(``foreach``, streamed by Sentinel) on ``batch`` x 1024 random tokens (labels = inputs; the
model shifts them):

- GPT-2: 12 layers x 768, 12 heads, vocabulary 50257, fp32, eager attention, dropout 0.1
  (the config's defaults), ``use_cache`` left at its default (on).
- Llama: 12 layers x 1024, 16 heads, 8 KV heads (the config's other defaults: MLP 11008,
  vocabulary 32000), bf16 autocast, eager attention, ``use_cache`` at its default.

Modes (rows), each from the same seed for the same number of steps: plain;
``torch.autograd.graph.save_on_cpu(pin_memory=True)``; Hugging Face gradient checkpointing
(``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant":
False})``); offload-all (every saved activation out after forward and back when used, run by
Sentinel's runtime with ``policy="offload-all"`` at ``fast_memory="min"``, as bench_gpu.py
does); Sentinel at 20%, 50% and "min" with its default options but ``trials`` (``--trials``,
1 by default instead of 3, to keep the run short: each trial is one more step).

Measured, per row: the allocator's peak of active bytes (``active_bytes.all.peak``, reset
before every step: blocks a side stream still copies from count too) over the timed steps,
the largest, and its share of plain's; the median wall time of the timed steps (every step
after two warm-up steps; for Sentinel its own steady, unaudited steps), synchronised at step
boundaries, and its ratio to plain's in the same run; bitwise equality with plain (every
step's loss, the final parameters and buffers; ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` and
strict deterministic algorithms, as in the first GPU run); Sentinel's stats (budget, audited
peak, predicted step, recomputed layers, bytes moved each way per step) and the lower bound
of bench_gpu.py (max of plain's step and the bytes the budget forces out over each link
direction, link bandwidths measured here).

A row passes when it ran without error; a Sentinel row (offload-all, sentinel@...) also
needs ``--steps`` timed steady steps, a binding budget with bytes moving both ways, its
steady peak within its budget (on the CPU, where there is no allocator, the audited peak)
and bitwise equality with plain. A row that raises records its exception (one line) and the
run goes on: every row releases what it holds (its Sentinel closed, ``del``, ``gc``,
``torch.cuda.empty_cache()``). Time limits: a row stops before a step that would take it
past ``--row-limit-s`` (and a step still running ``--row-limit-s`` plus a grace after the row
began is interrupted); a row not started within ``--time-limit-s`` is recorded as not run.
Either fails the row.

``--device cpu --tiny`` runs the same code paths with tiny configs on the host tiers
(``tiers="host"``), one torch thread, in well under a minute (tests/test_bench_gpu_smoke.py).

Writes benchmarks/results/gpu_<device>_hf_<date>.md and .json (``cpu_hf-tiny`` on the CPU),
rewritten after every row. Exit status: 0 every row passed, 1 a row failed, 2 no CUDA.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from _common import RESULTS, environment, with_tuned_malloc, write_results
from bench_gpu import (
    GRACE_S,
    STATS_KEYS,
    Mode,
    RowTimeout,
    _bytes,
    _one_line,
    _yes,
    bounds,
    check_time,
    device_slug,
    finish,
    interrupt_after,
    measure_link,
    steps_to_steady,
)

PLAIN_WARMUP = 2  # untimed first steps of the other modes
SEQ = 1024
TINY_SEQ = 64
LEAK_SLACK = 256 << 20  # GPU bytes a row may leave allocated (cuBLAS workspaces, ...)


MODES = (Mode("plain"), Mode("save_on_cpu"), Mode("checkpoint"),
         Mode("offload-all", "min", "offload-all"),
         Mode("sentinel@20%", "20%"), Mode("sentinel@50%", "50%"), Mode("sentinel@min", "min"))


# -- models ----------------------------------------------------------------------------------


@dataclass
class Workload:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: Callable[[], torch.Tensor]  # the next batch of token ids, on the device
    autocast: torch.dtype | None  # bf16 autocast, or None (fp32)
    device: torch.device

    def step(self) -> torch.Tensor:
        ids = self.batches()
        with (torch.autocast(self.device.type, dtype=self.autocast)
              if self.autocast is not None else contextlib.nullcontext()):
            loss = self.model(input_ids=ids, labels=ids).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def config(name: str, tiny: bool) -> tuple[Any, Any, torch.dtype | None]:
    """The model class, its config (eager attention, other options at their defaults) and
    the autocast dtype."""
    import transformers as tf

    tf.logging.set_verbosity_error()
    if name == "gpt2":
        size = (dict(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=TINY_SEQ) if tiny
                else dict(n_layer=12, n_embd=768, n_head=12, n_positions=SEQ))
        return tf.GPT2LMHeadModel, tf.GPT2Config(**size, attn_implementation="eager"), None
    if name == "llama":
        size = (dict(num_hidden_layers=2, hidden_size=64, intermediate_size=176,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                     max_position_embeddings=TINY_SEQ) if tiny
                else dict(num_hidden_layers=12, hidden_size=1024, num_attention_heads=16,
                          num_key_value_heads=8, max_position_embeddings=SEQ))
        return (tf.LlamaForCausalLM, tf.LlamaConfig(**size, attn_implementation="eager"),
                torch.bfloat16)
    raise ValueError(f"unknown model {name!r}: choose from gpt2, llama")


def build(name: str, tiny: bool, batch: int, seq: int, device: torch.device) -> Workload:
    cls, cfg, autocast = config(name, tiny)
    torch.manual_seed(0)  # the device's generator too: every mode draws the same dropout masks
    with torch.device(device):  # initialised where it trains (fast on a GPU)
        model = cls(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(1)
    vocab = cfg.vocab_size

    def batches() -> torch.Tensor:
        return torch.randint(0, vocab, (batch, seq), generator=gen).to(device)

    return Workload(model, optimizer, batches, autocast, device)


# -- running ---------------------------------------------------------------------------------


def one_step(wl: Workload, mode: Mode, sentinel: Any) -> torch.Tensor:
    if mode.name == "save_on_cpu":
        with torch.autograd.graph.save_on_cpu(pin_memory=True):
            return wl.step()
    if sentinel is not None:
        with sentinel.step():
            return wl.step()
    return wl.step()  # plain, and checkpoint (enabled on the model)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class Run:
    row: dict[str, Any]
    losses: torch.Tensor | None = None
    params: list[torch.Tensor] | None = None
    # plain's parameters and buffers after so many steps, for rows that stop earlier
    snapshots: dict[int, list[torch.Tensor]] | None = None


def _state(wl: Workload) -> list[torch.Tensor]:
    """Parameters and buffers, copied to the host (copies on the CPU too: training goes on)."""
    return [t.detach().to("cpu", copy=True)
            for t in (*wl.model.parameters(), *wl.model.buffers())]


def run_mode(name: str, mode: Mode, args: argparse.Namespace, total_steps: int,
             device: torch.device, limit_s: float, snap_at: frozenset[int] = frozenset()
             ) -> Run:
    """Plain runs ``total_steps`` steps (its state kept after each of ``snap_at``); save_on_cpu
    and checkpoint the warm-up and ``--steps`` timed steps; a Sentinel row until it has
    ``--steps`` timed steady steps, ``total_steps`` at most."""
    import sentinel_hm as sh

    row: dict[str, Any] = {"model": name, "mode": mode.name, "sentinel": mode.sentinel,
                           "fast_memory": mode.fast_memory, "policy": mode.policy,
                           "steps": total_steps, "limit_s": limit_s}
    run = Run(row, snapshots={})
    cuda = device.type == "cuda"
    steps = total_steps if mode.sentinel or mode.name == "plain" else PLAIN_WARMUP + args.steps
    wl = sentinel = None
    losses: list[torch.Tensor] = []
    times: list[float] = []
    peaks: list[int] = []
    allocated: list[int] = []
    phases: list[str] = []
    began = time.perf_counter()
    try:
        with interrupt_after(limit_s + GRACE_S):
            wl = build(name, args.tiny, args.batch, args.seq, device)
            if mode.name == "checkpoint":
                wl.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            if mode.sentinel:
                sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=mode.fast_memory,
                                       tiers="cuda" if cuda else "host", policy=mode.policy,
                                       trials=args.trials)
            last = 0.0
            for i in range(steps):
                if sentinel is not None and len(times) >= args.steps:
                    break
                check_time(began, last, limit_s, i, steps)
                phase = sentinel.stats()["phase"] if sentinel is not None else None
                counted = len(sentinel.steady_step_times) if sentinel is not None else 0
                _sync(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                losses.append(one_step(wl, mode, sentinel))
                _sync(device)
                last = time.perf_counter() - t0
                if sentinel is None:
                    timed = i >= PLAIN_WARMUP
                else:
                    after = sentinel.stats()["phase"]
                    phases.append(after)
                    timed = (phase == after == "steady"
                             and len(sentinel.steady_step_times) > counted)
                if timed:
                    times.append(last)
                    if cuda:
                        stats = torch.cuda.memory_stats(device)
                        peaks.append(stats["active_bytes.all.peak"])
                        allocated.append(stats["allocated_bytes.all.peak"])
                if i + 1 in snap_at:
                    run.snapshots[i + 1] = _state(wl)
            run.losses = torch.stack(losses).float().cpu()
            if sentinel is not None:
                stats = sentinel.stats()
                row["stats"] = {k: stats.get(k) for k in (*STATS_KEYS, "recomputed_layers",
                                                          "trials", "plain_step_s")}
                s, sentinel = sentinel, None
                s.close()  # everything back in fast memory: the parameters as training left them
            run.params = _state(wl)
    except Exception as e:  # a failed row is reported, the run goes on
        if not isinstance(e, RowTimeout):
            traceback.print_exc()
        row["error"] = _one_line(e)
        if sentinel is not None:
            with contextlib.suppress(Exception):
                stats = sentinel.stats()
                row["stats"] = {k: stats.get(k) for k in (*STATS_KEYS, "recomputed_layers")}
    finally:
        try:
            if sentinel is not None:
                with contextlib.suppress(Exception):
                    sentinel.close()
            row["steps"] = len(losses)
            del wl, sentinel, losses
        finally:
            _free(device)
    row.update(phases=phases, timed_steps=len(times), step_s=times,
               row_s=time.perf_counter() - began)
    if times:
        row["median_step_s"] = statistics.median(times)
    if peaks:
        row.update(peak_bytes=max(peaks), peak_allocated_bytes=max(allocated))
    return run


# -- judging ---------------------------------------------------------------------------------


def compare(run: Run, plain: Run | None) -> None:
    row = run.row
    """Bitwise against plain after as many steps: every step's loss, the parameters and
    buffers."""
    if plain is None or plain.losses is None or plain.params is None or run.losses is None:
        row["losses_equal"] = row["params_equal"] = None
        return
    n = len(run.losses)
    row["losses_equal"] = n <= len(plain.losses) and torch.equal(run.losses, plain.losses[:n])
    theirs = plain.params if n == len(plain.losses) else (plain.snapshots or {}).get(n)
    if run.params is not None and theirs is not None:
        row["params_equal"] = len(run.params) == len(theirs) and all(
            torch.equal(a, b) for a, b in zip(run.params, theirs, strict=True))
    elif run.params is not None:
        row["params_equal"] = None
        row["note"] = f"plain kept no parameters after {n} steps"


def failures(row: dict[str, Any], need: int) -> list[str]:
    """Why a row fails (empty: it passes)."""
    why = [row["error"]] if "error" in row else []
    if row.get("left_allocated_bytes", 0) > LEAK_SLACK:
        why.append(f"left {_bytes(row['left_allocated_bytes'])} allocated on the GPU after "
                   "its cleanup")
    if why or not row["sentinel"]:
        return why
    stats = row.get("stats") or {}
    if row["timed_steps"] < need:
        why.append(f"{row['timed_steps']} timed steady steps, fewer than {need} "
                   f"(phases: {' '.join(row['phases'])})")
    if stats.get("mismatches"):
        why.append(f"steps did not match the profile: {stats['mismatches'][0]}")
    budget, all_fast = stats.get("budget_bytes"), stats.get("all_fast_peak_bytes")
    if budget is None or all_fast is None:
        why.append("no budget in the stats")
        return why
    if budget >= all_fast:
        why.append(f"budget {budget} bytes does not bind (all-fast peak {all_fast}): "
                   "nothing moves")
    elif not (stats.get("bytes_to_slow_per_step") and stats.get("bytes_to_fast_per_step")):
        why.append("nothing moved at a binding budget")
    peak = row.get("peak_bytes", stats.get("audited_peak_fast_bytes"))
    if peak is None:
        why.append("no peak measured")
    elif peak > budget:
        why.append(f"steady peak {peak} bytes ({_bytes(peak)}) over the budget {budget} "
                   f"({_bytes(budget)})")
    if not (row.get("losses_equal") and row.get("params_equal")):
        why.append(f"not bitwise equal to plain (losses {row.get('losses_equal')}, "
                   f"parameters {row.get('params_equal')})")
    return why


# -- report ----------------------------------------------------------------------------------


def _ms(x: float | None) -> str:
    return f"{x * 1e3:.1f}" if x is not None else ""


def report(env: dict[str, Any], rows: list[dict[str, Any]], done: bool) -> list[str]:
    lines = [f"# Hugging Face models on {env['device']}, {env['day']}"
             + ("" if done else " (incomplete: still running or cut short)"), "",
             f"`{env['command']}` (torch {env['torch']}, CUDA {env['cuda']}, transformers "
             f"{env['transformers']}, sentinel_hm {env['sentinel_hm']}); deterministic "
             f"algorithms on; " + (f"measured links: h2d {env['h2d_bytes_per_s'] / 1e9:.1f} "
                                   f"GB/s, d2h {env['d2h_bytes_per_s'] / 1e9:.1f} GB/s; "
                                   if env.get("h2d_bytes_per_s") else "")
             + f"batch {env['batch']} x {env['seq']} tokens"
             + (" (half the first GPU run's 8, to fit the time budget)"
                if env["batch"] == 4 and env["seq"] == SEQ else "")
             + f"; {env['total_steps']} steps per row, at least {env['need_steady']} timed "
             f"steady steps per Sentinel row; Sentinel with trials={env['trials']}"
             + (" (its default is 3: fewer steps)" if env["trials"] != 3 else "")
             + f", other options at their defaults; tiers {env['tiers']}; row limit "
             f"{env['row_limit_s']:.0f} s, run limit {env['time_limit_s']:.0f} s.", "",
             "GPT-2: 12 x 768, fp32, eager attention. Llama: 12 layers, 1024 wide, 16 heads, 8 "
             "KV heads, bf16 autocast, eager attention (tiny configs with `--tiny`). Both from "
             "configs, `use_cache` at its default, AdamW. Peak: the largest allocator peak of "
             "active bytes over the timed steps (reset before each). Step: median wall time of "
             "the timed steps (n). Bitwise: every step's loss / the final parameters and "
             "buffers against plain. Lower bound: max(plain step, the bytes the budget forces "
             "out over each link direction).", "",
             "| model | mode | peak | of plain | step (ms) | n | x plain | bitwise | budget | "
             "audited peak | out / in per step | predicted (ms) | lower bound (ms) | "
             "recomputed | result |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---|"]
    failed = []
    for r in rows:
        st = r.get("stats") or {}
        plain = next((p for p in rows if p["model"] == r["model"] and p["mode"] == "plain"), {})
        share = (f"{r['peak_bytes'] / plain['peak_bytes']:.3f}"
                 if r.get("peak_bytes") and plain.get("peak_bytes") else "")
        ratio = (f"{r['median_step_s'] / plain['median_step_s']:.2f}"
                 if r.get("median_step_s") and plain.get("median_step_s") else "")
        moved = (f"{_bytes(st.get('bytes_to_slow_per_step'))} / "
                 f"{_bytes(st.get('bytes_to_fast_per_step'))}" if st else "")
        recomputed = len(st["recomputed_layers"]) if st.get("recomputed_layers") is not None \
            else ""
        bitwise = ("" if r["mode"] == "plain"
                   else f"{_yes(r.get('losses_equal'))} / {_yes(r.get('params_equal'))}")
        result = "ok" if not r["failures"] else "**FAIL**"
        lines.append(
            f"| {r['model']} | {r['mode']} | {_bytes(r.get('peak_bytes'))} | {share} | "
            f"{_ms(r.get('median_step_s'))} | {r.get('timed_steps', 0)} | {ratio} | {bitwise} | "
            f"{_bytes(st.get('budget_bytes'))} | {_bytes(st.get('audited_peak_fast_bytes'))} | "
            f"{moved} | {_ms(st.get('predicted_step_s'))} | {_ms(r.get('lower_bound_s'))} | "
            f"{recomputed} | {result} |")
        failed += [f"- {r['model']} {r['mode']}: {why}" for why in r["failures"]]
    lines += ["", "## Failures" if failed else "## Result", "",
              *(failed or ["Every row passed."])]
    return lines


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true",
                   help="tiny configs (4 layers, 64 wide, 64 tokens): a smoke run")
    p.add_argument("--models", default="gpt2,llama")
    p.add_argument("--modes", default=",".join(m.name for m in MODES))
    p.add_argument("--batch", type=int, default=None, help="sequences a step (default 4; 1 tiny)")
    p.add_argument("--steps", type=int, default=3, help="timed steady steps per Sentinel row")
    p.add_argument("--trials", type=int, default=1, help="Sentinel's trials (its default: 3)")
    p.add_argument("--row-limit-s", type=float, default=None,
                   help="seconds a row may take (default 28 on CUDA, 60 on the CPU)")
    p.add_argument("--time-limit-s", type=float, default=None,
                   help="rows not started within this many seconds fail as not run "
                        "(default 125 on CUDA, 600 on the CPU)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    started = time.perf_counter()
    cuda = args.device == "cuda"
    if cuda:  # cuBLAS reads it when CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if not torch.cuda.is_available():
            print("bench_gpu_hf: needs CUDA (torch.cuda.is_available() is False here; "
                  "--device cpu --tiny runs on the CPU); nothing was measured", file=sys.stderr)
            return 2
    else:
        torch.set_num_threads(1)  # the same summation order in every row
    args.batch = args.batch or (1 if args.tiny else 4)
    args.seq = TINY_SEQ if args.tiny else SEQ
    row_limit = args.row_limit_s or (28.0 if cuda else 60.0)
    time_limit = args.time_limit_s or (125.0 if cuda else 600.0)
    names = args.models.split(",")
    modes = [m for m in MODES if m.name in args.modes.split(",")]
    if not modes or modes[0].name != "plain":
        p.error("--modes must include plain (the reference of every comparison)")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.utils.deterministic.fill_uninitialized_memory = False
    import transformers

    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    link = measure_link(device) if cuda else {}
    need = args.steps
    total_steps = steps_to_steady(args.trials) + need
    # the step counts at which the other rows may stop: save_on_cpu and checkpoint after the
    # warm-up and the timed steps, a Sentinel row from its earliest steady steps on
    from sentinel_hm.runtime.manager import WARMUP_STEPS

    earliest = WARMUP_STEPS + 1 + 1 + need  # offload-all has no trials
    snap_at = frozenset({PLAIN_WARMUP + need, *range(earliest, total_steps)})
    command = ("PYTHONPATH=src python3 benchmarks/bench_gpu_hf.py "
               + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    env = environment(device=torch.cuda.get_device_name(device) if cuda else "cpu",
                      cuda=torch.version.cuda, transformers=transformers.__version__,
                      command=command, batch=args.batch, seq=args.seq, tiny=args.tiny,
                      trials=args.trials, total_steps=total_steps, need_steady=need,
                      tiers="cuda" if cuda else "host", row_limit_s=row_limit,
                      time_limit_s=time_limit, **link)
    slug = device_slug(device) if cuda else "cpu"
    stem = f"gpu_{slug}_hf{'-tiny' if args.tiny else ''}_{env['day']}"
    rows: list[dict[str, Any]] = []

    def save(done: bool) -> None:
        write_results(args.out_dir, stem, {"env": env, "rows": rows, "done": done},
                      report(env, rows, done), quiet=not done)

    for name in names:
        plain: Run | None = None
        for mode in modes:
            left = time_limit - (time.perf_counter() - started)
            if left < 1:
                run = Run({"model": name, "mode": mode.name, "sentinel": mode.sentinel,
                           "fast_memory": mode.fast_memory, "policy": mode.policy,
                           "phases": [], "timed_steps": 0,
                           "error": f"not run: the run's {time_limit:.0f} s were spent"})
            else:
                print(f"{name} {mode.name}...", file=sys.stderr, flush=True)
                before = torch.cuda.memory_allocated(device) if cuda else 0
                run = run_mode(name, mode, args, total_steps, device, min(row_limit, left),
                               snap_at if mode.name == "plain" else frozenset())
                _free(device)
                if cuda:
                    run.row["left_allocated_bytes"] = torch.cuda.memory_allocated(device) - before
                print(f"{name} {mode.name}: {run.row['row_s']:.1f} s"
                      + (f", {run.row['error']}" if "error" in run.row else ""),
                      file=sys.stderr, flush=True)
            if mode.name == "plain":
                plain = run
            else:
                compare(run, plain)
            if link:
                bounds(run.row, plain.row.get("median_step_s") if plain else None, link)
            run.row["failures"] = failures(run.row, need)
            rows.append(run.row)
            save(done=False)
        plain = None
        _free(device)
    save(done=True)
    return finish("bench_gpu_hf", args.out_dir / stem, started,
                  [f"{r['model']} {r['mode']}" for r in rows if r["failures"]], len(rows))


if __name__ == "__main__":
    if "--device" in sys.argv and "cpu" in sys.argv:
        with_tuned_malloc()  # host tiers: glibc's malloc tuned, MKL's thread count fixed
    raise SystemExit(main())
