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

Copied buffers are kept until their copy is done, then dropped before the
copy is seen done (a device allocator frees them at that point). The engine
counts what happened, so a test can check that the races really occurred.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from collections.abc import Callable

import torch

from sentinel_hm.core.hardware import Access
from sentinel_hm.core.plan import Tier
from sentinel_hm.tiers.base import Completion
from sentinel_hm.tiers.host import HostTiers

Delay = Callable[[random.Random, Tier], float]


def gpu_like_delay(rng: random.Random, to: Tier) -> float:
    """Mostly short, sometimes long (a copy queued behind others): the host runs ahead."""
    return rng.uniform(2e-3, 6e-3) if rng.random() < 0.15 else rng.uniform(0, 4e-4)


class RacingCopy:
    __slots__ = ("_done", "error", "seq", "to")

    def __init__(self, to: Tier, seq: int) -> None:
        self.to = to
        self.seq = seq
        self.error: BaseException | None = None
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self) -> None:
        self._done.wait()
        if self.error is not None:
            raise self.error


class RacingEngine:
    def __init__(self, copy: Callable[[torch.Tensor, torch.Tensor], None], *, seed: int = 0,
                 delay: Delay = gpu_like_delay, gpu_waits: bool = True) -> None:
        self._copy = copy
        self._delay = delay
        self.gpu_waits = gpu_waits
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
        self._seq += 1
        c = RacingCopy(to, self._seq)
        self._frontier = [f for f in self._frontier if not f.done()]
        deps = [*self._frontier, *([after] if after is not None else [])]
        self._submitted.append(c)
        self.submitted += 1
        self._queues[to].put((c, dst, src, deps))
        return c

    def compute_wait(self, copy: Completion) -> float:
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
        if error is not None:
            raise error

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
                c._done.set()


class RacingTiers(HostTiers):
    """Host tiers whose copies race like a GPU's. Like CUDA tiers, gradients
    stay where they are (``moves_gradients=False``): a gradient swapped for a slow-tier view
    would be read by the program's own code (``clip_grad_norm_``), which on a GPU is compute
    ordered after the copy, and on this CPU a host read (``gpu_waits=False`` models host
    tiers instead: every wait blocks, gradients move)."""

    def __init__(self, seed: int = 0, delay: Delay = gpu_like_delay, gpu_waits: bool = True,
                 access: Access = Access.MIGRATE) -> None:
        super().__init__(access)
        if gpu_waits and access is not Access.MIGRATE:
            raise ValueError("under direct access the compute reads the slow tier itself: "
                             "every wait must block (gpu_waits=False)")
        self.seed, self.delay, self.gpu_waits = seed, delay, gpu_waits
        self.moves_gradients = not gpu_waits
        self.name = (f"racing host ({access.value} access, {'gpu' if gpu_waits else 'host'} "
                     f"waits, seed {seed})")
        self.engines: list[RacingEngine] = []

    def engine(self) -> RacingEngine:  # type: ignore[override]
        e = RacingEngine(self.copy, seed=self.seed + len(self.engines), delay=self.delay,
                         gpu_waits=self.gpu_waits)
        self.engines.append(e)
        return e
