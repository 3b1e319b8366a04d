"""Export a trace's timeline to the Chrome trace format (opens in Perfetto / chrome://tracing).

Tracks: ops (one slice per aten op, at its measured start and duration), layer
instances (one slice per segment, named by phase and layer), and a counter of
live bytes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sentinel_hm.trace.model import Trace

_PID = 1
_OPS_TID, _LAYERS_TID = 1, 2


def to_chrome_trace(trace: Trace) -> dict[str, Any]:
    us = 1e6
    names = {layer.index: layer.name for layer in trace.layers}
    events: list[dict[str, Any]] = [
        {"ph": "M", "pid": _PID, "name": "process_name", "args": {"name": "sentinel-hm step"}},
        {"ph": "M", "pid": _PID, "tid": _OPS_TID, "name": "thread_name", "args": {"name": "ops"}},
        {"ph": "M", "pid": _PID, "tid": _LAYERS_TID, "name": "thread_name",
         "args": {"name": "layers"}},
    ]
    for op in trace.ops:
        events.append({
            "ph": "X", "pid": _PID, "tid": _OPS_TID, "name": op.name, "cat": op.phase.value,
            "ts": op.start_s * us, "dur": op.duration_s * us,
            "args": {"index": op.index, "layer": names.get(op.layer) if op.layer is not None
                     else None, "read_bytes": op.read_bytes, "write_bytes": op.write_bytes},
        })
    for seg in trace.segments:
        first, last = trace.ops[seg.first_op], trace.ops[seg.last_op]
        label = names.get(seg.layer, "-") if seg.layer is not None else "-"
        events.append({
            "ph": "X", "pid": _PID, "tid": _LAYERS_TID, "name": f"{seg.phase.value} {label}",
            "cat": seg.phase.value, "ts": first.start_s * us,
            "dur": (last.start_s + last.duration_s - first.start_s) * us,
            "args": {"ops": [seg.first_op, seg.last_op]},
        })
    for op, live in zip(trace.ops, trace.live_bytes, strict=True):
        events.append({"ph": "C", "pid": _PID, "name": "live bytes", "ts": op.start_s * us,
                       "args": {"bytes": live}})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def save_chrome_trace(trace: Trace, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(to_chrome_trace(trace)), encoding="utf-8")
    return path
