"""Recomputed layers in real training (NOTE [Recomputed layers]): where moving saved
activations costs more link time than rerunning the layers that made them, the plan recomputes
those layers, and training stays bit for bit what it is without Sentinel (dropout included:
the checkpoint restores the RNG state)."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import warnings
from typing import ClassVar

import pytest
import torch
from torch import nn

import sentinel_hm as sh
from sentinel_hm.trace.model import Phase

from .test_sentinel import CONFIGS, assert_same, assert_steady_within_budget, train

# a link so slow that moving a block's saved activations costs far more than rerunning it,
# whatever the noise of this machine's op times
SLOW_LINK = "throttled:h2d=0.05GB/s,d2h=0.05GB/s"


class _Block(nn.Module):
    def __init__(self, width: int, checkpointed: bool, norm: type[nn.Module]) -> None:
        super().__init__()
        self.f = nn.Sequential(norm(width), nn.Linear(width, width), nn.GELU(),
                               nn.Dropout(0.1), nn.Linear(width, width))
        self.checkpointed = checkpointed  # the user's own activation checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointed:
            return x + torch.utils.checkpoint.checkpoint(self.f, x, use_reentrant=False)
        return x + self.f(x)


class _Net(nn.Module):
    def __init__(self, checkpointed: bool = False, norm: type[nn.Module] = nn.LayerNorm,
                 width: int = 64, n: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(width, checkpointed, norm) for _ in range(n))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x), y)


def _run(budget: str | None, recompute: bool = True, checkpointed: bool = False,
         norm: type[nn.Module] = nn.LayerNorm, steps: int = 9, buffers: bool = False
         ) -> tuple[list, list, sh.Sentinel | None]:
    torch.manual_seed(0)
    model = _Net(checkpointed, norm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sentinel = (sh.Sentinel(model, opt, fast_memory=budget, tiers=SLOW_LINK, trials=0,
                            recompute=recompute) if budget else None)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for i in range(steps):
        x, y = torch.randn(512, 64, generator=gen), torch.randint(0, 10, (512,), generator=gen)
        if sentinel is not None and i == steps - 1:
            sentinel.audit()
        with sentinel.step() if sentinel else torch.enable_grad():
            loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        losses.append(loss.detach())
    if sentinel is not None:
        sentinel.close()
    state = [*model.parameters(), *(model.buffers() if buffers else ())]
    return losses, [t.detach().clone() for t in state], sentinel


def test_recomputed_layers_train_bitwise_within_budget():
    plain = _run(None)
    losses, params, sentinel = _run("30%")
    assert sentinel is not None
    stats = sentinel.stats()
    assert stats["recomputed_layers"], stats  # the plan chose to recompute
    assert all(name.startswith("blocks.") for name in stats["recomputed_layers"])
    assert stats["phase"] == "steady" and stats["profiles"] == 2, stats  # once more, recomputing
    assert stats["bytes_to_slow_per_step"] > 0
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"]
    assert_same(plain[0], losses)
    assert_same(plain[1], params)
    # close() gave the layers their own forwards back
    assert not any("forward" in m.__dict__ for m in sentinel.model.modules())


def test_without_recompute_nothing_is_recomputed():
    _, _, sentinel = _run("30%", recompute=False, steps=4)
    assert sentinel is not None
    assert sentinel.stats()["recomputed_layers"] == [] and sentinel.stats()["profiles"] == 1


def test_a_model_that_checkpoints_itself_keeps_working():
    plain = _run(None, checkpointed=True)
    losses, params, sentinel = _run("min", checkpointed=True)
    assert sentinel is not None
    stats = sentinel.stats()
    assert stats["phase"] == "steady" and stats["bytes_to_slow_per_step"] > 0, stats
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"]
    assert_same(plain[0], losses)
    assert_same(plain[1], params)


def test_batch_norm_is_updated_once_per_step_when_recomputed():
    """The same blocks with batch norm: a rerun would update the running statistics a second
    time; the runtime gives back what the rerun changed, so they match plain training."""
    plain = _run(None, norm=nn.BatchNorm1d, buffers=True)
    losses, state, sentinel = _run("30%", norm=nn.BatchNorm1d, buffers=True)
    assert sentinel is not None
    assert sentinel.stats()["recomputed_layers"], sentinel.stats()
    assert_same(plain[0], losses)
    assert_same(plain[1], state)  # parameters, running means and variances, batch counts


def test_recompute_must_be_a_bool():
    model = _Net()
    with pytest.raises(sh.SentinelError, match="recompute="):
        sh.Sentinel(model, torch.optim.SGD(model.parameters(), lr=0.1), recompute="yes")


VARIANTS = {"plain": {}, "two micro-batches": {"accumulate": 2}, "bf16 autocast": {"autocast": True}}


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_reference_gpt_with_recompute_on_a_slow_link(variant):
    """The reference GPT (dropout on) at 50% over a link slow enough that the plan recomputes
    layers: bit for bit as without Sentinel, within the budget, with gradient accumulation and
    under bf16 autocast too. (At the sizes the tests use, the other reference workloads' plans
    do not recompute on this link, nor does the GPT's at "min": their floors are set by
    backward's temporaries; the models above cover batch norm and a model that checkpoints
    itself.)"""
    kwargs = VARIANTS[variant]
    plain_losses, plain_state, _ = train("gpt", None, **kwargs)
    losses, state, sentinel = train("gpt", "50%", tiers=SLOW_LINK, **kwargs)
    assert sentinel.stats()["recomputed_layers"], sentinel.stats()
    assert_same(plain_losses, losses)
    assert_same(plain_state, state)
    assert_steady_within_budget(sentinel)
    sentinel.close()


def test_recomputing_that_makes_the_budget_infeasible_is_undone(monkeypatch):
    """NOTE [Recomputed layers]: the planner chooses on the profiled step; a checkpoint then
    rebuilds all of a layer's saved tensors at once, on the runtime's clock, and the step as
    it runs may no longer fit a budget the step as written fits. Forced here (the choice
    itself depends on measured op times): the CNN's first stage recomputed needs about 73%
    of the peak; at 60% the runtime gives the stage its own forward back and trains without
    recomputing, bit for bit, instead of refusing a budget it can hold."""
    real = sh.Sentinel._recompute_layers
    forced: list[str] = []

    def choose_first_stage(self, trace):
        if not forced:
            forced.append("stages.0")
            self._checkpointed.wrap("stages.0", dict(self.model.named_modules())["stages.0"])
            self._stats.recomputed_layers = self._checkpointed.names
            return True
        return real(self, trace)

    monkeypatch.setattr(sh.Sentinel, "_recompute_layers", choose_first_stage)

    def run(budget: str | None) -> tuple[list[torch.Tensor], sh.Sentinel | None]:
        torch.manual_seed(0)
        wl = CONFIGS["cnn"](0)
        sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=budget,
                               trials=0) if budget else None
        losses = []
        for i in range(9):  # one profile more than usual: the one without recomputing
            if sentinel is not None and i == 8:
                sentinel.audit()
            with sentinel.step() if sentinel is not None else contextlib.nullcontext():
                loss = wl.model(*wl.make_batch())
                loss.backward()
                wl.optimizer.step()
                wl.optimizer.zero_grad()
            losses.append(loss.detach())
        return losses + [p.detach().clone() for p in wl.model.state_dict().values()], sentinel

    plain, _ = run(None)
    ours, sentinel = run("60%")
    assert forced and sentinel is not None
    assert sentinel.stats()["recomputed_layers"] == []
    assert_same(plain, ours)
    assert_steady_within_budget(sentinel)
    sentinel.close()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(("name", "budget"), [("gpt", "min"), ("cnn", "min"), ("lstm", "min"),
                                              ("mlp", "min"), ("gpt", "50%")])
def test_every_reference_workload_recomputing_every_layer(every_layer_recomputed, name, budget,
                                                          variant):
    """Each reference workload with all its layers recomputed, moving the rest: dropout (GPT,
    LSTM), batch norm's running statistics and in-place ReLU (CNN), an nn.LSTM, embeddings,
    with gradient accumulation and under bf16 autocast: parameters, gradients and buffers bit
    for bit as without Sentinel, the steady step within its budget."""
    kwargs = VARIANTS[variant]
    plain_losses, plain_state, _ = train(name, None, **kwargs)
    losses, state, sentinel = train(name, budget, **kwargs)
    assert sentinel.stats()["recomputed_layers"], sentinel.stats()
    assert_same(plain_losses, losses)
    assert_same(plain_state, state)
    assert_steady_within_budget(sentinel)
    sentinel.close()


def test_a_recomputing_step_is_predicted_to_cost_its_reruns(every_layer_recomputed):
    """Predictions are calibrated on plain warm-up steps; a step that reruns every layer's
    forward does more, and its predicted compute says so (it once absorbed the reruns into
    the per-op overhead, and predicted the plain step's time)."""
    _, _, sentinel = train("gpt", "min")
    stats = sentinel.stats()
    assert stats["recomputed_layers"] and stats["profiles"] == 2, stats
    assert sentinel.prediction is not None and sentinel.trace is not None
    # the reruns are in the profile (a forward op in backward) ...
    assert any(op.phase is Phase.BACKWARD and op.name == "aten::native_layer_norm"
               for op in sentinel.trace.ops)
    # ... and a step whose ops take twice the program's is calibrated on twice the plain step
    # (set, not measured: the two profiles' op times are timings, noisy under load)
    doubled = dataclasses.replace(sentinel.trace, ops=tuple(
        dataclasses.replace(op, duration_s=2 * sentinel._program_ops_s / len(sentinel.trace.ops))
        for op in sentinel.trace.ops))
    trace, hw = sentinel._calibrated(doubled)
    compute = sum(op.duration_s for op in trace.ops) + len(trace.ops) * hw.op_overhead_s
    assert compute == pytest.approx(2 * stats["plain_step_s"], rel=1e-6)
    sentinel.close()


# -- NOTE [Safe reruns] ----------------------------------------------------------------------


class _Remembering(nn.Module):
    """Adds this call's keys to the memory it is given, then attends over all of it (a cache
    it is handed, as Hugging Face's layers are; under a name no rule knows): a rerun given
    the same memory attends over twice as many keys."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: list[torch.Tensor]) -> torch.Tensor:
        memory.append(self.k(x))
        keys = torch.cat(memory)
        return x + torch.softmax(self.q(x) @ keys.t() / 8, dim=-1) @ keys


class _MemoryNet(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_Block(width, False, nn.LayerNorm), _Remembering(width),
                                     _Block(width, False, nn.LayerNorm), _Remembering(width),
                                     _Block(width, False, nn.LayerNorm)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            # a fresh memory for each call, as a model makes a fresh cache for each forward
            x = block(x, []) if isinstance(block, _Remembering) else block(x)
        return nn.functional.cross_entropy(self.head(x), y)


class _Probe(nn.Linear):
    """A leaf layer that notes each time its forward reads its own weight in the slow tier
    (on a GPU, a device mismatch; on the host tiers, silent)."""

    sentinel: ClassVar[sh.Sentinel | None] = None
    slow_reads: ClassVar[list[str]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        running = _Probe.sentinel
        if running is not None and running.tiers.is_slow(self.weight.untyped_storage()):
            in_backward = torch._C._current_graph_task_id() != -1  # a rerun
            _Probe.slow_reads.append("rerun" if in_backward else "forward")
        return super().forward(x)


class _ProbedNet(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.proj = _Probe(width, width)  # used first in forward, rerun last in backward
        self.blocks = nn.ModuleList(_Block(width, False, nn.LayerNorm) for _ in range(4))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x), y)


def _train_net(make: type[nn.Module], budget: str | None, steps: int = 9
               ) -> tuple[list[torch.Tensor], sh.Sentinel | None, list[str]]:
    """Losses, then parameters; the Sentinel; its warnings."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sentinel = (sh.Sentinel(model, opt, fast_memory=budget, tiers="host", trials=0)
                    if budget else None)
        _Probe.sentinel = sentinel
        try:
            for i in range(steps):
                x = torch.randn(256, 64, generator=gen)
                y = torch.randint(0, 10, (256,), generator=gen)
                if sentinel is not None and i == steps - 1:
                    sentinel.audit()
                with sentinel.step() if sentinel else contextlib.nullcontext():
                    loss = model(x, y)
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                losses.append(loss.detach())
        finally:
            _Probe.sentinel = None
    warned = [str(w.message) for w in caught if str(w.message).startswith("sentinel:")]
    return losses + [p.detach().clone() for p in model.parameters()], sentinel, warned


