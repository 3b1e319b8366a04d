"""``page-lru``: reactive OS-style tiering of 4 KiB pages, the page-level baseline.

It stands for what a kernel does without knowing tensors (Linux NUMA balancing,
TPP, the page-level policies Sentinel was compared with):
- Layout: storages are packed in allocation order (64-byte aligned, as
  PyTorch's CPU allocator aligns), so neighbouring tensors share boundary
  pages: moving one tensor's pages drags its neighbours' bytes along and
  leaves part of them behind (page-level false sharing). Freed address space
  is not reused.
- First touch: a new page goes to fast memory while fast pages are free,
  else to slow memory.
- Every ``SCAN_PERIOD_S`` of compute the policy promotes the pages that were
  touched in slow memory since the last scan (most recently touched tensors
  first), making room by demoting the least recently used fast pages; pages
  touched since the last scan are never demoted. Promotions happen after the
  access that revealed them: the policy is reactive.
The result is expressed as a `Plan` (per-storage byte moves) for the simulator.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict

from sentinel_hm.core.plan import Move, Plan, Tier
from sentinel_hm.planning.policies._common import Context, empty_plan, register

PAGE = 4096
ALIGN = 64
# 1 ms of compute between scans: far more eager than Linux's default NUMA-balancing scan
# period (1 s, kernel.numa_balancing_scan_period_min_ms=1000), so this baseline is generous.
SCAN_PERIOD_S = 1e-3


@register("page-lru", direct_only=True)
def page_lru(ctx: Context, budget: int) -> Plan:
    return _PageLRU(ctx, budget).run()


class _PageLRU:
    def __init__(self, ctx: Context, budget: int) -> None:
        self.ctx = ctx
        self.budget = budget
        trace = ctx.trace
        self.capacity = budget // PAGE
        self.start: dict[int, int] = {}  # storage -> first byte address
        addr = 0
        order = [s for s in trace.storages if s.created_at is None]
        order += sorted((s for s in trace.storages if s.created_at is not None),
                        key=lambda s: (s.created_at, s.id))
        for s in order:
            self.start[s.id] = addr
            addr += -(-max(s.nbytes, 1) // ALIGN) * ALIGN
        self.n_pages = -(-addr // PAGE)
        self.by_address = sorted(self.start, key=self.start.__getitem__)
        self.addresses = [self.start[sid] for sid in self.by_address]
        self.fast = bytearray(self.n_pages)  # 1: page in fast memory
        self.alive = [0] * self.n_pages  # live storages on each page
        self.placed = bytearray(self.n_pages)  # page has been first-touched
        self.used = 0
        self.lru: OrderedDict[int, None] = OrderedDict()  # storages, least recent first
        self.touched_since_scan: set[int] = set()
        self.to_promote: dict[int, None] = {}
        self.moves: list[Move] = []
        self.placement: dict[int, int] = {}
        self.live: set[int] = set()

    def pages(self, sid: int) -> range:
        s = self.ctx.trace.storages[sid]
        first = self.start[sid]
        return range(first // PAGE, -(-(first + max(s.nbytes, 1)) // PAGE))

    def overlap(self, sid: int, page: int) -> int:
        first = self.start[sid]
        end = first + self.ctx.trace.storages[sid].nbytes
        return max(0, min(end, (page + 1) * PAGE) - max(first, page * PAGE))

    def fast_bytes(self, sid: int) -> int:
        r = self.pages(sid)
        if len(r) <= 2:
            return sum(self.overlap(sid, p) for p in r if self.fast[p])
        inner = self.fast[r.start + 1 : r.stop - 1].count(1) * PAGE
        return inner + sum(self.overlap(sid, p) for p in (r.start, r.stop - 1) if self.fast[p])

    def storages_on(self, first: int, stop: int) -> list[int]:
        """Live storages with bytes on pages ``first .. stop-1`` (address order)."""
        k = max(0, bisect_right(self.addresses, first * PAGE) - 1)
        out = []
        while k < len(self.by_address) and self.addresses[k] < stop * PAGE:
            sid = self.by_address[k]
            if sid in self.live and self.overlap_range(sid, first, stop):
                out.append(sid)
            k += 1
        return out

    def overlap_range(self, sid: int, first: int, stop: int) -> bool:
        r = self.pages(sid)
        return r.start < stop and first < r.stop

    def allocate(self, sid: int) -> None:
        for p in self.pages(sid):
            self.alive[p] += 1
            if not self.placed[p]:
                self.placed[p] = 1
                if self.used < self.capacity:
                    self.fast[p] = 1
                    self.used += 1

    def free(self, sid: int) -> None:
        for p in self.pages(sid):
            self.alive[p] -= 1
            if self.alive[p] == 0 and self.fast[p]:
                self.fast[p] = 0
                self.used -= 1
        self.lru.pop(sid, None)
        self.to_promote.pop(sid, None)

    def flip(self, pages: list[int], to_fast: bool, issue_at: int) -> None:
        """Move pages; every live storage with bytes on them moves those bytes."""
        if not pages:
            return
        moved: dict[int, int] = {}
        for p in pages:
            self.fast[p] = 1 if to_fast else 0
            self.used += 1 if to_fast else -1
        touched = set(pages)
        for sid in self.storages_on(min(pages), max(pages) + 1):
            r = self.pages(sid)
            inner = sum(1 for p in range(r.start + 1, r.stop - 1) if p in touched) * PAGE
            edges = {r.start, r.stop - 1} & touched
            nbytes = inner + sum(self.overlap(sid, p) for p in edges)
            if nbytes:
                moved[sid] = nbytes
        tier = Tier.FAST if to_fast else Tier.SLOW
        self.moves.extend(Move(sid, tier, issue_at, n) for sid, n in moved.items())

    def scan(self, issue_at: int) -> None:
        victims = iter([v for v in self.lru if v not in self.touched_since_scan])
        for sid in reversed(list(self.to_promote)):  # most recently touched first
            want = [p for p in self.pages(sid) if not self.fast[p] and self.alive[p]]
            if not want:
                continue
            free = self.capacity - self.used
            while free < len(want):
                victim = next(victims, None)
                if victim is None:
                    break
                out = [p for p in self.pages(victim) if self.fast[p]
                       and not any(q in self.touched_since_scan for q in self.sharers(p, victim))]
                if out:
                    self.flip(out, to_fast=False, issue_at=issue_at)
                    free = self.capacity - self.used
            self.flip(want[: max(0, free)], to_fast=True, issue_at=issue_at)
        self.to_promote.clear()
        self.touched_since_scan.clear()

    def sharers(self, page: int, sid: int) -> list[int]:
        """Other live storages on a boundary page of ``sid``."""
        r = self.pages(sid)
        if page not in (r.start, r.stop - 1):
            return []
        return [o for o in self.storages_on(page, page + 1) if o != sid]

    def run(self) -> Plan:
        trace, cost = self.ctx.trace, self.ctx.cost
        created: dict[int, list[int]] = {}
        freed: dict[int, list[int]] = {}
        for s in trace.storages:
            if s.created_at is None:
                self.allocate(s.id)
                self.live.add(s.id)
                self.placement[s.id] = self.fast_bytes(s.id)
            else:
                created.setdefault(s.created_at, []).append(s.id)
            if s.freed_at is not None:
                freed.setdefault(s.freed_at, []).append(s.id)
        clock = next_scan = 0.0
        for op in trace.ops:
            i = op.index
            for sid in created.get(i, ()):
                self.allocate(sid)
                self.live.add(sid)
                self.placement[sid] = self.fast_bytes(sid)
            for sid in (*op.inputs, *op.outputs):
                if sid not in self.live:
                    continue
                self.lru[sid] = None
                self.lru.move_to_end(sid)
                self.touched_since_scan.add(sid)
                r = self.pages(sid)
                if 0 in self.fast[r.start : r.stop]:
                    self.to_promote.pop(sid, None)  # re-insert: most recent last
                    self.to_promote[sid] = None
            for sid in freed.get(i, ()):
                self.free(sid)
                self.live.discard(sid)
            clock += cost.base_s[i]
            if clock >= next_scan and i + 1 < len(trace.ops):
                self.scan(i + 1)
                next_scan = clock + SCAN_PERIOD_S
        return empty_plan(self.ctx, "page-lru", self.budget, placement=self.placement,
                          moves=self.moves, info={"pages": self.n_pages, "fast_pages": self.capacity})
