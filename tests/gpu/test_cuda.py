"""CUDA tiers (skipped without CUDA): bitwise training, the budget, races, no memory growth.

Run by scripts/gpu_check.sh wherever a GPU is available.
"""

from __future__ import annotations

import os

import pytest
import torch

import sentinel_hm as sh
from sentinel_hm.workloads import Workload, cnn, gpt

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

STEPS = 8


@pytest.fixture(autouse=True)
def _deterministic():
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    yield
    torch.use_deterministic_algorithms(False)


def _workload(name: str) -> Workload:
    torch.manual_seed(0)
    if name == "gpt":  # low arithmetic density: copies and frees race with short kernels
        wl = gpt.from_config(gpt.GPTConfig(256, 128, 64, 4, 4, 0.1, 16), 0)
    else:
        wl = cnn.from_config(cnn.CNNConfig((16, 32), 1, 32, 3, 10, 32), 0)
    wl.model.cuda()  # parameters keep their identity: the optimizer still holds them
    make = wl.make_batch
    return Workload(wl.name, wl.model, wl.optimizer,
                    lambda: tuple(t.cuda(non_blocking=True) for t in make()))


def _train(name: str, budget: str | None, steps: int = STEPS):
    wl = _workload(name)
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget, tiers="cuda") \
        if budget else None
    losses = []
    for _ in range(steps):
        if sentinel is None:
            losses.append(wl.step())
        else:
            with sentinel.step():
                losses.append(wl.step())
    torch.cuda.synchronize()
    return losses, [p.detach().clone() for p in wl.model.parameters()], sentinel


@pytest.mark.parametrize("name", ["gpt", "cnn"])
@pytest.mark.parametrize("budget", ["50%", "min"])
def test_bitwise_equal_on_cuda(name, budget):
    plain_losses, plain_params, _ = _train(name, None)
    losses, params, sentinel = _train(name, budget)
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, losses, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain_params, params, strict=True))
    stats = sentinel.stats()
    assert stats["phase"] == "steady" and stats["bytes_to_slow_per_step"] > 0
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"]
    sentinel.close()


def test_races_with_slow_copies(monkeypatch):
    """Side streams sleep before each copy: a missing wait or record_stream shows as wrong
    values (compute would reuse or read memory a copy still touches)."""
    from sentinel_hm.tiers.cuda import CudaTiers

    submit = CudaTiers.submit

    def slow_submit(self, to, work):
        def slowed():
            torch.cuda._sleep(2_000_000)
            work()

        return submit(self, to, slowed)

    monkeypatch.setattr(CudaTiers, "submit", slow_submit)
    plain_losses, plain_params, _ = _train("gpt", None)
    losses, params, sentinel = _train("gpt", "min")
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, losses, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain_params, params, strict=True))
    sentinel.close()


def test_budget_measured_by_the_allocator():
    wl = _workload("gpt")
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory="50%", tiers="cuda")
    for _ in range(STEPS):
        with sentinel.step():
            wl.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with sentinel.step():
        wl.step()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() <= sentinel.stats()["budget_bytes"]
    sentinel.close()


def test_no_growth_over_50_steps():
    wl = _workload("cnn")
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory="min", tiers="cuda")
    for _ in range(10):
        with sentinel.step():
            wl.step()
    torch.cuda.synchronize()
    device_after_10 = torch.cuda.memory_allocated()
    arena = sentinel.tiers.arena()
    arena_bytes = arena.numel() if arena is not None else 0
    for _ in range(40):
        with sentinel.step():
            wl.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= device_after_10
    arena = sentinel.tiers.arena()
    assert (arena.numel() if arena is not None else 0) == arena_bytes
    sentinel.close()