def test_a_layer_whose_rerun_does_not_repeat_its_forward_is_not_recomputed(
        every_layer_recomputed):
    """Every layer is wrapped; the two that append to a memory they are given would attend
    over twice the keys when rerun. The recomputing profile step finds it (their rebuilt
    saved tensors differ from the first forward's), trains on what the first forward saved,
    gives those two their own forwards back with a warning naming each, and profiles again:
    the rest stay recomputed, and training is plain training bit for bit."""
    plain, _, _ = _train_net(_MemoryNet, None)
    ours, sentinel, warned = _train_net(_MemoryNet, "min")
    assert sentinel is not None
    stats = sentinel.stats()
    assert stats["recomputed_layers"] == ["blocks.0", "blocks.2", "blocks.4", "head"], stats
    assert sorted(w.split("'")[1] for w in warned) == ["blocks.1", "blocks.3"], warned
    assert all("is not recomputed" in w and "shape" in w for w in warned), warned
    assert stats["profiles"] == 3, stats  # as written, recomputing all, without those two
    assert_same(plain, ours)
    assert_steady_within_budget(sentinel)
    sentinel.close()


def test_a_recomputed_leaf_layer_reruns_with_its_own_parameters_fast(every_layer_recomputed):
    """A leaf layer's own parameters become fast through its forward pre-hook; a checkpoint's
    rerun calls its forward without the hooks. At "min" the first layer's weight leaves
    fast memory between its forward and its backward: its rerun must bring it back first,
    as the forward's pre-hook does (on a GPU the rerun failed with a device mismatch)."""
    _Probe.slow_reads = []
    plain, _, _ = _train_net(_ProbedNet, None)
    ours, sentinel, warned = _train_net(_ProbedNet, "min")
    assert sentinel is not None and not warned, warned
    stats = sentinel.stats()
    assert "proj" in stats["recomputed_layers"] and stats["bytes_to_slow_per_step"] > 0, stats
    assert sentinel.schedule is not None and sentinel.schedule.params  # parameters move
    assert _Probe.slow_reads == []
    assert_same(plain, ours)
    assert_steady_within_budget(sentinel)
    sentinel.close()


def test_a_rerun_gets_no_cache_and_use_cache_false():
    """NOTE [Safe reruns]: bound by name, whether given by position or keyword, under each
    name Hugging Face has used; the first forward's arguments are never changed."""
    from sentinel_hm.runtime.recompute import _without_cache

    def layer(x, layer_past=None, mask=None, use_cache=False, **kwargs):
        return x

    signature = inspect.signature(layer)
    args, kwargs = _without_cache(signature, (1, "cache", "mask"), {"use_cache": True})
    assert signature.bind(*args, **kwargs).arguments == {
        "x": 1, "layer_past": None, "mask": "mask", "use_cache": False}
    given = {"past_key_values": "cache", "past_key_value": "cache", "cache": "cache"}
    args, kwargs = _without_cache(signature, (1,), dict(given))
    assert args == (1,) and kwargs == {"past_key_values": None, "past_key_value": None,
                                       "cache": None}
    assert given["cache"] == "cache"
