"""torch.compile under Sentinel (NOTE [Tracing compiled code], NOTE [Compiled code under the
tracer]).

A compiled model (``torch.compile(model)``, ``model.compile()``, compiled blocks) is profiled
as it runs, compiled, and trained under Sentinel bit for bit as the same compiled training
without it, with as many compiled regions per steady step. A compiled function that Sentinel
cannot see from the model (called inside its forward) keeps running compiled after Sentinel
has profiled and audited steps. Most tests compile with the ``aot_eager`` backend (no C++
compiler run: seconds, not minutes); one runs inductor itself."""

from __future__ import annotations

import contextlib

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
    def __init__(self, width: int, out: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = nn.Linear(width, out)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.relu(self.linear(x)))


class _MLP(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(64, 512, dropout),
                                     *(_Block(512, 512, dropout) for _ in range(6)),
                                     _Block(512, 8)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _compiled(model: _MLP, how: str, backend: str) -> nn.Module:
    if how == "torch.compile(model)":
        return torch.compile(model, backend=backend)
    if how == "model.compile()":
        model.compile(backend=backend)
    else:
        for block in model.blocks:
            block.compile(backend=backend)
    return model


def _train_built(build, budget: str | None, steps: int = 9) -> tuple[list, list, dict, int]:
    """Compiled training of ``build()`` = (model, what to call, loss of a batch drawn from a
    generator), under Sentinel at ``budget``; returns the losses, the parameters, Sentinel's
    stats and the compiled regions entered by the last step (a steady one)."""
    torch.manual_seed(0)
    model, compiled, loss_of = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sentinel = sh.Sentinel(compiled, opt, fast_memory=budget, tiers="host", trials=0) \
        if budget else None
    gen = torch.Generator().manual_seed(1)
    losses = []

    def step() -> None:
        with sentinel.step() if sentinel else contextlib.nullcontext():
            loss = loss_of(gen)
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.detach())

    for i in range(steps - 1):
        if sentinel is not None and i == steps - 2:
            sentinel.audit()
        step()
    regions = compiled_regions(step)
    stats = sentinel.stats() if sentinel else {}
    if sentinel is not None:
        sentinel.close()
    return losses, [p.detach().clone() for p in model.parameters()], stats, regions


def _train_compiled(how: str, budget: str | None, backend: str = BACKEND, steps: int = 9,
                    dropout: float = 0.1) -> tuple[list, list, dict, int]:
    """The test MLP, compiled ``how``."""
    def build():
        model = _MLP(dropout)
        compiled = _compiled(model, how, backend)
        return model, compiled, lambda gen: compiled(
            torch.randn(2048, 64, generator=gen)).square().mean()

    return _train_built(build, budget, steps)


def _assert_twins(plain: tuple, ours: tuple, regions: int = 1) -> None:
    """Sentinel's compiled run against the plain one: steady on the profile, bytes moved
    within a binding budget, as many compiled regions per steady step, the same bits."""
    plain_losses, plain_params, _, plain_regions = plain
    losses, params, stats, ours_regions = ours
    assert stats["phase"] == "steady", stats
    assert stats["profiles"] == 1 and not stats["mismatches"], stats
    assert stats["bytes_to_slow_per_step"] > 0, stats
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"] \
        < stats["all_fast_peak_bytes"], stats
    assert ours_regions == plain_regions >= regions  # the steady step ran compiled
    assert_same(plain_losses, losses)
    assert_same(plain_params, params)


# A whole compiled model saves its activations at the end of its forward and unpacks them all
# when its one backward node starts: only gradients and optimizer state can move; compiled
# blocks let activations move between them (docs/integrations.md).
@pytest.mark.parametrize(("how", "budget"), [("torch.compile(model)", "min"),
                                             ("model.compile()", "min"),
                                             ("compiled blocks", "50%"),
                                             ("compiled blocks", "min")])
def test_compiled_training_is_bitwise_equal_and_stays_compiled(how, budget):
    _assert_twins(_train_compiled(how, None), _train_compiled(how, budget))


def test_inductor_compiled_training_is_bitwise_equal():
    """The real backend: inductor's own kernels and buffers, traced from the allocator."""
    how = "torch.compile(model)"
    _assert_twins(_train_compiled(how, None, "inductor", steps=7, dropout=0.0),
                  _train_compiled(how, "min", "inductor", steps=7, dropout=0.0))


def test_compiled_with_fsdp2_is_refused_at_construction(monkeypatch):
    model = _compiled(_MLP(), "model.compile()", BACKEND)
    monkeypatch.setattr("sentinel_hm.runtime.manager.has_sharded_parameters", lambda m: True)
    with pytest.raises(sh.SentinelError, match="FSDP2"):
        sh.Sentinel(model, torch.optim.SGD(model.parameters(), lr=0.1))


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


def test_a_profiler_around_a_step_sentinel_profiles_is_refused_before_the_step_runs():
    model = _compiled(_MLP(), "model.compile()", BACKEND)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sentinel = sh.Sentinel(model, opt, fast_memory="min", tiers="host")
    x = torch.randn(64, 64)

    def step() -> None:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):  # warm-up
        with sentinel.step():
            step()
    ran = []
    with (torch.profiler.profile(),
          pytest.raises(sh.SentinelError, match="profilers do not nest"),
          sentinel.step()):
        ran.append(1)
    assert not ran and sentinel.stats()["phase"] == "profile"
    with sentinel.step():  # without the profiler, the step is profiled
        step()
    assert sentinel.stats()["profiles"] == 1
    sentinel.close()


def test_hugging_face_gpt2_compiled_block_by_block():
    """A model we did not write, compiled as its users compile it (each GPT2Block), dropout
    on: bit for bit as the same compiled training without Sentinel."""
    from .test_third_party_models import gpt2

    def build():
        model, loss_of = gpt2()
        for block in model.transformer.h:
            block.compile(backend=BACKEND)
        return model, model, loss_of

    _assert_twins(_train_built(build, None), _train_built(build, "min"), regions=4)
