"""The Sentinel policy: interval placement of long-lived tensors with proactive migration.

NOTE [Sentinel planning]
1. Short-lived storages (freed inside the layer instance that made them) and
   storages under ``MIN_MANAGED_BYTES`` stay in fast memory and never move;
   every other used storage is a candidate.
2. The step is cut into intervals of ``k`` consecutive layer instances; a
   migration is issued only at an interval's first op. A candidate is
   *needed* in each interval in which an op touches it.
3. A *gap* of a candidate is a run of intervals between two intervals where it
   is needed (or, for storages that outlive the step, from its last use around
   the step boundary to its first use: parameters and optimizer state start
   the step in slow memory and go back there). Taking a gap means: evict at the
   start of the interval after the use, prefetch at the start of the interval
   before the next use, so the copy overlaps one interval of compute. A gap
   frees the storage's bytes from the eviction to the interval before the
   prefetch.
4. Planned occupancy of interval j = the all-fast peak inside j minus the bytes
   of taken gaps that cover j. Intervals are visited in order; while one is
   over budget, the gap covering it whose storage is needed again farthest in
   the future is taken (Belady: evict what is not needed for longest).
5. Direct access only: if gaps are not enough, candidates are placed in slow
   memory for their whole life and read in place, coldest first (fewest bytes
   accessed per byte stored), until every interval fits.
6. ``k`` is chosen by planning each candidate length and simulating the plan;
   the fastest feasible plan wins. The plan of doing nothing clever is a
   candidate too (direct access: the OS's first-touch placement; migrate
   access: fetch on use), so Sentinel is never predicted slower than that.
   All candidates' predicted times are kept in ``plan.info["search"]``.
The planned occupancy is an estimate; the simulator replays the plan with the
budget as a hard capacity (copies wait for room), so the prediction honours it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, replace

from sentinel_hm.planning.hardware import Access
from sentinel_hm.planning.model import Move, Plan, Tier
from sentinel_hm.planning.policies._common import (
    REGISTRY,
    Context,
    Infeasible,
    empty_plan,
    interval_of,
    register,
)
from sentinel_hm.trace.model import StorageRecord
from sentinel_hm.units import format_bytes

# (layers per interval, intervals per layer): quarter and half layers, then runs of layers
CANDIDATE_LENGTHS = ((1, 4), (1, 2), (1, 1), (2, 1), (3, 1), (4, 1), (6, 1), (8, 1), (12, 1), (16, 1))
_REPLANS = 4  # plan-and-replay rounds per interval length


@dataclass(frozen=True, slots=True)
class _Gap:
    storage: int
    nbytes: int
    evict_iv: int  # interval whose first op issues the eviction
    fetch_iv: int | None  # interval whose first op issues the prefetch (None: never needed again)
    covers: tuple[tuple[int, int], ...]  # inclusive interval ranges freed
    wraps: bool  # starts the step in slow memory (placement 0)


def _gaps(ctx: Context, s: StorageRecord, starts: tuple[int, ...]) -> list[_Gap]:
    n_iv = len(starts)
    _, end = ctx.live_range(s)
    used = sorted({interval_of(starts, op) for op in ctx.uses[s.id]})
    out = [
        _Gap(s.id, s.nbytes, u1 + 1, u2 - 1, ((u1 + 1, u2 - 2),), False)
        for u1, u2 in itertools.pairwise(used)
        if u2 - u1 >= 3
    ]
    if s.freed_at is None and s.created_at is None:
        if used[0] >= 2:
            # around the step boundary: evict after the last use (at the very end of the step
            # if the last use is in the last interval), prefetch before the first use
            covers = [(0, used[0] - 2)]
            if used[-1] + 1 <= n_iv - 1:
                covers.append((used[-1] + 1, n_iv - 1))
            out.append(_Gap(s.id, s.nbytes, used[-1] + 1, used[0] - 1, tuple(covers), True))
    elif s.freed_at is not None and used[-1] + 2 <= interval_of(starts, end):
        # freed long after its last use (e.g. a gradient until zero_grad)
        last_iv = interval_of(starts, end)
        out.append(_Gap(s.id, s.nbytes, used[-1] + 1, None, ((used[-1] + 1, last_iv),), False))
    return out


def _interval_peaks(ctx: Context, starts: tuple[int, ...]) -> list[int]:
    live = ctx.trace.live_bytes
    bounds = [*starts, len(live)]
    return [max(live[a:b], default=0) for a, b in itertools.pairwise(bounds)]


def parse_interval_label(label: str) -> tuple[int, int] | None:
    """``"3"`` -> (3, 1), ``"1/4"`` -> (1, 4); None for a label that is not a length."""
    if label.startswith("1/") and label[2:].isdigit():
        return 1, int(label[2:])
    return (int(label), 1) if label.isdigit() else None


def plan_intervals(
    ctx: Context, budget: int, k: int, target: int | None = None, splits: int = 1
) -> tuple[Plan, int]:
    """Plan with intervals of ``k`` layers (or 1/``splits`` of a layer); returns the plan and
    its planned peak.

    The plan is made to fit ``target`` bytes (default: the budget), and carries the budget.
    """
    if target is None:
        target = budget
    starts = ctx.interval_starts(k, splits)
    n_iv = len(starts)
    occ = _interval_peaks(ctx, starts)
    gaps_by_start: list[list[_Gap]] = [[] for _ in range(n_iv)]
    for s in ctx.managed_candidates:
        for gap in _gaps(ctx, s, starts):
            for lo, _ in gap.covers:
                gaps_by_start[lo].append(gap)
    taken: dict[int, list[_Gap]] = {}
    taken_gaps: set[_Gap] = set()
    heap: list[tuple[int, int, int, _Gap, int]] = []  # (-end, tiebreak, start, gap, end)
    counter = 0
    for j in range(n_iv):
        for gap in gaps_by_start[j]:
            for lo, hi in gap.covers:
                if lo == j:
                    heapq.heappush(heap, (-hi, counter, j, gap, hi))
                    counter += 1
        while occ[j] > target and heap:
            _, _, _, gap, hi = heapq.heappop(heap)
            if hi < j or gap in taken_gaps:
                continue
            taken_gaps.add(gap)
            taken.setdefault(gap.storage, []).append(gap)
            for a, b in gap.covers:
                for x in range(max(a, j), b + 1):
                    occ[x] -= gap.nbytes
            # the part of this gap already behind us freed intervals we no longer check
    placement: dict[int, int] = {}
    cold_moves: list[Move] = []  # read in place from the interval after their creation
    info: dict[str, object] = {
        "layers_per_interval": k if splits == 1 else 1 / splits,
        "intervals": n_iv,
    }
    if max(occ, default=0) > target and ctx.hardware.access is Access.DIRECT:
        _place_cold_in_slow(ctx, starts, occ, target, taken, placement, cold_moves)
        # what stays in slow memory and is read there: where the plan pays in compute time
        in_place: dict[str, int] = {}
        for sid in [*placement, *(m.storage for m in cold_moves)]:
            s = ctx.trace.storages[sid]
            in_place[s.kind.value] = in_place.get(s.kind.value, 0) + s.nbytes
        info["read_in_place_bytes"] = in_place
    moves: list[Move] = list(cold_moves)
    n_ops = len(ctx.trace.ops)
    for sid, gaps in taken.items():
        for gap in gaps:
            evict_at = starts[gap.evict_iv] if gap.evict_iv < n_iv else n_ops  # n_ops: step end
            moves.append(Move(sid, Tier.SLOW, evict_at, gap.nbytes))
            if gap.fetch_iv is not None:
                moves.append(Move(sid, Tier.FAST, starts[gap.fetch_iv], gap.nbytes))
            if gap.wraps:
                placement[sid] = 0
    plan = empty_plan(ctx, "sentinel", budget, placement=placement, moves=moves, info=info)
    return plan, max(occ, default=0)


def _place_cold_in_slow(
    ctx: Context,
    starts: tuple[int, ...],
    occ: list[int],
    target: int,
    taken: dict[int, list[_Gap]],
    placement: dict[int, int],
    evictions: list[Move],
) -> None:
    """Direct access: keep candidates in slow memory for their whole life, read in place.

    Only candidates that hold fast memory in an interval still over the target
    qualify (a gap may already free them there); the coldest go first.
    """
    trace = ctx.trace

    def density(s: StorageRecord) -> float:
        accessed = sum(trace.ops[op].read_bytes + trace.ops[op].write_bytes for op in ctx.uses[s.id])
        return accessed / s.nbytes

    spans = {}
    for s in ctx.managed_candidates:
        start, end = ctx.live_range(s)
        spans[s.id] = (interval_of(starts, start), interval_of(starts, end))
    for s in sorted(ctx.managed_candidates, key=density):
        over = [j for j, o in enumerate(occ) if o > target]
        if not over:
            return
        lo, hi = spans[s.id]
        covered = {x for gap in taken.get(s.id, ()) for a, b in gap.covers for x in range(a, b + 1)}
        # A runtime cannot make an op write its output into the slow tier: what the step
        # creates is born fast and leaves at the next interval (an OS could place it at once).
        born_fast = ctx.movable is not None and s.created_at is not None
        first = lo + 1 if born_fast else lo
        if not any(first <= j <= hi and j not in covered for j in over):
            continue
        for x in range(first, hi + 1):
            if x not in covered:
                occ[x] -= s.nbytes
        taken.pop(s.id, None)
        if born_fast:
            if first <= hi:
                evictions.append(Move(s.id, Tier.SLOW, starts[first], s.nbytes))
        else:
            placement[s.id] = 0


@register("sentinel")
def sentinel(ctx: Context, budget: int) -> Plan:
    """Search the interval length in simulation; see NOTE [Sentinel planning]."""
    from sentinel_hm.sim.replay import simulate

    n_layers = max(1, len({seg.layer for seg in ctx.trace.segments if seg.layer is not None}))
    best: tuple[float, Plan] | None = None
    search: dict[str, object] = {}
    lowest_planned = None
    all_fast_s = sum(ctx.cost.base_s)  # no plan can beat compute alone
    worse = 0  # feasible candidates in a row slower than the best: longer ones rarely recover
    for k, splits in ctx.interval_lengths or CANDIDATE_LENGTHS:
        if k > 2 * n_layers or worse >= 2 or (best and best[0] <= all_fast_s * (1 + 1e-9)):
            break
        label = str(k) if splits == 1 else f"1/{splits}"
        # The planned occupancy is an estimate (evictions take time to free memory); when the
        # replay exceeds the budget, plan again against a target lowered by the excess.
        target = budget
        for _ in range(_REPLANS):
            plan, planned = plan_intervals(ctx, budget, k, target, splits)
            lowest_planned = planned if lowest_planned is None else min(lowest_planned, planned)
            if planned > target:
                search[label] = "infeasible"
                break
            result = simulate(ctx.trace, plan, ctx.hardware, cost=ctx.cost)
            excess = max(result.peak_fast_bytes - budget, result.overflow_bytes)
            if excess <= 0:
                search[label] = result.step_s
                if best is None or result.step_s < best[0]:
                    best = (result.step_s, plan)
                    worse = 0
                else:
                    worse += 1
                break
            target -= excess
            search[label] = "over budget in replay"
    # The plan of doing nothing clever is a candidate too: what the OS would do under direct
    # access, fetch-on-use under migrate access.
    fallback = "first-touch" if ctx.hardware.access is Access.DIRECT else "all-slow"
    if ctx.interval_lengths is not None or (ctx.movable is not None and fallback == "first-touch"):
        fallback = ""  # a runtime cannot place arbitrary storages the way an OS does
    if fallback and (best is None or best[0] > all_fast_s * (1 + 1e-9)):
        static = REGISTRY[fallback](ctx, budget)
        result = simulate(ctx.trace, static, ctx.hardware, cost=ctx.cost)
        if not result.overflow_bytes and result.peak_fast_bytes <= budget:
            search[fallback] = result.step_s
            if best is None or result.step_s < best[0]:
                best = (result.step_s, replace(static, policy="sentinel",
                                               info={"layers_per_interval": None}))
    if best is None:
        raise Infeasible(
            f"sentinel cannot fit the step into {format_bytes(budget)} of fast memory "
            f"(its best plan needs about {format_bytes(lowest_planned or 0)})"
        )
    plan = best[1]
    return Plan(plan.policy, plan.hardware, plan.budget_bytes, plan.n_ops, plan.n_storages,
                plan.placement, plan.moves, {**plan.info, "search": search})
