"""Host tiers whose copies race the compute the way a GPU's copies do (a test copy engine).

`RacingEngine` keeps every promise of NOTE [Copy engine] (``tiers/base.py``) and
nothing more, each as late as a GPU could keep it:

- each direction is one lane (one CUDA side stream): copies toward one tier
  complete in submission order, each after a seeded random delay, some of them
  long, so the host runs ahead and copies of the other direction overtake
  earlier ones;
- a copy starts only after its ``after`` copy and after the copies the compute
  has been told to wait for (a side stream waits for the compute stream);
- making compute wait for a copy toward the fast tier blocks the host, since
  the compute reads that memory next (on a CPU the compute is the host); for a
  copy toward the slow tier it does not (``gpu_waits``): on a GPU the compute
  stream would wait and the host would go on, and on migrate tiers that do not
  move gradients only the runtime's own copies read the slow tier during a step,
  all of them ordered after such waits. A host read of the slow tier (a
  checkpoint between steps) then sees complete bytes only after ``drain``.

When the fast-tier memory a copy used becomes reusable is the engine's
``reuse`` (what a device allocator would do, so that an asynchronous audit
sees what it would hold):

- ``"lane"``: the lane drops a copy's buffers when the copy is done, before it
  is seen done (what the mover threads of the host tiers do);
- ``"record_stream"``: `CudaEngine` before issue 22 (``record_stream``): a
  buffer the program drops becomes reusable only when its lane has passed
  every copy queued before the drop, not just its own. The engine keeps the
  fast-side buffer, notices the drop at the next op or engine call (`sweep`;
  the allocator's bookkeeping also runs at allocations), marks it with the
  lane's last copy then, and lets it go when the lane has finished that copy;
  ``unreusable_bytes`` / ``peak_unreusable`` count what is dropped but kept;
- ``"held"``: `CudaEngine` now (NOTE [CUDA copies]): the engine holds the
  fast-side buffer until the host sees the copy done (``done``, ``wait``,
  ``drain``, or its own poll at each submit), or, for a copy toward the fast
  tier, until the compute waits for it.

The engine counts what happened, so a test can check that the races really
occurred.
"""

from __future__ import annotations

import queue
import random
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Tier
from sentinel_hm.tiers.base import Completion
from sentinel_hm.tiers.host import HostTiers

Delay = Callable[[random.Random, Tier], float]
Reuse = Literal["lane", "record_stream", "held"]
CUDA_REUSE: Reuse = "held"  # what `CudaEngine` does (NOTE [CUDA copies])


def gpu_like_delay(rng: random.Random, to: Tier) -> float:
    """Mostly short, sometimes long (a copy queued behind others): the host runs ahead."""
    return rng.uniform(2e-3, 6e-3) if rng.random() < 0.15 else rng.uniform(0, 4e-4)


class RacingCopy:
    __slots__ = ("_done", "error", "keep", "seq", "to")

    def __init__(self, to: Tier, seq: int) -> None:
        self.to = to
        self.seq = seq
        self.error: BaseException | None = None
        self.keep: torch.Tensor | None = None  # ``reuse="held"``: until seen done
        self._done = threading.Event()

    def done(self) -> bool:
        if not self._done.is_set():
            return False
        self.keep = None
        return True

    def wait(self) -> None:
        self._done.wait()
        self.keep = None
        if self.error is not None:
            raise self.error


class _Kept:
    """``reuse="record_stream"``: a fast-side buffer the engine keeps for its lane."""

    __slots__ = ("buffer", "lane", "mark", "nbytes", "storage", "weak")

    def __init__(self, buffer: torch.Tensor, lane: Tier) -> None:
        self.buffer: torch.Tensor | None = buffer
        self.storage: torch.UntypedStorage | None = buffer.untyped_storage()
        self.weak = StorageWeakRef(self.storage)
        self.nbytes = self.storage.nbytes()
        self.lane = lane
        self.mark: int | None = None  # the lane's last copy when the program dropped it

    def references(self) -> tuple[int, int]:
        """(tensors over the storage, Python references to its storage object): the
        engine's own are the baseline (`RacingEngine._baseline`)."""
        return torch._C._storage_Use_Count(self.weak.cdata), sys.getrefcount(self.storage)


