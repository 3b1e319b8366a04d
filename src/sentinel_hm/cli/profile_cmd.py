"""``sentinel profile``: profile one step of a built-in or user workload into a trace file."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from sentinel_hm.cli.progress import progress
from sentinel_hm.report import summarize
from sentinel_hm.trace import Trace, profile, save_chrome_trace, save_trace
from sentinel_hm.workloads import SIZES, WORKLOADS, Workload, load_factory, make_workload


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "profile",
        help="profile one training step into a trace file",
        description="Profile one steady training step (after warm-up steps) into a trace file.",
    )
    add_workload_args(p)
    p.add_argument("--warmup", type=int, default=3, metavar="N",
                   help="plain steps before the profiled one; all but the first are timed "
                        "(default 3)")
    p.add_argument("--out", type=Path, default=Path("trace.json"),
                   help="trace file to write (.json or .json.gz; default trace.json)")
    p.add_argument("--chrome", type=Path, metavar="PATH",
                   help="also write the step's timeline in Chrome trace format (Perfetto)")
    p.add_argument("--quiet", action="store_true", help="do not print the summary")
    p.set_defaults(run=run)


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="gpt", metavar="NAME",
                   help=f"one of {', '.join(WORKLOADS)}, or package.module:factory for your own "
                        "(a function returning model, optimizer, batch factory; model(*batch) "
                        "returns the loss). Default gpt")
    p.add_argument("--size", default="small", choices=SIZES,
                   help="size of a built-in workload (default small)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and batches (default 0)")


def build_workload(args: argparse.Namespace) -> Workload:
    if ":" in args.workload:
        # Like `python -m`, look for the user's module in the current directory first.
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        return load_factory(args.workload, seed=args.seed)
    return make_workload(args.workload, size=args.size, seed=args.seed)


def profile_workload(workload: Workload, warmup: int, label: str) -> Trace:
    """Warm up (timing the plain steps), profile one step, and record both times."""
    plain_s = []
    for i in range(warmup):
        progress(f"{label}: warm-up step {i + 1}/{warmup}")
        start = time.perf_counter()
        workload.step()
        plain_s.append(time.perf_counter() - start)
    progress(f"{label}: profiling one step")
    trace = profile(workload.step, model=workload.model, optimizer=workload.optimizer)
    progress(f"{label}: profiled one step, {len(trace.ops)} ops", done=True)
    meta = dict(trace.meta, workload=label)
    if len(plain_s) > 1:  # the first warm-up step pays one-off costs (allocator, lazy state)
        meta["plain_step_s"] = statistics.median(plain_s[1:])
    return Trace(trace.ops, trace.storages, trace.layers, meta)


def workload_label(args: argparse.Namespace) -> str:
    return args.workload if ":" in args.workload else f"{args.workload}/{args.size}"


def run(args: argparse.Namespace) -> int:
    if args.warmup < 0:
        from sentinel_hm.errors import SentinelError

        raise SentinelError(f"--warmup {args.warmup} is negative: give 0 or more steps")
    workload = build_workload(args)
    trace = profile_workload(workload, args.warmup, workload_label(args))
    out = save_trace(trace, args.out)
    print(f"wrote {out}", file=sys.stderr)
    if args.chrome:
        print(f"wrote {save_chrome_trace(trace, args.chrome)}", file=sys.stderr)
    if not args.quiet:
        print(summarize(trace))
    return 0
