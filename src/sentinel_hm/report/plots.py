"""Plots for the planning commands; they need the ``plot`` extra (matplotlib).

matplotlib is imported only when a plot is asked for, so the package and the
CLI work without it. Figures are drawn on an Agg canvas directly (no pyplot),
so a plot neither needs a display nor changes the caller's matplotlib backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sentinel_hm.errors import SentinelError

_INSTALL = "pip install 'sentinel-hm[plot]'"


def require_matplotlib() -> None:
    """Fail early, before any long computation, when the plot extra is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SentinelError(f"plotting needs matplotlib: {_INSTALL}") from None


def plot_slowdown(
    budget_percent: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    path: str | Path,
    *,
    title: str = "",
    log_y: bool = False,
) -> Path:
    """PNG of slowdown over all-fast against budget (% of the all-fast peak).

    One line per policy; ``None`` (refused, or not applicable) leaves a gap.
    """
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax: Any = fig.add_subplot()
    for policy, values in series.items():
        ys = [math.nan if v is None else v for v in values]
        if all(math.isnan(y) for y in ys):
            continue  # nothing to draw; a legend entry with no line would only confuse
        ax.plot(budget_percent, ys, marker="o", markersize=3, label=policy)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("fast-memory budget (% of the all-fast peak)")
    ax.set_ylabel("slowdown over all-fast (simulated)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    path = Path(path)
    try:
        fig.savefig(path, dpi=120, format="png")
    except OSError as e:
        raise SentinelError(f"{path}: cannot write the plot: {e}") from None
    return path


def plot_fast_bytes(
    curves: Mapping[str, Sequence[int]],
    path: str | Path,
    *,
    budget_bytes: int | None = None,
    title: str = "",
) -> Path:
    """PNG of fast-tier bytes over one step (x: the step's progress, 0 to 1), one line per
    run, with the budget as a horizontal line."""
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax: Any = fig.add_subplot()
    mib = 2**20
    for label, curve in curves.items():
        n = max(len(curve) - 1, 1)
        ax.plot([i / n for i in range(len(curve))], [b / mib for b in curve], label=label,
                linewidth=1.2)
    if budget_bytes is not None:
        ax.axhline(budget_bytes / mib, color="red", linewidth=0.9, linestyle="--",
                   label="budget")
    ax.set_xlabel("progress through the step (op index / op count)")
    ax.set_ylabel("fast-tier bytes (MiB, measured)")
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    out = Path(path)
    fig.savefig(out, dpi=120)
    return out
