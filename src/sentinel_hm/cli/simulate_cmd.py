"""``sentinel simulate``: slowdown over all-fast of each policy at each budget, in simulation.

Answers "how much fast memory does each policy need" in one table (and
optionally a plot), the way the Sentinel paper compares policies.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any

from sentinel_hm.cli.plan_cmd import (
    Setup,
    add_trace_args,
    check_policy_name,
    format_ms,
    load_setup,
    write_or_fail,
)
from sentinel_hm.cli.progress import progress
from sentinel_hm.core.hardware import Access
from sentinel_hm.errors import SentinelError
from sentinel_hm.planning.policies import DIRECT_ONLY, POLICIES
from sentinel_hm.report.tables import NOT_APPLICABLE, REFUSED, Cell, slowdown_table
from sentinel_hm.units import format_bytes, parse_budget, parse_bytes

DEFAULT_BUDGETS = "10%,20%,...,100%"
_ELLIPSIS = "..."
_PERCENT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*%\s*$")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="table of each policy's simulated slowdown at each budget",
        description="Plan the trace with each policy at each budget and print the simulated "
                    "slowdown over all-fast on the same hardware. 'refused': the policy cannot "
                    "keep the step within the budget; 'n/a': it does not apply to the hardware.",
    )
    add_trace_args(p)
    p.add_argument("--budgets", default=DEFAULT_BUDGETS, metavar="LIST",
                   help="comma-separated budgets, shares of the all-fast peak ('20%%') or sizes "
                        "('4GiB'); 'a,b,...,c' expands to a, b, b+(b-a), ... up to c "
                        f"(default {DEFAULT_BUDGETS.replace('%', '%%')})")
    p.add_argument("--policies", default="all", metavar="LIST",
                   help=f"comma-separated policies, or 'all' ({', '.join(POLICIES)}; default all)")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help="also plot slowdown against budget (needs the plot extra: "
                        "pip install 'sentinel-hm[plot]')")
    p.add_argument("--log-y", action="store_true", help="logarithmic slowdown axis in --plot")
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the table as JSON")
    p.set_defaults(run=run)


# --- option parsing -----------------------------------------------------------------------


def parse_policies(text: str) -> tuple[str, ...]:
    """``'all'`` or a comma list of known policies, in the order given, without repeats."""
    if text.strip() == "all":
        return POLICIES
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise SentinelError(
            f"--policies {text!r} has an empty item; give e.g. 'sentinel,vdnn' or 'all'"
        )
    return tuple(dict.fromkeys(check_policy_name(name) for name in names))


def _range_value(item: str) -> tuple[str, float]:
    """(unit, value) of one endpoint of a ``...`` range: ``('%', 20.0)`` or ``('B', 4e9)``."""
    m = _PERCENT_RE.match(item)
    if m:
        return "%", float(m[1])
    try:
        return "B", float(parse_bytes(item))
    except SentinelError:
        raise SentinelError(
            f"budget {item!r} in a '...' range is neither a percentage nor a size; "
            "write e.g. '10%,20%,...,100%' or '1GiB,2GiB,...,8GiB'"
        ) from None


def _between(a: str, b: str, c: str) -> list[str]:
    """The items strictly between ``b`` and ``c`` of the progression ``a, b, ..., c``."""
    (ua, va), (ub, vb), (uc, vc) = _range_value(a), _range_value(b), _range_value(c)
    where, example = f"budget range {a},{b},...,{c}", "write e.g. '10%,20%,...,100%'"
    if not ua == ub == uc:
        raise SentinelError(f"{where} mixes percentages and sizes; {example}")
    step = vb - va
    if step <= 0 or vc <= vb:
        raise SentinelError(f"{where} does not increase from {a} through {b} to {c}; {example}")
    n = round((vc - va) / step)
    if not math.isclose(va + n * step, vc, rel_tol=1e-9, abs_tol=1e-9):
        raise SentinelError(
            f"{where}: {c} is not reached in steps of {b} - {a}; make the last item a whole "
            f"number of steps from the first, {example}"
        )
    if n >= 1000:
        raise SentinelError(f"{where} has {n + 1} items; keep it under 1000")
    values = [va + i * step for i in range(2, n)]
    if ua == "%":
        return [f"{round(v, 9):g}%" for v in values]
    return [str(round(v)) for v in values]


def expand_budgets(text: str) -> list[str]:
    """Split a comma list of budgets and expand each ``a,b,...,c`` range."""
    items = [item.strip() for item in text.split(",")]
    if not all(items):
        raise SentinelError(
            f"--budgets {text!r} has an empty item; give e.g. '10%,20%,...,100%' or '1GiB,2GiB'"
        )
    out: list[str] = []
    for i, item in enumerate(items):
        if item != _ELLIPSIS:
            out.append(item)
            continue
        if i < 2 or i + 1 >= len(items) or _ELLIPSIS in (items[i - 2], items[i - 1], items[i + 1]):
            raise SentinelError(
                f"--budgets {text!r}: '...' needs two budgets before it and one after, "
                "as in '10%,20%,...,100%'"
            )
        out += _between(items[i - 2], items[i - 1], items[i + 1])
    return out


def budget_label(item: str, budget: int) -> str:
    return item if item.endswith("%") else format_bytes(budget)


# --- the sweep ----------------------------------------------------------------------------


def _cell(setup: Setup, budget: int, policy: str) -> tuple[Cell, dict[str, Any]]:
    """The table cell and its JSON record for one (budget, policy)."""
    hw = setup.ctx.hardware
    if policy in DIRECT_ONLY and hw.access is not Access.DIRECT:
        return NOT_APPLICABLE, {
            "status": NOT_APPLICABLE,
            "reason": f"{policy} needs direct access to the slow tier; "
                      f"{hw.name} uses {hw.access.value} access",
        }
    try:
        _plan, result = setup.evaluate(budget, policy)
    except SentinelError as e:
        return REFUSED, {"status": REFUSED, "reason": str(e)}
    slowdown = setup.slowdown(result)
    return slowdown, {
        "status": "ok",
        "slowdown": slowdown,
        "step_s": result.step_s,
        "stall_s": result.stall_s,
        "bytes_to_fast": result.bytes_to_fast,
        "bytes_to_slow": result.bytes_to_slow,
        "peak_fast_bytes": result.peak_fast_bytes,
    }


def run(args: argparse.Namespace) -> int:
    policies = parse_policies(args.policies)
    items = expand_budgets(args.budgets)
    if args.plot is not None:
        from sentinel_hm.report.plots import require_matplotlib

        require_matplotlib()  # before the sweep, not after it
    setup = load_setup(args.trace, args.hardware, args.recompute)
    budgets = [parse_budget(item, setup.peak) for item in items]
    labels = [(budget_label(item, b), format_bytes(b)) for item, b in zip(items, budgets, strict=True)]

    cells: dict[tuple[int, str], Cell] = {}
    records: list[dict[str, Any]] = []
    total, started = len(budgets) * len(policies), time.perf_counter()
    for i, budget in enumerate(budgets):
        row: dict[str, Any] = {}
        for j, policy in enumerate(policies):
            k = i * len(policies) + j + 1
            progress(f"simulate: cell {k}/{total} (budget {labels[i][0]}, {policy})")
            cells[i, policy], row[policy] = _cell(setup, budget, policy)
        records.append({"budget": items[i], "budget_bytes": budget,
                        "budget_share": budget / setup.peak, "cells": row})
    progress(f"simulate: {total} cells in {time.perf_counter() - started:.1f} s", done=True)

    hw = setup.ctx.hardware
    print(f"slowdown over all-fast on {hw.name} (simulated step / all-fast step "
          f"{format_ms(setup.all_fast.step_s)}); all-fast peak {format_bytes(setup.peak)}")
    print(slowdown_table(labels, policies, cells))
    if any(c == REFUSED for c in cells.values()):
        print(f"{REFUSED}: the policy cannot keep the step within the budget "
              "(`sentinel min-budget` finds the smallest it can)")
    if any(c == NOT_APPLICABLE for c in cells.values()):
        print(f"{NOT_APPLICABLE}: the policy needs direct access to the slow tier; "
              f"{hw.name} migrates")

    if args.json is not None:
        data = {
            "trace": str(args.trace),
            "hardware": hw.name,
            "all_fast_peak_bytes": setup.peak,
            "all_fast_step_s": setup.all_fast.step_s,
            "policies": list(policies),
            "rows": records,
        }
        path = args.json
        out = write_or_fail(lambda: _write_json(data, path), path)
        print(f"wrote {out}", file=sys.stderr)
    if args.plot is not None:
        from sentinel_hm.report.plots import plot_slowdown

        series = {p: [c if isinstance(c := cells[i, p], float) else None
                      for i in range(len(budgets))] for p in policies}
        out = plot_slowdown([100 * b / setup.peak for b in budgets], series, args.plot,
                            title=f"{args.trace.name} on {hw.name}", log_y=args.log_y)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def _write_json(data: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path
