"""Cross-check a trace's memory against torch.profiler, an independent allocator-level count."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from sentinel_hm.trace.model import Trace
from sentinel_hm.trace.profiling import profile


def step_allocated_peak(trace: Trace) -> int:
    """Peak live bytes of the storages the step itself created (what an allocator would count)."""
    return max(
        trace.live_bytes_of(s for s in trace.storages if s.created_at is not None), default=0
    )


def profile_with_reference(
    step_fn: Callable[[], Any],
    *,
    model: nn.Module | None = None,
    optimizer: Optimizer | None = None,
) -> tuple[Trace, int]:
    """Profile one step while torch.profiler records CPU allocations.

    Returns the trace and torch.profiler's peak of bytes allocated during the
    step (running sum of its ``[memory]`` events), to compare with
    `step_allocated_peak`. The allocator also sees kernel scratch buffers,
    which a trace cannot.
    """
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trace = profile(step_fn, model=model, optimizer=optimizer)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "torch_trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    memory = sorted((e for e in events if e.get("name") == "[memory]"), key=lambda e: e["ts"])
    total = peak = 0
    for e in memory:
        total += e["args"]["Bytes"]
        peak = max(peak, total)
    return trace, peak
