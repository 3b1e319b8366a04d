"""NOTE [CUDA copies] on CPU: `CudaEngine` over fake streams and events. A copy's fast-side
buffer is held by the engine (no ``record_stream``) until the host sees the copy done, or, for a
prefetch, until the stream it was allocated on waits for it; then only the program's references
decide when it is freed (issue 22, item 5)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from sentinel_hm.core.plan import Tier
from sentinel_hm.tiers.cuda import CudaEngine


class FakeEvent:
    def __init__(self) -> None:
        self.finished = False
        self.stream: FakeStream | None = None

    def record(self, stream: FakeStream) -> None:
        self.stream = stream
        stream.events.append(self)

    def query(self) -> bool:
        return self.finished

    def synchronize(self) -> None:
        self.finished = True


class FakeStream:
    def __init__(self, device: object = None) -> None:
        self.events: list[FakeEvent] = []
        self.waited: list[FakeEvent] = []

    def wait_stream(self, other: FakeStream) -> None:
        pass

    def wait_event(self, event: FakeEvent) -> None:
        self.waited.append(event)

    def synchronize(self) -> None:
        for e in self.events:
            e.finished = True


class FakeTiers:
    device = torch.device("cuda", 0)

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)


@pytest.fixture
def engine(monkeypatch):
    compute = {"stream": FakeStream()}
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute["stream"])
    monkeypatch.setattr(torch.cuda, "stream", lambda s: _Nothing())

    def no_record_stream(self, stream):
        raise AssertionError("record_stream keeps a dropped block until the side stream passes "
                             "every copy queued before the drop (NOTE [CUDA copies])")

    monkeypatch.setattr(torch.Tensor, "record_stream", no_record_stream)
    e = CudaEngine(FakeTiers())  # type: ignore[arg-type]
    e.compute = compute  # type: ignore[attr-defined]
    return e


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _watched(nbytes: int = 64) -> tuple[torch.Tensor, weakref.ref]:
    t = torch.ones(nbytes, dtype=torch.uint8)
    return t, weakref.ref(t.untyped_storage())


def test_an_evictions_source_lives_until_its_copy_is_seen_done(engine):
    src, alive = _watched()
    copy = engine.submit(Tier.SLOW, torch.empty(64, dtype=torch.uint8), src)
    del src  # the program drops it while the copy is queued
    gc.collect()
    assert alive() is not None and not copy.done()
    copy.event.finished = True  # the side stream is done with it ...
    assert alive() is not None  # ... which the host has not seen yet
    assert copy.done()
    gc.collect()
    assert alive() is None  # freed exactly when seen done


def test_the_engine_lets_go_of_done_copies_that_nobody_polls(engine):
    """An entry may drop its completion object unpolled: the engine's own poll at the next
    submit still frees the buffer (a completion object must not carry it away, either)."""
    src, alive = _watched()
    copy = engine.submit(Tier.SLOW, torch.empty(64, dtype=torch.uint8), src)
    event = copy.event
    del src, copy
    gc.collect()
    assert alive() is not None  # the engine holds it while the copy may run
    event.finished = True
    engine.submit(Tier.SLOW, torch.empty(1, dtype=torch.uint8), torch.ones(1, dtype=torch.uint8))
    gc.collect()
    assert alive() is None


def test_a_prefetchs_destination_is_let_go_when_its_stream_waits_for_it(engine):
    dst, alive = _watched()
    copy = engine.submit(Tier.FAST, dst, torch.zeros(64, dtype=torch.uint8))
    assert engine.compute_wait(copy) == 0.0
    assert engine.compute["stream"].waited == [copy.event]
    del dst
    gc.collect()
    assert alive() is None  # any reuse by the compute stream now follows the copy
    assert not copy.done()  # the host still does not block on it


def test_a_prefetch_waited_for_on_another_stream_is_kept_until_seen_done(engine):
    dst, alive = _watched()
    copy = engine.submit(Tier.FAST, dst, torch.zeros(64, dtype=torch.uint8))
    engine.compute["stream"] = FakeStream()  # a different stream than the one it came from
    engine.compute_wait(copy)
    del dst
    gc.collect()
    assert alive() is not None
    engine.drain()
    gc.collect()
    assert alive() is None and copy.done()


def test_an_eviction_waited_for_by_the_compute_is_kept_until_seen_done(engine):
    """The source of an eviction may have been allocated on any stream: only the copy's end
    makes it free."""
    src, alive = _watched()
    copy = engine.submit(Tier.SLOW, torch.empty(64, dtype=torch.uint8), src)
    engine.compute_wait(copy)
    del src
    gc.collect()
    assert alive() is not None
    copy.wait()
    gc.collect()
    assert alive() is None
