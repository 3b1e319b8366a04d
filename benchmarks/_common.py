"""What the benchmark programs share: tuned malloc, the environment record, result files."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
# MKL's dynamic threads pick fewer threads when others are busy (a mover thread, a twin's
# leftover OpenMP team), so a matrix product sums in another order: bitwise comparisons of
# two trainings in one process need fixed thread counts (docs/runtime.md, Reproducibility)
FIXED_ENV = {"GLIBC_TUNABLES": TUNABLES, "MKL_DYNAMIC": "FALSE"}
RESULTS = Path(__file__).resolve().parent / "results"


def with_tuned_malloc() -> None:
    """Re-run this program with glibc's malloc tuned (PITFALLS.md) and MKL's thread count
    fixed: both apply at start-up."""
    if any(os.environ.get(k) != v for k, v in FIXED_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], dict(os.environ, **FIXED_ENV))


def environment(**extra: Any) -> dict[str, Any]:
    """Date, machine and versions, for the result files."""
    import torch

    import sentinel_hm

    now = dt.datetime.now(dt.UTC)
    return {"date": now.isoformat(timespec="seconds"), "day": f"{now:%Y-%m-%d}",
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "sentinel_hm": sentinel_hm.__version__, **extra}


def write_results(out_dir: Path, stem: str, data: dict[str, Any], lines: list[str],
                  quiet: bool = False) -> Path:
    """``<stem>.json`` (data) and ``<stem>.md`` (lines) in ``out_dir``; prints the lines unless
    ``quiet`` (a run that saves what it has after each row, so a killed run leaves it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / stem
    path.with_suffix(".json").write_text(json.dumps(data, indent=1))
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))
    return path


def mover_core_threads() -> int:
    """Torch threads that leave the throttled tiers' mover threads a core: the cores but one
    (a GPU's copy engines are their own hardware; on a CPU the copies take compute's cores)."""
    return max(1, (os.cpu_count() or 2) - 1)


def add_threads_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=mover_core_threads(),
                   help="torch threads (default: the cores but one, left to the mover threads)")


def set_threads(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """Apply ``--threads``; the result-file tag it needs ("" at the default)."""
    import torch

    if args.threads < 1:
        p.error(f"--threads {args.threads}: give at least 1")
    torch.set_num_threads(args.threads)
    return "" if args.threads == mover_core_threads() else f"_threads{args.threads}"
