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
5. Prefetches then move earlier where memory has room: one interval at a time,
   round robin over the taken gaps, soonest use first, while the occupancy of
   the interval a prefetch moves into stays within the budget. A copy longer
   than one interval's compute (a big activation before a short layer, a GPU's
   fast compute against PCIe) then still arrives in time. At one issue point
   the link queues the soonest-needed prefetch first. Fuller memory can also
   cost time (an op waits for evictions in flight to free room), so the
   winner of the search in 7 is planned with prefetches one interval ahead
   too, and the faster of the two kept. Under a runtime's clock prefetches
   stay one interval ahead: its audits measure what the planned occupancy
   leaves out (evictions in flight, tensors the program holds), and plans
   that fill the budget early left them no room (the runtime tests' audits
   went over budget and re-planned more often, and a predicted all-fast plan
   left test-and-trial nothing to try).
6. Direct access only: if gaps are not enough, candidates stay in slow memory
   and ops use them in place, either for their whole life or only after one of
   their taken gaps (its prefetch is dropped: the uses before it stay fast, so
   e.g. a saved activation is written fast in forward, evicted by the link, and
   read in place in backward). Each choice is priced by the compute time that
   the cost model adds to the ops using the storage in place, per byte; the
   cheapest go first, each only while it frees bytes in an interval still over
   the budget, until every interval fits.
7. ``k`` (a sixteenth of a layer to 16 layers) is chosen by planning each
   candidate length and simulating the plan (under a runtime's clock, moves
   happen at its events: see `empty_plan`); the fastest feasible plan wins.
   Lengths that cut the step at the same ops are tried once. The plan of doing
   nothing clever is a candidate too (direct access: the OS's first-touch
   placement; migrate access: fetch on use), so Sentinel is never predicted
   slower than that. All candidates' predicted times are kept in
   ``plan.info["search"]``.
The planned occupancy is an estimate; the simulator replays the plan with the
budget as a hard capacity (copies wait for room), so the prediction honours it.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, replace

from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Move, Plan, Tier
from sentinel_hm.planning.policies._common import (
    REGISTRY,
    Context,
    Infeasible,
    empty_plan,
    interval_of,
    recomputing,
    register,
)
from sentinel_hm.sim.replay import simulate
from sentinel_hm.trace.model import StorageRecord
from sentinel_hm.trace.recompute import RecomputableLayer
from sentinel_hm.units import format_bytes

# (layers per interval, intervals per layer): parts of a layer down to a sixteenth, then runs
# of layers. A "layer" is whatever module the trace found: a whole ResNet stage (dozens of
# ops, tens of MiB saved) is one, and a plan that prefetches one interval ahead holds two
# intervals' data at once, so such a layer needs fine cuts (chunks() stops at one op each).
CANDIDATE_LENGTHS = (
    (1, 16), (1, 8), (1, 4), (1, 2), (1, 1), (2, 1), (3, 1), (4, 1), (6, 1), (8, 1), (12, 1), (16, 1)
)
_REPLANS = 4  # plan-and-replay rounds per interval length


@dataclass(frozen=True, slots=True)
class _Gap:
    storage: int
    nbytes: int
    evict_iv: int  # interval whose first op issues the eviction
    fetch_iv: int | None  # interval whose first op issues the prefetch (None: never needed again)
    covers: tuple[tuple[int, int], ...]  # inclusive interval ranges freed
    wraps: bool  # starts the step in slow memory (placement 0)
    use_iv: int | None = None  # interval of the use the prefetch serves


