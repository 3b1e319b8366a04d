"""Plain-text tables for the planning commands (``sentinel simulate`` and friends).

One formatter for every table the CLI prints, so columns line up the same way
everywhere: labels on the left, numbers right-aligned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

REFUSED = "refused"  # the policy cannot keep the step within the budget
NOT_APPLICABLE = "n/a"  # the policy does not apply to the hardware (e.g. needs direct access)

Cell = float | str  # a slowdown, or REFUSED / NOT_APPLICABLE


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1
) -> list[str]:
    """Lines of a table: header, a rule, then rows; the first ``left`` columns left-aligned.

    The same layout as the trace summary's tables (two spaces between columns).
    """
    width = len(header)
    if any(len(r) != width for r in rows):
        raise ValueError(f"every row needs {width} cells, as the header has")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(width)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def format_slowdown(cell: Cell) -> str:
    """``1.36`` for a slowdown; markers (refused, n/a) as they are."""
    return cell if isinstance(cell, str) else f"{cell:.2f}"


def slowdown_table(
    budgets: Sequence[tuple[str, str]],
    policies: Sequence[str],
    cells: Mapping[tuple[int, str], Cell],
) -> str:
    """Rows = budgets (``(label, size)`` pairs), columns = policies, cells = slowdowns.

    ``cells`` is keyed by (budget row index, policy); a missing cell prints as ``-``.
    """
    rows = [
        (label, size, *(format_slowdown(cells.get((i, p), "-")) for p in policies))
        for i, (label, size) in enumerate(budgets)
    ]
    return "\n".join(format_table(("budget", "fast bytes", *policies), rows, left=1))
