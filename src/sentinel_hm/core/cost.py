"""Cost model: how long each op takes on the target, and what slow data adds.

Op time. When the trace was taken on the target (``Hardware.measured_op_times``)
the measured duration is used, plus the per-op framework overhead that a
duration does not include (Python, dispatch, autograd's engine between ops:
``op_overhead_s``, which a runtime calibrates from a timed plain step). Otherwise a roofline from first principles:
``max(flops / peak flops, bytes / fast-tier bandwidth) + per-op overhead``,
with reads and writes at their own bandwidths.

Slow data, direct access. An op that reads or writes slow-resident bytes in
place cannot be faster than moving its data at the tiers' bandwidths:
``time = max(base time, memory time with each byte at its own tier's
bandwidth + overhead)``. A compute-bound op hides slow data; a memory-bound
one pays for it. The bytes an op moves are split over the storages it touches
in proportion to their sizes (a trace records each op's totals).

Slow data, migrate access. Ops always run at fast speed; the simulator makes
them wait for copies instead (see ``sentinel_hm.sim``).
"""

from __future__ import annotations

from sentinel_hm.core.hardware import Hardware
from sentinel_hm.trace.model import Trace


class CostModel:
    """Per-op base times and per-op byte shares, computed once per (trace, hardware)."""

    def __init__(self, trace: Trace, hardware: Hardware) -> None:
        self.hardware = hardware
        fast = hardware.fast
        self.base_s: list[float] = []
        for op in trace.ops:
            if hardware.measured_op_times:
                self.base_s.append(op.duration_s + hardware.op_overhead_s)
            else:
                memory = op.read_bytes / fast.read_bytes_per_s + op.write_bytes / fast.write_bytes_per_s
                self.base_s.append(max(op.flops / hardware.flops_per_s, memory) + hardware.op_overhead_s)
        sizes = {s.id: s.nbytes for s in trace.storages}
        # per op: [(storage, bytes read of it)], [(storage, bytes written to it)]
        self.reads: list[tuple[tuple[int, float], ...]] = []
        self.writes: list[tuple[tuple[int, float], ...]] = []
        for op in trace.ops:
            self.reads.append(_shares(op.inputs, op.read_bytes, sizes))
            self.writes.append(_shares(op.outputs, op.write_bytes, sizes))

    def direct_time(self, op: int, slow_fraction: dict[int, float]) -> float:
        """Time of ``op`` when storage ``s`` has ``slow_fraction[s]`` of its bytes in the slow tier."""
        base = self.base_s[op]
        hw = self.hardware
        fast_r, fast_w = hw.fast.read_bytes_per_s, hw.fast.write_bytes_per_s
        slow_r, slow_w = hw.slow.read_bytes_per_s, hw.slow.write_bytes_per_s
        memory = 0.0
        slow_any = False
        for sid, nbytes in self.reads[op]:
            f = slow_fraction.get(sid, 0.0)
            slow_any |= f > 0
            memory += nbytes * ((1 - f) / fast_r + f / slow_r)
        for sid, nbytes in self.writes[op]:
            f = slow_fraction.get(sid, 0.0)
            slow_any |= f > 0
            memory += nbytes * ((1 - f) / fast_w + f / slow_w)
        if not slow_any:
            return base
        return max(base, memory + hw.op_overhead_s)



def _shares(
    storages: tuple[int, ...], total: int, sizes: dict[int, int]
) -> tuple[tuple[int, float], ...]:
    if not storages or total == 0:
        return ()
    weight = sum(sizes[s] for s in storages)
    if weight == 0:
        return ()
    return tuple((s, total * sizes[s] / weight) for s in storages)
