"""Export a simulated step (ops, stalls, copies, fast-memory occupancy) to the Chrome trace format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentinel_hm.core.plan import Tier
from sentinel_hm.sim.replay import SimResult
from sentinel_hm.trace.model import Trace


def sim_to_chrome(trace: Trace, result: SimResult) -> dict[str, Any]:
    """Needs a result from ``simulate(..., timeline=True)``."""
    if not result.op_start_s:
        raise ValueError("simulate(..., timeline=True) records the timeline this export needs")
    us = 1e6
    t0 = result.op_start_s[0]
    tracks = {"compute": 1, "h2d (to fast)": 2, "d2h (to slow)": 3}
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "simulated step"}},
        *({"ph": "M", "pid": 1, "tid": tid, "name": "thread_name", "args": {"name": name}}
          for name, tid in tracks.items()),
    ]
    for op, start, end, occ in zip(trace.ops, result.op_start_s, result.op_end_s,
                                   result.fast_bytes, strict=True):
        events.append({"ph": "X", "pid": 1, "tid": 1, "name": op.name, "cat": op.phase.value,
                       "ts": (start - t0) * us, "dur": (end - start) * us})
        events.append({"ph": "C", "pid": 1, "name": "fast bytes", "ts": (start - t0) * us,
                       "args": {"bytes": occ}})
    for c in result.copies:
        tid = 2 if c.to is Tier.FAST else 3
        events.append({"ph": "X", "pid": 1, "tid": tid, "name": f"storage {c.storage}",
                       "cat": "demand" if c.demand else "planned", "ts": (c.start_s - t0) * us,
                       "dur": (c.end_s - c.start_s) * us, "args": {"bytes": c.nbytes}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def save_sim_chrome(trace: Trace, result: SimResult, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(sim_to_chrome(trace, result)), encoding="utf-8")
    return path
