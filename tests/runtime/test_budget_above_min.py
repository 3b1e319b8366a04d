"""A budget at or above what ``fast_memory="min"`` measures trains (NOTE [Held by the program],
NOTE [Measured budget]).

The smallest model that showed it, the GPU benchmark's tiny Llama (2 layers, 64 wide, 64
tokens, bf16 autocast; benchmarks/bench_gpu_hf.py --device cpu --tiny): "min" trained at
445.7 KiB, while "20%" (456.4 KiB) was given up on after measuring 509.1 KiB. Its trial found
activations the program held later into the forward pass than the trace saw, and the plan was
made again with them held (``Context.held_until``). The planner's view of held storages is
cautious, so its smallest plan with them (450.2 KiB here) was far above the smallest plan
without them (222.9 KiB, the one "min" measures at 445.1 KiB); the correction was clamped at
the first and never reached the second. A correction that reaches the held context's floor
now goes on without that knowledge."""

from __future__ import annotations

import torch

import sentinel_hm as sh

from .test_sentinel import assert_same, assert_steady_within_budget
from .test_third_party_models import _transformers

STEPS = 14  # two warm-up steps, a profile, up to ~4 trials, steady steps; the last audited


def train(fast_memory: str | None) -> tuple[list[torch.Tensor], sh.Sentinel | None]:
    tf = _transformers()
    config = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=176,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                            max_position_embeddings=64, attn_implementation="eager")
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(1)
    sentinel = (sh.Sentinel(model, optimizer, fast_memory=fast_memory, tiers="host", trials=1)
                if fast_memory is not None else None)
    losses = []
    for i in range(STEPS):
        if sentinel is not None and i == STEPS - 1:
            sentinel.audit()
        ids = torch.randint(0, 128, (1, 64), generator=gen)
        with sentinel.step() if sentinel is not None else torch.enable_grad():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses + [p.detach().clone() for p in model.parameters()], sentinel


def test_a_budget_above_what_min_measures_trains():
    expected, _ = train(None)
    _, smallest = train("min")
    assert smallest is not None
    floor = smallest.stats()["budget_bytes"]
    smallest.close()
    ours, sentinel = train("20%")  # raised SentinelError: given up on, 509.1 KiB measured
    assert sentinel is not None
    stats = sentinel.stats()
    assert stats["budget_bytes"] >= floor, (stats["budget_bytes"], floor)  # the case at hand
    assert_steady_within_budget(sentinel)
    assert_same(expected, ours)
    sentinel.close()


def test_a_quoted_budget_trains_when_recomputing_measures_over_it(monkeypatch):
    """The smallest budget a refusal quotes was measured on the step as written. At it, the
    planner once chose (by the measured op times, so tests/runtime/test_everything_moves.py's
    lstm-tiny case failed at random) to recompute ``drop_out`` and ``decoder``; that step
    measured 165.0 KiB against 164.5 KiB, no correction fitted, and it was given up on. Now
    it is profiled again without recomputing, whose smallest plan fits. The choice is forced
    here."""
    from .test_everything_moves import SIZES, quoted_floor

    quoted = quoted_floor("tiny", "lstm")

    def the_planners_choice_that_time(self, trace):  # by the measured op times, at random
        if self._checkpointed or self._recompute_undone:
            return False
        modules = dict(self.model.named_modules())
        for name in ("drop_out", "decoder"):
            self._checkpointed.wrap(name, modules[name])
        self._stats.recomputed_layers = self._checkpointed.names
        return True

    monkeypatch.setattr(sh.Sentinel, "_recompute_layers", the_planners_choice_that_time)
    torch.manual_seed(0)
    wl = SIZES["tiny"]("lstm")
    sentinel = sh.Sentinel(wl.model, wl.optimizer, fast_memory=quoted, trials=0)
    for _ in range(12):
        if sentinel.stats()["phase"] == "steady":
            break
        with sentinel.step():
            wl.step()
    sentinel.audit()
    with sentinel.step():
        wl.step()
    assert_steady_within_budget(sentinel)
    assert sentinel.stats()["budget_bytes"] == quoted
    sentinel.close()
