"""Progress of long commands on stderr."""

from __future__ import annotations

import sys


def progress(message: str, done: bool = False) -> None:
    """One updating status line on a terminal; plain lines in a log."""
    if sys.stderr.isatty():
        print(f"\r\033[K{message}", end="\n" if done else "", file=sys.stderr, flush=True)
    elif done:
        print(message, file=sys.stderr, flush=True)
