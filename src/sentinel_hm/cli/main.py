"""Entry point of the ``sentinel`` command.

Every expected failure (bad input, unreadable file, a user's factory that does
not import) ends with one line on stderr and exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sentinel_hm.cli import demo_cmd, min_budget_cmd, plan_cmd, profile_cmd, show_cmd, simulate_cmd
from sentinel_hm.errors import SentinelError

_COMMANDS = (profile_cmd, show_cmd, plan_cmd, simulate_cmd, min_budget_cmd, demo_cmd)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sentinel",
        description="Profile a training step at tensor granularity and plan tiered memory.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except SentinelError as e:
        print(f"sentinel {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sentinel {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
