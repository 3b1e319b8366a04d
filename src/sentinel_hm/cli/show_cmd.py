"""``sentinel show``: print the summary of a trace file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sentinel_hm.report import summarize
from sentinel_hm.trace import load_trace, save_chrome_trace


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("show", help="print a trace file's summary",
                       description="Print a trace's summary: bytes by kind, short-lived share, "
                                   "saved bytes per layer, peak and where, op count, overhead.")
    p.add_argument("trace", type=Path, help="a trace file written by `sentinel profile`")
    p.add_argument("--chrome", type=Path, metavar="PATH",
                   help="also write the step's timeline in Chrome trace format (Perfetto)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    trace = load_trace(args.trace)
    print(summarize(trace))
    if args.chrome:
        print(f"wrote {save_chrome_trace(trace, args.chrome)}", file=sys.stderr)
    return 0
