"""torch.compile beside Sentinel (NOTE [Compiled code under the tracer]).

A compiled model is refused at construction, with the reason, before anything runs on it. A
compiled function that Sentinel cannot see from the model (called inside its forward) keeps
running compiled after Sentinel has profiled and audited steps: the tracer no longer leaves
dynamo's "skip" marks that made it run eagerly for the rest of the process. The tests compile
with the ``aot_eager`` backend (no C++ compiler run: seconds, not minutes); dynamo's frame
handling, which the marks are about, is the same for every backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sentinel_hm as sh

from .test_sentinel import assert_same

BACKEND = "aot_eager"


def compiled_regions(step) -> int:
    """Compiled regions entered during ``step()`` (torch.profiler's record of them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("Torch-Compiled Region"))


class _Block(nn.Module):  # a module of the user's: dynamo skips torch.nn's own forwards
    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(32, 64), _Block(64, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _mlp() -> _MLP:
    torch.manual_seed(0)
    return _MLP()


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()", "a compiled block"])
def test_a_compiled_model_is_refused_at_construction(how):
    model = _mlp()
    if how == "torch.compile(model)":
        compiled = torch.compile(model, backend=BACKEND)
    elif how == "model.compile()":
        model.compile(backend=BACKEND)
        compiled = model
    else:
        model.blocks[0].compile(backend=BACKEND)
        compiled = model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 32)

    def step() -> None:
        compiled(x).sum().backward()
        opt.step()
        opt.zero_grad()

    step()
    before = compiled_regions(step)
    assert before >= 1
    with pytest.raises(sh.SentinelError, match=r"compiled with torch\.compile"):
        sh.Sentinel(compiled, opt)
    assert compiled_regions(step) == before


@torch.compile(backend=BACKEND)
def _scaled_tanh(h: torch.Tensor) -> torch.Tensor:
    return torch.tanh(h) * 2


class _CallsCompiled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(32, 256), nn.Linear(256, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(_scaled_tanh(self.a(x)))


def _train(budget: str | None, steps: int = 9) -> tuple[list, list, dict, int]:
    torch.manual_seed(0)
    model = _CallsCompiled()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sentinel = sh.Sentinel(model, opt, fast_memory=budget, trials=0) if budget else None
    gen = torch.Generator().manual_seed(1)
    losses = []

    def step() -> None:
        loss = model(torch.randn(512, 32, generator=gen)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())

    for i in range(steps):
        if sentinel is not None and i == steps - 1:
            sentinel.audit()
        with sentinel.step() if sentinel else torch.enable_grad():
            step()
    stats = sentinel.stats() if sentinel else {}
    if sentinel is not None:
        sentinel.close()
    return losses, [p.detach().clone() for p in model.parameters()], stats, \
        compiled_regions(step)


def test_profiling_leaves_compiled_code_compiled():
    plain_losses, plain_params, _, plain_regions = _train(None)
    losses, params, stats, regions = _train("min")
    # one profile, and one more when the plan recomputes layers (NOTE [Recomputed layers])
    assert stats["phase"] == "steady", stats
    assert stats["profiles"] == 1 + bool(stats["recomputed_layers"]), stats
    assert stats["bytes_to_slow_per_step"] > 0
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"]
    # compiled after Sentinel's profiled and audited steps, as without it
    assert regions == plain_regions >= 1
    assert_same(plain_losses, losses)  # the last step of each ran after close()
    assert_same(plain_params, params)
