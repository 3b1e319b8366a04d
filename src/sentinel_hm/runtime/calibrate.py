"""Predictions calibrated on the real machine: op times that add up to a plain step's wall
time (NOTE [Recomputed layers] says how a recomputing step is calibrated)."""

from __future__ import annotations

import dataclasses

from sentinel_hm.core.hardware import Hardware
from sentinel_hm.trace.model import Trace


def calibrated(trace: Trace, hw: Hardware, plain_step_s: float) -> tuple[Trace, Hardware]:
    """Op times that add up to a plain step's wall time ``plain_step_s``.

    When the profiled ops took less, the rest is per-op framework overhead (Python, dispatch,
    autograd's engine between ops), spread evenly. When they took more, the step overlapped
    what the profile timed one op at a time: on a GPU the tracer synchronises around each
    op, so each time includes its launch, while a plain step launches kernels ahead. The op
    times are then scaled down to the step's, with no overhead (an overhead clamped to 0
    would leave the simulator's all-fast step longer than the real one)."""
    ops_s = sum(op.duration_s for op in trace.ops)
    if not trace.ops:
        return trace, hw
    if ops_s <= plain_step_s:
        overhead = (plain_step_s - ops_s) / len(trace.ops)
        return trace, dataclasses.replace(hw, op_overhead_s=overhead)
    scale = plain_step_s / ops_s
    ops = tuple(dataclasses.replace(op, duration_s=op.duration_s * scale) for op in trace.ops)
    return dataclasses.replace(trace, ops=ops), dataclasses.replace(hw, op_overhead_s=0.0)
