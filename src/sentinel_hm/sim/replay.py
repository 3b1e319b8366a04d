"""Deterministic replay of (Trace, Plan, Hardware): predicted step time and fast-memory use.

NOTE [Simulator rules]
- One compute stream runs the ops in trace order; each op takes the cost
  model's time (direct access: longer when it touches slow bytes in place).
- Each direction of the link is a FIFO served by ``copy_engines`` engines
  that share the direction's bandwidth; a copy takes ``latency +
  bytes / bandwidth``.
- Fast-tier occupancy = storages the plan leaves alone (always fast) + the
  fast bytes of managed storages + prefetches in flight (reserved when the
  copy starts) + evictions in flight (released when the copy ends). The
  capacity is the plan's budget; it is never exceeded silently:
  * a prefetch starts only when its bytes fit, else it waits (in FIFO order)
    for evictions or frees;
  * an op that allocates, or that needs data not yet fast (migrate access),
    stalls until evictions in flight release enough; if nothing in flight
    can, the excess is recorded as ``overflow_bytes`` (a plan error).
- Migrate access: an op waits for the prefetches of the data it touches; data
  the plan did not prefetch is fetched on demand (a stall) and stays fast
  until the plan evicts it.
- An eviction of data that is unchanged since it came from the slow tier
  ("clean") copies nothing.
- The step ends when compute and every copy have finished (copies that would
  overlap the next step are charged to this one: conservative).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field, replace

from sentinel_hm.core.cost import CostModel
from sentinel_hm.core.hardware import Access, Hardware
from sentinel_hm.core.plan import Move, Plan, Tier
from sentinel_hm.core.presets import parse_hardware
from sentinel_hm.errors import SentinelError
from sentinel_hm.trace.model import Trace
from sentinel_hm.trace.recompute import recomputed_as, with_recomputed_layers


@dataclass(frozen=True)
class Copy:
    storage: int
    to: Tier
    nbytes: int
    start_s: float
    end_s: float
    demand: bool  # fetched because an op needed it, not issued by the plan


@dataclass(frozen=True)
class SimResult:
    step_s: float
    compute_s: float
    stall_s: float
    bytes_to_fast: int
    bytes_to_slow: int
    peak_fast_bytes: int
    overflow_bytes: int
    fast_bytes: tuple[int, ...]  # occupancy during each op
    op_start_s: tuple[float, ...] = ()
    op_end_s: tuple[float, ...] = ()
    copies: tuple[Copy, ...] = field(default=())
    # storage id -> fast bytes it holds during op ``snapshot_at`` (see `simulate`); None unless
    # a snapshot was asked for
    fast_at_snapshot: dict[int, int] | None = None
    # stall_s by the phase of the op that waited ("forward", "backward", ...)
    stall_by_phase: dict[str, float] = field(default_factory=dict)


def _with_step_time(result: SimResult, step_s: float) -> SimResult:
    return replace(result, step_s=step_s)


def simulate(
    trace: Trace,
    plan: Plan,
    hardware: Hardware | str,
    *,
    cost: CostModel | None = None,
    timeline: bool = False,
    snapshot_at: int | None = None,
) -> SimResult:
    """Replay the step under ``plan`` on ``hardware`` (a `Hardware` or a preset spec such as
    ``"h100-sxm,h2d=50GB/s"``); see NOTE [Simulator rules]. ``timeline=True`` also records
    op and copy times, for `save_sim_chrome`.

    ``snapshot_at=i`` also records which storages hold the fast bytes during op ``i``, as
    ``result.fast_at_snapshot``: storage id -> bytes (storages with none left out). Storages
    the plan leaves alone count whole while live; a managed storage counts its fast bytes
    plus its evictions still in flight. The values sum to ``result.fast_bytes[i]``.
    """
    if isinstance(hardware, str):
        hardware = parse_hardware(hardware)
    if plan.recompute and recomputed_as(trace) != (plan.recompute, plan.recompute_keeps):
        # NOTE [Recompute as a trace]: the plan is for the step that recomputes these layers
        trace = with_recomputed_layers(trace, plan.recompute, plan.recompute_keeps)
        if cost is not None and len(cost.base_s) != len(trace.ops):
            cost = None  # the caller's cost model is the original step's
    if snapshot_at is not None and not 0 <= snapshot_at < len(trace.ops):
        raise SentinelError(
            f"snapshot_at={snapshot_at} is not an op of this trace: give 0 to "
            f"{len(trace.ops) - 1}"
        )
    replay = _Replay(trace, plan, hardware, cost or CostModel(trace, hardware), timeline)
    return replay.run(snapshot_at)


class _Replay:
    def __init__(
        self, trace: Trace, plan: Plan, hw: Hardware, cost: CostModel, timeline: bool
    ) -> None:
        if plan.n_ops != len(trace.ops) or plan.n_storages != len(trace.storages):
            raise SentinelError(
                f"plan was made for a trace with {plan.n_ops} ops and {plan.n_storages} "
                f"storages, this trace has {len(trace.ops)} and {len(trace.storages)}: "
                "plan this trace again"
            )
        self.trace, self.plan, self.hw, self.cost = trace, plan, hw, cost
        self.want_timeline = timeline
        self.phases = [op.phase.value for op in trace.ops]
        self.capacity = plan.budget_bytes
        self.direct = hw.access is Access.DIRECT
        n = len(trace.ops)
        managed = plan.managed
        storages = trace.storages
        self.nbytes = [s.nbytes for s in storages]
        self.base_live = trace.live_bytes_of(s for s in storages if s.id not in managed)
        self.moves_at: dict[int, list[Move]] = {}
        for mv in plan.moves:
            self.moves_at.setdefault(mv.issue_at, []).append(mv)
        self.created_at: dict[int, list[int]] = {}
        self.freed_at: dict[int, list[int]] = {}
        self.initial: list[int] = []
        self.leftover: list[int] = []
        for sid in managed:
            s = storages[sid]
            if s.created_at is None:
                self.initial.append(sid)
            elif s.freed_at is None:
                self.leftover.append(sid)
            else:
                self.created_at.setdefault(s.created_at, []).append(sid)
            if s.freed_at is not None:
                self.freed_at.setdefault(s.freed_at, []).append(sid)
        # ops that touch managed storages, found from the storages' side (few of them)
        touching: dict[int, list[int]] = {}
        writing: dict[int, list[int]] = {}
        accesses = trace.accesses
        for sid in managed:
            reads, writes = accesses[sid]
            for op in reads:
                touching.setdefault(op, []).append(sid)
            for op in writes:
                touching.setdefault(op, []).append(sid)
                writing.setdefault(op, []).append(sid)
        self.touch = {op: tuple(dict.fromkeys(sids)) for op, sids in touching.items()}
        self.written = {op: tuple(writing.get(op, ())) for op in touching}
        self.n_ops = n
        # replay state, set up by run()
        self.t = 0.0
        self.managed_fast = 0
        self.overflow = 0
        self.stall_s = self.compute_s = 0.0
        self.to_fast = self.to_slow = 0
        # evictions in flight: (end s, bytes, storage); their bytes stay in managed_fast
        # until the copy ends. The storage id only serves snapshots.
        self.releases: list[tuple[float, int, int]] = []
        self.copies: list[Copy] = []

    # -- copies --------------------------------------------------------------------------------

    def _lane(self, to: Tier) -> tuple[list[float], float]:
        link = self.hw.link
        if to is Tier.FAST:
            return self.h2d_lanes, link.h2d_bytes_per_s / link.copy_engines
        return self.d2h_lanes, link.d2h_bytes_per_s / link.copy_engines

    def _copy(self, sid: int, to: Tier, nbytes: int, ready_s: float, demand: bool) -> float:
        lanes, bandwidth = self._lane(to)
        k = min(range(len(lanes)), key=lanes.__getitem__)
        start = max(ready_s, lanes[k])
        end = start + self.hw.link.latency_s + nbytes / bandwidth
        lanes[k] = end
        if self.timeline:
            self.copies.append(Copy(sid, to, nbytes, start, end, demand))
        return end

    def _release_until(self, t: float) -> None:
        rel = self.releases
        while rel and rel[0][0] <= t:
            self.managed_fast -= heapq.heappop(rel)[1]

    def _make_room(self, need: int, base: int) -> None:
        """Stall compute until ``need`` more bytes fit, or record the overflow."""
        self._release_until(self.t)
        while base + self.managed_fast + need > self.capacity and self.releases:
            when, freed, _ = heapq.heappop(self.releases)
            if when > self.t:
                self.stall_s += when - self.t
                self.t = when
            self.managed_fast -= freed
        over = base + self.managed_fast + need - self.capacity
        self.overflow = max(self.overflow, over)

    def _start_prefetch(self, sid: int, nbytes: int, issued_s: float, demand: bool) -> None:
        self.managed_fast += nbytes
        self.fast[sid] += nbytes
        self.ready[sid] = self._copy(sid, Tier.FAST, nbytes, max(issued_s, self.t), demand)
        self.clean[sid] = True
        self.to_fast += nbytes

    def _pump(self, base: int) -> None:
        """Start pending prefetches, in order, while they fit."""
        self._release_until(self.t)
        pending = self.pending
        while pending:
            sid, nbytes, issued = pending[0]
            if base + self.managed_fast + nbytes > self.capacity:
                return
            pending.popleft()
            self.pending_ids.discard(sid)
            self._start_prefetch(sid, nbytes, issued, demand=False)

    def _force(self, sid: int, base: int) -> None:
        """An op needs ``sid`` in fast memory now (migrate access)."""
        missing = self.nbytes[sid] - self.fast[sid]
        if sid in self.pending_ids:
            # start everything queued before it too: FIFO
            while self.pending:
                qsid, nbytes, issued = self.pending.popleft()
                self.pending_ids.discard(qsid)
                self._make_room(nbytes, base)
                self._start_prefetch(qsid, nbytes, issued, demand=False)
                if qsid == sid:
                    break
        elif missing > 0:
            self._make_room(missing, base)
            self._start_prefetch(sid, missing, self.t, demand=True)

    # -- the replay ----------------------------------------------------------------------------

    def run(self, snapshot_at: int | None = None) -> SimResult:
        link = self.hw.link
        self.h2d_lanes = [0.0] * link.copy_engines
        self.d2h_lanes = [0.0] * link.copy_engines
        self.releases = []
        self.pending: deque[tuple[int, int, float]] = deque()
        self.pending_ids: set[int] = set()
        n_st = len(self.nbytes)
        self.fast = [0] * n_st
        self.ready = [0.0] * n_st
        self.clean = [False] * n_st
        self.t = 0.0
        self.managed_fast = 0
        for sid in self.initial:
            fb = self.plan.placement.get(sid, self.nbytes[sid])
            self.fast[sid] = fb
            self.clean[sid] = True  # a steady step: the slow copy is current
            self.managed_fast += fb
        # NOTE [Steady-state step time]: copies issued late in a step overlap the start of
        # the next one, so the step is replayed twice and the second is measured, from the
        # end of the first step's compute to the end of its own.
        self._step(record=False)
        first_end = self.t
        for sid in self.leftover:  # created in the step and never freed: replaced next step
            self.managed_fast -= self.fast[sid]
            self.fast[sid] = 0
        result = self._step(record=True, snapshot_at=snapshot_at)
        return result if first_end == 0 else _with_step_time(result, self.t - first_end)

    def _step(self, record: bool, snapshot_at: int | None = None) -> SimResult:
        self.copies = []
        self.stall_s = 0.0
        self.compute_s = 0.0
        self.overflow = 0
        self.to_fast = self.to_slow = 0
        self.timeline = self.want_timeline and record
        placement = self.plan.placement
        fast, nbytes, ready, clean = self.fast, self.nbytes, self.ready, self.clean
        base_s, base_live = self.cost.base_s, self.base_live
        occupancy = [0] * self.n_ops
        starts: list[float] = []
        ends: list[float] = []
        peak = 0
        step_start = self.t
        snap = -1 if snapshot_at is None else snapshot_at  # one int compare per op when off
        snapshot: dict[int, int] | None = None
        stall_by_phase: dict[str, float] = {}
        stalled = 0.0  # stall_s before this op's waits
        for i in range(self.n_ops):
            base = base_live[i]
            moves = self.moves_at.get(i)
            if moves:
                self._release_until(self.t)
                for mv in moves:
                    self._issue(mv, base)
            created = self.created_at.get(i)
            if created:
                for sid in created:
                    fb = placement.get(sid, nbytes[sid])
                    self._make_room(fb, base)
                    fast[sid] = fb
                    clean[sid] = False  # new data: an eviction must copy it
                    self.managed_fast += fb
            elif base + self.managed_fast > self.capacity:
                self._make_room(0, base)
            touched = self.touch.get(i)
            duration = base_s[i]
            if touched:
                if self.direct:
                    slow = {s: 1 - fast[s] / nbytes[s] for s in touched if fast[s] < nbytes[s]}
                    if slow:
                        duration = self.cost.direct_time(i, slow)
                else:
                    for sid in touched:
                        if fast[sid] < nbytes[sid]:
                            self._force(sid, base)
                        if ready[sid] > self.t:
                            self.stall_s += ready[sid] - self.t
                            self.t = ready[sid]
                for sid in self.written[i]:
                    clean[sid] = False
            if self.stall_s != stalled:
                phase = self.phases[i]
                stall_by_phase[phase] = stall_by_phase.get(phase, 0.0) + self.stall_s - stalled
                stalled = self.stall_s
            occ = base + self.managed_fast
            occupancy[i] = occ
            if occ > peak:
                peak = occ
            if i == snap:
                snapshot = self._snapshot(i)
            if self.timeline:
                starts.append(self.t)
            self.t += duration
            self.compute_s += duration
            if self.timeline:
                ends.append(self.t)
            freed = self.freed_at.get(i)
            if freed:
                for sid in freed:
                    self.managed_fast -= fast[sid]
                    fast[sid] = 0
                    if sid in self.pending_ids:
                        self.pending_ids.discard(sid)
                        self.pending = deque(p for p in self.pending if p[0] != sid)
            if self.pending:
                self._pump(base_live[i + 1] if i + 1 < self.n_ops else base)
        for mv in self.moves_at.get(self.n_ops, ()):  # issued at the end of the step
            self._issue(mv, 0)
        end = max(self.t, *self.h2d_lanes, *self.d2h_lanes)
        return SimResult(
            step_s=end - step_start,
            compute_s=self.compute_s,
            stall_s=self.stall_s,
            bytes_to_fast=self.to_fast,
            bytes_to_slow=self.to_slow,
            peak_fast_bytes=peak,
            overflow_bytes=self.overflow,
            fast_bytes=tuple(occupancy),
            op_start_s=tuple(starts),
            op_end_s=tuple(ends),
            copies=tuple(self.copies),
            fast_at_snapshot=snapshot,
            stall_by_phase=stall_by_phase,
        )

    def _snapshot(self, i: int) -> dict[int, int]:
        """Fast bytes per storage during op ``i``: what ``base_live[i] + managed_fast`` counts."""
        out: dict[int, int] = {}
        managed = self.plan.managed
        for s in self.trace.storages:
            if s.id in managed:
                continue
            start = 0 if s.created_at is None else s.created_at
            end = len(self.trace.ops) if s.freed_at is None else s.freed_at + 1
            if start <= i < end and s.nbytes:
                out[s.id] = s.nbytes
        for sid in managed:
            if self.fast[sid]:
                out[sid] = self.fast[sid]
        for _, nbytes, sid in self.releases:  # evicted, but the copy still holds the space
            out[sid] = out.get(sid, 0) + nbytes
        return out

    def _issue(self, mv: Move, base: int) -> None:
        sid = mv.storage
        if mv.to is Tier.SLOW:
            nbytes = min(mv.nbytes, self.fast[sid])
            if nbytes <= 0:
                return
            self.fast[sid] -= nbytes
            if self.clean[sid]:
                self.managed_fast -= nbytes  # the slow copy is current: nothing to copy
                return
            end = self._copy(sid, Tier.SLOW, nbytes, max(self.t, self.ready[sid]), demand=False)
            heapq.heappush(self.releases, (end, nbytes, sid))
            self.to_slow += nbytes
            self.clean[sid] = True
        else:
            nbytes = min(mv.nbytes, self.nbytes[sid] - self.fast[sid])
            if nbytes <= 0 or sid in self.pending_ids:
                return
            self.pending.append((sid, nbytes, self.t))
            self.pending_ids.add(sid)
            self._pump(base)