class RacingEngine:
    def __init__(self, copy: Callable[[torch.Tensor, torch.Tensor], None], *, seed: int = 0,
                 delay: Delay = gpu_like_delay, gpu_waits: bool = True,
                 reuse: Reuse = "lane") -> None:
        self._copy = copy
        self._delay = delay
        self.gpu_waits = gpu_waits
        self.reuse = reuse
        # ``reuse="record_stream"``: buffers kept for the lanes, and where each lane is
        self._kept: list[_Kept] = []
        self._last_submitted = dict.fromkeys(Tier, 0)
        self._last_done = dict.fromkeys(Tier, 0)
        self.unreusable_bytes = 0  # dropped by the program, not reusable yet
        self.peak_unreusable = 0
        probe = _Kept(torch.empty(1), Tier.FAST)
        self._baseline = probe.references()  # a buffer only the engine holds
        # ``reuse="held"``: copies whose buffers are held, oldest first per lane
        self._held: dict[Tier, deque[RacingCopy]] = {to: deque() for to in Tier}
        self._queues: dict[Tier, queue.SimpleQueue] = {to: queue.SimpleQueue() for to in Tier}
        self._rngs = {Tier.SLOW: random.Random(2 * seed), Tier.FAST: random.Random(2 * seed + 1)}
        self._submitted: list[RacingCopy] = []
        self._frontier: list[RacingCopy] = []  # copies the compute waits for, the host not
        self._lock = threading.Lock()
        self._seq = 0
        self._finished = 0  # highest sequence number completed so far, by either lane
        # what happened, for the tests
        self.submitted = 0
        self.host_ahead = 0  # compute waits for a copy not yet done
        self.not_blocked = 0  # of those, waits the host did not block on (``gpu_waits``)
        self.overtaken = 0  # copies done after a later-submitted copy of the other direction
        self.in_flight_at_drain = 0  # copies not done when the host drained (between steps)
        self._lanes = [threading.Thread(target=self._lane, args=(to,), daemon=True,
                                        name=f"racing-to-{to.value}") for to in Tier]
        for lane in self._lanes:
            lane.start()

    # -- the protocol --------------------------------------------------------------------------

    def submit(self, to: Tier, dst: torch.Tensor, src: torch.Tensor,
               after: Completion | None = None) -> RacingCopy:
        self.sweep()
        self._seq += 1
        c = RacingCopy(to, self._seq)
        fast_side = src if to is Tier.SLOW else dst
        if self.reuse == "record_stream":
            with self._lock:
                self._kept.append(_Kept(fast_side, to))
                self._last_submitted[to] = c.seq
        elif self.reuse == "held":
            c.keep = fast_side
            self._held[to].append(c)
        self._frontier = [f for f in self._frontier if not f.done()]
        deps = [*self._frontier, *([after] if after is not None else [])]
        self._submitted.append(c)
        self.submitted += 1
        self._queues[to].put((c, dst, src, deps))
        return c

    def compute_wait(self, copy: Completion) -> float:
        self.sweep()
        if copy.done():
            copy.wait()
            return 0.0
        self.host_ahead += 1
        if self.gpu_waits and isinstance(copy, RacingCopy) and copy.to is Tier.SLOW:
            self.not_blocked += 1
            self._frontier.append(copy)
            return 0.0
        start = time.perf_counter()
        copy.wait()
        return time.perf_counter() - start

    def compute_copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.sweep()
        frontier, self._frontier = self._frontier, []
        for f in frontier:
            f.wait()
        self._copy(dst, src)

    def drain(self) -> None:
        submitted, self._submitted = self._submitted, []
        self._frontier = []
        self.in_flight_at_drain += sum(not c.done() for c in submitted)
        error: BaseException | None = None
        for c in submitted:
            try:
                c.wait()
            except BaseException as e:  # every copy ends before the first error is raised
                error = error or e
        self.sweep()
        if error is not None:
            raise error

    # -- when fast memory becomes reusable (``reuse``) ----------------------------------------

    def sweep(self) -> None:
        """What the host notices between ops: ``record_stream``: buffers the program dropped
        since (marked with their lane's last copy), and those whose lane has passed their mark
        (let go); ``held``: copies seen done by the engine's own poll, oldest first."""
        if self.reuse == "held":
            for pending in self._held.values():
                while pending and pending[0].done():
                    pending.popleft()
            return
        if self.reuse != "record_stream" or not self._kept:
            return
        with self._lock:
            uses, refs = self._baseline
            for k in self._kept:
                if k.mark is None:
                    use, py = k.references()
                    if use <= uses and py <= refs:  # the program holds it no more
                        k.mark = self._last_submitted[k.lane]
                        self.unreusable_bytes += k.nbytes
            self._release_passed()

    def _release_passed(self) -> None:
        """With the lock held: let go of the dropped buffers whose lane passed their mark."""
        kept = []
        for k in self._kept:
            if k.mark is not None and self._last_done[k.lane] >= k.mark:
                self.unreusable_bytes -= k.nbytes
                k.buffer = k.storage = None
            else:
                kept.append(k)
        self.peak_unreusable = max(self.peak_unreusable, self.unreusable_bytes)
        self._kept = kept

    def close(self) -> None:
        try:
            self.drain()
        finally:
            for q in self._queues.values():
                q.put(None)
            for lane in self._lanes:
                lane.join()

    # -- the lanes -----------------------------------------------------------------------------

    def _lane(self, to: Tier) -> None:
        rng, q = self._rngs[to], self._queues[to]
        while True:
            item = q.get()
            if item is None:
                return
            c, dst, src, deps = item
            item = None
            try:
                time.sleep(self._delay(rng, to))
                for d in deps:
                    d.wait()
                self._copy(dst, src)
            except BaseException as e:
                c.error = e
            finally:
                dst = src = deps = None  # freed (if nothing else holds them) before done
                with self._lock:
                    if c.seq < self._finished:
                        self.overtaken += 1
                    self._finished = max(self._finished, c.seq)
                    self._last_done[to] = c.seq
                    if self.reuse == "record_stream":
                        self._release_passed()
                c._done.set()


