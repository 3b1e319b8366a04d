"""``sentinel demo``: the main job on the built-in GPT.

Until the runtime lands this profiles the reference GPT and prints the trace
summary; the runtime turns it into training with and without Sentinel.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sentinel_hm.cli.profile_cmd import profile_workload
from sentinel_hm.report import summarize
from sentinel_hm.trace import save_chrome_trace, save_trace
from sentinel_hm.workloads import SIZES, make_workload


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="profile the reference GPT and show what Sentinel sees",
                       description="Profile the reference GPT and print the trace summary; "
                                   "writes sentinel-report/ (trace and Chrome timeline).")
    p.add_argument("--size", default="small", choices=SIZES, help="GPT size (default small)")
    p.add_argument("--out-dir", type=Path, default=Path("sentinel-report"),
                   help="where to write the trace and timeline (default sentinel-report)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    workload = make_workload("gpt", size=args.size, seed=0)
    trace = profile_workload(workload, warmup=3, label=f"gpt/{args.size}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    save_trace(trace, args.out_dir / "trace.json.gz")
    save_chrome_trace(trace, args.out_dir / "timeline.json")
    print(summarize(trace))
    print(f"\nwrote {args.out_dir}/trace.json.gz and {args.out_dir}/timeline.json "
          "(open the timeline in https://ui.perfetto.dev)", file=sys.stderr)
    return 0
