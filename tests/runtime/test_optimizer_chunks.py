"""NOTE [Chunked optimizer step]: the update runs in the plan's chunks, not one call per
parameter; each call keeps the user's optimizer flavour (foreach, for-loop, fused), and
training stays bit for bit equal to the user's own ``optimizer.step()``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

import sentinel_hm as sh
from sentinel_hm.core.plan import Move, Tier
from sentinel_hm.runtime.chunked_optimizer import merge_chunks
from sentinel_hm.workloads import gpt

STEPS = 7  # two warm-up steps, the profile, the trial, three steady steps

FLAVOURS: dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]] = {
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1,
                                                  foreach=True),
    "adamw-for-loop": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1,
                                                   foreach=False),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, fused=True),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, foreach=True),
    "sgd-momentum-for-loop": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9,
                                                        weight_decay=1e-4),
}


class Calls:
    """Each call of the functional update (``torch.optim.adam.adam``, ``sgd.sgd``): the number
    of parameters it updated and the foreach/fused flags it was given."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[int, Any, Any]] = []
        for name in ("adam", "sgd"):
            module = importlib.import_module(f"torch.optim.{name}")
            real = getattr(module, name)

            def wrapped(params: list[torch.Tensor], *args: Any, real: Any = real,
                        **kwargs: Any) -> Any:
                self.calls.append((len(params), kwargs.get("foreach"), kwargs.get("fused")))
                return real(params, *args, **kwargs)

            monkeypatch.setattr(module, name, wrapped)


def train(flavour: str, fast_memory: str | None, calls: Calls) -> tuple[
        list[torch.Tensor], list[list[tuple[int, Any, Any]]], sh.Sentinel | None]:
    torch.manual_seed(0)
    wl = gpt.from_config(gpt.GPTConfig(64, 32, 32, 3, 2, 0.0, 8), 0)
    optimizer = FLAVOURS[flavour](list(wl.model.parameters()))
    sentinel = (sh.Sentinel(wl.model, optimizer, fast_memory=fast_memory, trials=0)
                if fast_memory else None)
    per_step = []
    for i in range(STEPS):
        if sentinel is not None and i == STEPS - 1:
            sentinel.audit()
        calls.calls.clear()
        with sentinel.step() if sentinel is not None else _nothing():
            loss = wl.model(*wl.make_batch())
            loss.backward()
            optimizer.step()
        per_step.append(list(calls.calls))
        state = [t.clone() for p in wl.model.parameters()
                 for t in optimizer.state[p].values()]
        grads = [p.grad.clone() for p in wl.model.parameters() if p.grad is not None]
        optimizer.zero_grad()
    params = [p.detach().clone() for p in wl.model.parameters()]
    return [*params, *grads, *state], per_step, sentinel


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


@pytest.mark.parametrize("budget", ["100%", "50%", "min"])
@pytest.mark.parametrize("flavour", sorted(FLAVOURS))
def test_bitwise_and_flavour_kept_per_chunk(flavour, budget, monkeypatch):
    calls = Calls(monkeypatch)
    plain, plain_calls, _ = train(flavour, None, calls)
    ours, our_calls, sentinel = train(flavour, budget, calls)
    assert sentinel is not None
    stats = sentinel.stats()
    assert stats["phase"] == "steady" and not stats["mismatches"]
    assert stats["audited_peak_fast_bytes"] <= stats["budget_bytes"]
    assert len(plain) == len(ours)
    for a, b in zip(plain, ours, strict=True):
        assert torch.equal(a, b)
    n_params = len(list(sentinel.model.parameters()))
    (user,) = {(foreach, fused) for _, foreach, fused in plain_calls[-1]}
    assert plain_calls[-1] == [(n_params, *user)]
    chunks = sentinel._run_chunks
    assert chunks is not None
    for step in our_calls[-3:]:  # steady steps: one call per chunk of the plan, the user's flags
        assert [n for n, _, _ in step] == [len(c) for c in chunks]
        assert {(foreach, fused) for _, foreach, fused in step} == {user}
    if budget == "100%":  # nothing moves: one chunk, the user's own call
        assert len(chunks) == 1 and our_calls[-1] == plain_calls[-1]
    sentinel.close()


def test_chunks_follow_the_plans_moves():
    """A profiled chunk starts a new one only where the plan acts: a move issued at its first
    op, or its tensors in the slow tier then (fetched on demand)."""
    ops = [10, 20, 30, 40, 50, 60]
    sids = [[1], [2], [3], [4], [5], [6]]
    assert merge_chunks(ops, sids, [], frozenset()) == [[0, 1, 2, 3, 4, 5]]
    # state 3 and 4 come back together, issued as chunk 1 starts, and leave as chunk 4
    # starts: chunks 1 to 3 are one
    moves = [Move(3, Tier.FAST, 20, 8), Move(4, Tier.FAST, 20, 8),
             Move(3, Tier.SLOW, 50, 8), Move(4, Tier.SLOW, 50, 8)]
    assert merge_chunks(ops, sids, moves, frozenset({3, 4})) == [[0], [1, 2, 3], [4, 5]]
    # state 6 stays slow, fetched on demand: its chunk alone
    assert merge_chunks(ops, sids, [], frozenset({6})) == [[0, 1, 2, 3, 4], [5]]
    # foreach temporaries beyond the plan's headroom keep chunks apart
    assert merge_chunks(ops, sids, [], frozenset(), [4] * 6, [8] * 6) == [
        [0, 1, 2], [3, 4, 5]]
    assert merge_chunks(ops, sids, [], frozenset(), [0] * 6, [0] * 6) == [[0, 1, 2, 3, 4, 5]]
