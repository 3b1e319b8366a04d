"""NOTE [Arena lifetime] against a fake CUDA runtime: the pinned arena is unregistered before
its memory can be reused, whether closed or dropped, and a failed registration leaves no CUDA
error behind and says what happened (issue 22, item 3; on an H200 a leaked arena made the next
registration fail with 712, and that error then failed ``model.cuda()``)."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

import sentinel_hm as sh
from sentinel_hm.tiers import cuda as cuda_tiers
from sentinel_hm.tiers.pinned_arena import PAGE, PinnedArena

NAMES = {712: "part or all of the requested memory range is already mapped",
         2: "out of memory", 999: "fake error 999"}


class FakeCudaRuntime:
    """Registrations as CUDA keeps them: a range overlapping a registered one fails with 712,
    and every failed call sets a last error that stays until `take_error`."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}  # ptr -> nbytes
        self.last_error = 0
        self.fail_register: int | None = None  # the next registration fails with this code
        self.fail_unregister: int | None = None
        self.log: list[str] = []

    def _fail(self, code: int) -> int:
        self.last_error = code
        return code

    def host_register(self, ptr: int, nbytes: int) -> int:
        self.log.append("register")
        if self.fail_register is not None:
            code, self.fail_register = self.fail_register, None
            return self._fail(code)
        if any(p < ptr + nbytes and ptr < p + n for p, n in self.registered.items()):
            return self._fail(712)
        self.registered[ptr] = nbytes
        return 0

    def host_unregister(self, ptr: int) -> int:
        self.log.append("unregister")
        if self.fail_unregister is not None:
            code, self.fail_unregister = self.fail_unregister, None
            return self._fail(code)
        if self.registered.pop(ptr, None) is None:
            return self._fail(713)
        return 0

    def take_error(self) -> int:
        code, self.last_error = self.last_error, 0
        return code

    def error_string(self, code: int) -> str:
        return NAMES.get(code, f"error {code}")

    def synchronize(self) -> None:
        self.log.append("synchronize")


class ReusedMemory:
    """Host blocks as glibc hands them out after a free: the same memory again (whenever no
    block over it is alive), so a range left registered is met at once."""

    def __init__(self, nbytes: int) -> None:
        self.memory = bytearray(nbytes)
        self.blocks = 0

    def __call__(self, nbytes: int) -> torch.Tensor:
        assert nbytes <= len(self.memory)
        self.blocks += 1
        return torch.frombuffer(self.memory, dtype=torch.uint8)[:nbytes]


@pytest.fixture
def runtime() -> FakeCudaRuntime:
    return FakeCudaRuntime()


def test_an_arena_dropped_without_close_is_unregistered_before_its_memory_is_reused(runtime):
    memory = ReusedMemory(1 << 20)
    arena = PinnedArena(100_000, runtime, memory)
    ptr = arena.ptr
    assert ptr % PAGE == 0 and arena.nbytes == 25 * PAGE
    assert runtime.registered == {ptr: arena.nbytes}
    del arena  # a Sentinel dropped on give-up or refusal, never closed
    gc.collect()
    assert runtime.registered == {}
    assert runtime.log == ["register", "synchronize", "unregister"]  # no copy may still run
    again = PinnedArena(100_000, runtime, memory)  # the same range, as malloc reuses it
    assert again.ptr == ptr and memory.blocks == 2
    assert runtime.registered == {ptr: again.nbytes} and runtime.last_error == 0
    again.close()


def test_without_the_finalizer_the_reused_range_fails_with_712(runtime):
    """What the finalizer prevents (the H200 run): the leaked registration meets the reused
    memory."""
    memory = ReusedMemory(1 << 20)
    arena = PinnedArena(PAGE, runtime, memory)
    arena._finalizer.detach()  # leaked, as before NOTE [Arena lifetime]
    del arena
    gc.collect()
    with pytest.raises(sh.SentinelError, match="already registered") as err:
        PinnedArena(PAGE, runtime, memory)
    assert "ulimit" not in str(err.value)
    assert runtime.last_error == 0  # cleared: the next unrelated CUDA call is not failed by it


def test_a_slot_view_keeps_the_memory_but_not_the_registration(runtime):
    memory = ReusedMemory(1 << 16)
    arena = PinnedArena(PAGE, runtime, memory)
    view = arena.tensor[:16]
    view.fill_(7)
    del arena
    gc.collect()
    assert runtime.registered == {}
    assert view.tolist() == [7] * 16


@pytest.mark.parametrize(("code", "says", "never"), [
    (712, "already registered with CUDA", "ulimit"),
    (2, "ulimit -l", "already registered"),
    (999, "fake error 999 \\(CUDA error 999\\)", "ulimit"),
])
def test_a_failed_registration_clears_the_error_and_says_what_happened(runtime, code, says,
                                                                       never):
    runtime.fail_register = code
    with pytest.raises(sh.SentinelError, match=says) as err:
        PinnedArena(1 << 16, runtime)
    assert never not in str(err.value)
    assert "error state was cleared" in str(err.value)
    assert runtime.last_error == 0 and runtime.registered == {}


def test_close_is_idempotent_and_a_failed_unregistration_warns(runtime):
    arena = PinnedArena(PAGE, runtime)
    arena.close()
    arena.close()
    assert arena.closed and runtime.log == ["register", "synchronize", "unregister"]
    other = PinnedArena(PAGE, runtime)
    runtime.fail_unregister = 1
    with pytest.warns(UserWarning, match="cudaHostUnregister.*failed: error 1"):
        other.close()
    assert runtime.last_error == 0


# -- CudaTiers over the fake runtime (CUDA's presence faked for the constructor) -------------------


@pytest.fixture
def tiers_factory(monkeypatch, runtime):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    return lambda: cuda_tiers.CudaTiers(runtime=runtime)


def test_cuda_tiers_reserve_close_and_reserve_again(tiers_factory, runtime):
    tiers = tiers_factory()
    tiers.reserve(10_000)
    arena = tiers.arena()
    assert arena is not None and arena.numel() == 3 * PAGE
    assert tiers.is_slow(tiers.slot(PAGE, 8).untyped_storage())
    tiers.reserve(PAGE)  # fits: kept
    assert tiers.arena() is arena and len(runtime.registered) == 1
    tiers.reserve(5 * PAGE)  # more: the old one is unregistered first
    assert len(runtime.registered) == 1 and next(iter(runtime.registered.values())) == 5 * PAGE
    tiers.close()
    tiers.close()  # the lead's give-up path and Sentinel.close() may both close
    assert runtime.registered == {} and tiers.arena() is None
    tiers.reserve(PAGE)  # a Sentinel that plans again after a refusal
    assert len(runtime.registered) == 1
    tiers.close()
    assert runtime.registered == {}


def test_cuda_tiers_dropped_without_close_unregister(tiers_factory, runtime):
    tiers = tiers_factory()
    tiers.reserve(1 << 16)
    assert runtime.registered
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean unregistration: nothing to report
        del tiers
        gc.collect()
    assert runtime.registered == {}