class RacingTiers(HostTiers):
    """Host tiers whose copies race like a GPU's. Like CUDA tiers, gradients
    stay where they are (``moves_gradients=False``): a gradient swapped for a slow-tier view
    would be read by the program's own code (``clip_grad_norm_``), which on a GPU is compute
    ordered after the copy, and on this CPU a host read (``gpu_waits=False`` models host
    tiers instead: every wait blocks, gradients move)."""

    def __init__(self, seed: int = 0, delay: Delay = gpu_like_delay, gpu_waits: bool = True,
                 access: Access = Access.MIGRATE, reuse: Reuse = "lane") -> None:
        super().__init__(access)
        if gpu_waits and access is not Access.MIGRATE:
            raise ValueError("under direct access the compute reads the slow tier itself: "
                             "every wait must block (gpu_waits=False)")
        self.seed, self.delay, self.gpu_waits, self.reuse = seed, delay, gpu_waits, reuse
        self.moves_gradients = not gpu_waits
        self.name = (f"racing host ({access.value} access, {'gpu' if gpu_waits else 'host'} "
                     f"waits, seed {seed})")
        self.engines: list[RacingEngine] = []

    def engine(self) -> RacingEngine:  # type: ignore[override]
        e = RacingEngine(self.copy, seed=self.seed + len(self.engines), delay=self.delay,
                         gpu_waits=self.gpu_waits, reuse=self.reuse)
        self.engines.append(e)
        return e


class Sweeping(TorchDispatchMode):
    """Runs `RacingEngine.sweep` before every op, as a device allocator notices freed blocks at
    its next allocation: an asynchronous audit then sees a dropped buffer as reusable at the
    first op where the allocator could reuse it."""

    def __init__(self, engine: RacingEngine) -> None:
        super().__init__()
        self.engine = engine

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.engine.sweep()
        return func(*args, **(kwargs or {}))