def _gaps(ctx: Context, s: StorageRecord, starts: tuple[int, ...]) -> list[_Gap]:
    n_iv = len(starts)
    _, end = ctx.live_range(s)
    held = ctx.held_in_forward.get(s.id)
    if held is None:
        used = sorted({interval_of(starts, op) for op in ctx.uses[s.id]})
    else:  # no gap while the program holds it too: as if used from creation until then
        used = sorted({interval_of(starts, held)}
                      | {interval_of(starts, op) for op in ctx.uses[s.id] if op > held})
    out = [
        _Gap(s.id, s.nbytes, u1 + 1, u2 - 1, ((u1 + 1, u2 - 2),), False, u2)
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
            out.append(_Gap(s.id, s.nbytes, used[-1] + 1, used[0] - 1, tuple(covers), True,
                            used[0]))
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
    ctx: Context, budget: int, k: int, target: int | None = None, splits: int = 1,
    lead: int = 1,
) -> tuple[Plan, int]:
    """Plan with intervals of ``k`` layers (or 1/``splits`` of a layer); returns the plan and
    its planned peak.

    The plan is made to fit ``target`` bytes (default: the budget), and carries the budget.
    Prefetches are issued up to ``lead`` intervals before their use where memory has room
    (NOTE [Sentinel planning], 5).
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
    # A taken gap frees its bytes from interval j (or its start) to its end: kept as
    # differences, summed as j advances (the part of a gap already behind j freed
    # intervals we no longer check).
    freed = [0] * (n_iv + 1)
    running = 0
    for j in range(n_iv):
        running += freed[j]
        for gap in gaps_by_start[j]:
            for lo, hi in gap.covers:
                if lo == j:
                    heapq.heappush(heap, (-hi, counter, j, gap, hi))
                    counter += 1
        while occ[j] - running > target and heap:
            _, _, _, gap, hi = heapq.heappop(heap)
            if hi < j or gap in taken_gaps:
                continue
            taken_gaps.add(gap)
            taken.setdefault(gap.storage, []).append(gap)
            for a, b in gap.covers:
                if b < j:
                    continue
                if a <= j:
                    running += gap.nbytes
                else:
                    freed[a] += gap.nbytes
                freed[b + 1] -= gap.nbytes
        occ[j] -= running
    if lead > 1 and max(occ, default=0) <= target:
        _advance_prefetches(taken, occ, target, lead)
    placement: dict[int, int] = {}
    cold_moves: list[Move] = []  # read in place from the interval after their creation
    info: dict[str, object] = {
        "layers_per_interval": k if splits == 1 else 1 / splits,
        "intervals": n_iv,
    }
    if max(occ, default=0) > target and ctx.hardware.access is Access.DIRECT:
        slow = _place_cold_in_slow(ctx, starts, occ, target, taken, placement, cold_moves)
        # what stays in slow memory and is read there: where the plan pays in compute time
        in_place: dict[str, int] = {}
        for sid in sorted(slow):
            s = ctx.trace.storages[sid]
            in_place[s.kind.value] = in_place.get(s.kind.value, 0) + s.nbytes
        info["read_in_place_bytes"] = in_place
    moves: list[Move] = list(cold_moves)
    n_ops = len(ctx.trace.ops)
    prefetches: list[tuple[int, int, Move]] = []
    for sid, gaps in taken.items():
        for gap in gaps:
            evict_at = starts[gap.evict_iv] if gap.evict_iv < n_iv else n_ops  # n_ops: step end
            moves.append(Move(sid, Tier.SLOW, evict_at, gap.nbytes))
            if gap.fetch_iv is not None:
                assert gap.use_iv is not None
                at = starts[gap.fetch_iv]
                prefetches.append((at, gap.use_iv, Move(sid, Tier.FAST, at, gap.nbytes)))
            if gap.wraps:
                placement[sid] = 0
    # the link serves copies in issue order: at one issue point, the soonest needed go first
    moves.extend(m for _, _, m in sorted(prefetches, key=lambda t: t[:2]))
    plan = empty_plan(ctx, "sentinel", budget, placement=placement, moves=moves, info=info)
    return plan, max(occ, default=0)


def _advance_prefetches(taken: dict[int, list[_Gap]], occ: list[int], target: int,
                        lead: int) -> None:
    """Issue prefetches up to ``lead`` intervals before their use where the planned occupancy
    has room, so that a copy longer than an interval's compute can still arrive in time.

    Round robin, one interval per gap per round, soonest use first: the room goes to every
    prefetch in turn rather than to the first one. A gap stops at the interval after its
    eviction, or where the room runs out (occupancy only grows here, so it never returns)."""
    # every gap with a prefetch frees the intervals from covers[0][0] up to the one before it
    # (a wrapping gap's first cover too)
    refs = sorted(((g.use_iv or 0, sid, i) for sid, gs in taken.items()
                   for i, g in enumerate(gs) if g.fetch_iv is not None))
    fetch = [taken[sid][i].fetch_iv or 0 for _, sid, i in refs]
    stop = [taken[sid][i].covers[0][0] + 1 for _, sid, i in refs]  # keep one interval freed
    size = [taken[sid][i].nbytes for _, sid, i in refs]
    movable = list(range(len(refs)))
    for _ in range(lead - 1):
        still = []
        for g in movable:
            f = fetch[g] - 1
            if f < stop[g] or occ[f] + size[g] > target:
                continue
            occ[f] += size[g]
            fetch[g] = f
            still.append(g)
        if not still:
            break
        movable = still
    for g, (_, sid, i) in enumerate(refs):
        gap = taken[sid][i]
        if fetch[g] != gap.fetch_iv:
            lo, _ = gap.covers[0]
            taken[sid][i] = replace(gap, fetch_iv=fetch[g],
                                    covers=((lo, fetch[g] - 1), *gap.covers[1:]))


def _place_cold_in_slow(
    ctx: Context,
    starts: tuple[int, ...],
    occ: list[int],
    target: int,
    taken: dict[int, list[_Gap]],
    placement: dict[int, int],
    evictions: list[Move],
) -> set[int]:
    """Direct access: leave candidates in slow memory and let ops use them in place.

    Two ways per candidate: its whole life in slow memory, or only from the end of
    one of its taken gaps on (the gap's prefetch is dropped: later uses read it in
    place, the uses before the gap stay fast). Each way is priced by the compute
    time its in-place accesses add (the cost model's direct time of each op that
    touches it there, minus the op's base time), per byte it frees; the cheapest
    go first. A way qualifies only while it frees a byte in an interval still over
    the target. Returns the storages read in place.
    """
    cost = ctx.cost
    n_iv = len(starts)

    def added_s(sid: int, from_op: int) -> float:
        return sum(max(0.0, cost.direct_time(op, {sid: 1.0}) - cost.base_s[op])
                   for op in ctx.uses[sid] if op >= from_op)

    spans: dict[int, tuple[int, int, bool]] = {}
    ways: list[tuple[float, int, int, int]] = []  # (s per byte, order, storage, slow from iv)
    for s in ctx.managed_candidates:
        start, end = ctx.live_range(s)
        lo, hi = interval_of(starts, start), interval_of(starts, end)
        # A runtime cannot make an op write its output into the slow tier: what the step
        # creates is born fast and leaves at the next interval (an OS could place it at once).
        born_fast = ctx.movable is not None and s.created_at is not None
        first = lo + 1 if born_fast else lo
        if s.id in ctx.held_in_forward:  # ops read it in fast memory until then
            first = max(first, interval_of(starts, ctx.held_in_forward[s.id]) + 1)
        spans[s.id] = (first, hi, born_fast)
        froms = {first} | {g.fetch_iv for g in taken.get(s.id, ())
                           if g.fetch_iv is not None and not g.wraps and first < g.fetch_iv <= hi}
        for iv in froms:
            if iv < n_iv:
                ways.append((added_s(s.id, starts[iv]) / s.nbytes, len(ways), s.id, iv))
    ways.sort()
    slow_from: dict[int, int] = {}  # storage -> first interval it stays slow in, to its end
    for _, _, sid, iv in ways:
        over = [j for j, o in enumerate(occ) if o > target]
        if not over:
            break
        first, hi, _ = spans[sid]
        done = slow_from.get(sid, hi + 1)
        if iv >= done:
            continue
        nbytes = ctx.trace.storages[sid].nbytes
        covered = {x for gap in taken.get(sid, ()) for a, b in gap.covers for x in range(a, b + 1)}
        freed = [x for x in range(iv, done) if x not in covered]
        if not any(occ[x] > target for x in freed):
            continue
        for x in freed:
            occ[x] -= nbytes
        slow_from[sid] = iv
    for sid, iv in slow_from.items():
        first, _, born_fast = spans[sid]
        nbytes = ctx.trace.storages[sid].nbytes
        if iv == first:
            taken.pop(sid, None)
            if born_fast:
                evictions.append(Move(sid, Tier.SLOW, starts[first], nbytes))
            else:
                placement[sid] = 0
            continue
        # keep the gaps before iv; the gap whose prefetch was at iv keeps only its eviction
        kept = []
        for gap in taken[sid]:
            if gap.fetch_iv is not None and gap.fetch_iv < iv:
                kept.append(gap)
            elif gap.fetch_iv == iv:
                kept.append(replace(gap, fetch_iv=None))
        taken[sid] = kept
    return set(slow_from)


@dataclass(frozen=True, slots=True)
class _Found:
    step_s: float  # simulated
    plan: Plan
    ctx: Context
    length: tuple[int, int] | None  # (layers per interval, splits); None: the do-nothing plan


@register("sentinel")
def sentinel(ctx: Context, budget: int) -> Plan:
    """Search the interval length in simulation, and with ``ctx.recompute`` which layers to
    recompute (prefetches issued early where memory has room; for the winner, one interval
    ahead too). See NOTE [Sentinel planning]."""
    best, search, lowest_planned = _search(ctx, budget)
    if ctx.recompute and ctx.clock is None:
        chosen: tuple[int, ...] = ()
        for group in _recompute_groups(ctx):
            layers = tuple(sorted((*chosen, *group)))
            label = "recompute " + ",".join(map(str, layers))
            found, _, planned = _search(recomputing(ctx, layers), budget)
            if planned is not None:
                lowest_planned = (planned if lowest_planned is None
                                  else min(lowest_planned, planned))
            search[label] = found.step_s if found else "infeasible"
            if found and (best is None or found.step_s < best.step_s):
                best, chosen = found, layers
    if best is None:
        raise Infeasible(
            f"sentinel cannot fit the step into {format_bytes(budget)} of fast memory "
            f"(its best plan needs about {format_bytes(lowest_planned or 0)})"
        )
    if (ctx.clock is None and best.length is not None
            and best.step_s > sum(best.ctx.cost.base_s) * (1 + 1e-9)):
        # early prefetches fill memory the replay's evictions in flight may need: the winner's
        # length with prefetches one interval ahead is a candidate too
        outcome, plan, _ = _fit(best.ctx, budget, *best.length)
        search["one interval ahead"] = outcome
        if isinstance(outcome, float) and outcome < best.step_s:
            best = _Found(outcome, plan, best.ctx, best.length)
    return replace(best.plan, info={**best.plan.info, "search": search})


def _recompute_groups(ctx: Context) -> list[tuple[int, ...]]:
    """Layers to try recomputing, in groups of 1, 1, 2, 4, ... (each as large as all before
    it), best first: the layers that drop the most saved bytes per second of recomputation
    (the cost model's times of the ops rerun). `sentinel` adds a group to the layers it
    recomputes when the plan with it is faster; a group that does not fit (rebuilding its
    layers at once needs more than the budget) or slows the step is skipped, not kept in
    every later set."""
    layers = ctx.recomputable
    if isinstance(ctx.recompute, frozenset):
        layers = {i: layer for i, layer in layers.items() if i in ctx.recompute}
    base = ctx.cost.base_s

    def worth(layer: RecomputableLayer) -> float:
        dropped = sum(ctx.trace.storages[sid].nbytes for sid in layer.saved)
        return dropped / max(layer.rerun_s(base), 1e-12)

    order = sorted(layers, key=lambda i: worth(layers[i]), reverse=True)
    groups, start = [], 0
    while start < len(order):
        size = max(1, start)
        groups.append(tuple(order[start : start + size]))
        start += size
    return groups


def _fit(ctx: Context, budget: int, k: int, splits: int, lead: int = 1
         ) -> tuple[float | str, Plan, int]:
    """Plan with one interval length and replay it: the simulated step time (or why it does
    not fit), the plan, and its planned occupancy.

    The planned occupancy is an estimate (evictions take time to free memory); when the
    replay exceeds the budget, plan again against a target lowered by the excess."""
    target = budget
    lowest = 1 << 62
    for _ in range(_REPLANS):
        plan, planned = plan_intervals(ctx, budget, k, target, splits, lead)
        lowest = min(lowest, planned)
        if planned > target:
            return "infeasible", plan, lowest
        result = simulate(ctx.trace, plan, ctx.hardware, cost=ctx.cost)
        excess = max(result.peak_fast_bytes - budget, result.overflow_bytes)
        if excess <= 0:
            return result.step_s, plan, lowest
        target -= excess
    return "over budget in replay", plan, lowest


def _search(ctx: Context, budget: int
            ) -> tuple[_Found | None, dict[str, object], int | None]:
    """The fastest feasible plan over interval lengths (and the plan of doing nothing
    clever), every candidate's predicted time, and the lowest planned occupancy seen."""
    n_layers = max(1, len({seg.layer for seg in ctx.trace.segments if seg.layer is not None}))
    best: _Found | None = None
    search: dict[str, object] = {}
    lowest_planned = None
    all_fast_s = sum(ctx.cost.base_s)  # no plan can beat compute alone
    worse = 0  # feasible candidates in a row slower than the best: longer ones rarely recover
    # Lengths that cut the step at the same ops are one candidate (a layer of few ops cannot
    # be split finer than its ops): it is tried once, named by the coarsest length giving it.
    distinct: dict[tuple[int, ...], tuple[int, int]] = {}
    for k, splits in ctx.interval_lengths or CANDIDATE_LENGTHS:
        if k <= 2 * n_layers:
            distinct[ctx.interval_starts(k, splits)] = (k, splits)  # keeps the first's place
    for starts, (k, splits) in distinct.items():
        if worse >= 2 or (best and best.step_s <= all_fast_s * (1 + 1e-9)):
            break
        label = str(k) if splits == 1 else f"1/{splits}"
        lead = len(starts) if ctx.clock is None else 1  # NOTE [Sentinel planning], 5
        outcome, plan, planned = _fit(ctx, budget, k, splits, lead)
        lowest_planned = planned if lowest_planned is None else min(lowest_planned, planned)
        search[label] = outcome
        if isinstance(outcome, float):
            if best is None or outcome < best.step_s:
                best = _Found(outcome, plan, ctx, (k, splits))
                worse = 0
            else:
                worse += 1
    # The plan of doing nothing clever is a candidate too: what the OS would do under direct
    # access, fetch-on-use under migrate access.
    fallback = "first-touch" if ctx.hardware.access is Access.DIRECT else "all-slow"
    if ctx.interval_lengths is not None or (ctx.movable is not None and fallback == "first-touch"):
        fallback = ""  # a runtime cannot place arbitrary storages the way an OS does
    if fallback and (best is None or best.step_s > all_fast_s * (1 + 1e-9)):
        static = REGISTRY[fallback](ctx, budget)
        result = simulate(ctx.trace, static, ctx.hardware, cost=ctx.cost)
        if not result.overflow_bytes and result.peak_fast_bytes <= budget:
            search[fallback] = result.step_s
            if best is None or result.step_s < best.step_s:
                best = _Found(result.step_s, replace(static, policy="sentinel",
                                                     info={"layers_per_interval": None}), ctx, None)
    return best, search, lowest_planned
