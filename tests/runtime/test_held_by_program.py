"""NOTE [Held by the program]: activations the program holds longer than the trace can see."""

from __future__ import annotations

import torch
from torch import nn

import sentinel_hm as sh

from .test_sentinel import assert_same, assert_steady_within_budget

WIDTH, BATCH = 64, 512


class LoggedMLP(nn.Module):
    """Keeps hidden activations in a list for five blocks (to log them, say): the trace sees
    each one's last use by an op, not the list's reference."""

    def __init__(self, log: bool) -> None:
        super().__init__()
        self.log = log
        self.blocks = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(10))
        self.head = nn.Linear(WIDTH, 10)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kept = []
        for i, block in enumerate(self.blocks):
            x = torch.tanh(block(x))
            if self.log:
                kept.append(x)
            if i % 5 == 4:  # logged every fifth block
                kept.clear()
        return nn.functional.cross_entropy(self.head(x), y)


def _train(fast_memory: str | None, steps: int = 8, log: bool = True):
    torch.manual_seed(0)
    model = LoggedMLP(log)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = torch.Generator().manual_seed(1)
    sentinel = (sh.Sentinel(model, optimizer, fast_memory=fast_memory, trials=0)
                if fast_memory else None)
    losses = []
    for i in range(steps):
        if sentinel is not None and i == steps - 1:
            sentinel.audit()
        x = torch.randn(BATCH, WIDTH, generator=data)
        y = torch.randint(0, 10, (BATCH,), generator=data)
        with sentinel.step() if sentinel else torch.enable_grad():
            loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        losses.append(loss.detach())
    return losses, [p.detach().clone() for p in model.parameters()], sentinel


ACTIVATION = BATCH * WIDTH * 4  # bytes of one hidden activation


def test_activations_the_program_holds_are_found_and_the_budget_holds():
    plain_losses, plain_params, _ = _train(None)
    losses, params, sentinel = _train("min")
    assert_same(plain_losses, losses)
    assert_same(plain_params, params)
    # the audited steps saw evicted activations die when the list let go of them, not at
    # their eviction: most of the eight the list keeps past their last use
    held = sentinel.stats()["held_by_program_bytes"]
    assert held % ACTIVATION == 0 and held >= 4 * ACTIVATION
    assert_steady_within_budget(sentinel)
    sentinel.close()
    # without the list, only the loop's variable outlives its last use (by one op): the
    # plan is not made again for that, and bytes still move
    _, _, plain = _train("min", steps=6, log=False)
    assert plain.stats()["bytes_to_slow_per_step"] > 0
    assert_steady_within_budget(plain)
    plain.close()
