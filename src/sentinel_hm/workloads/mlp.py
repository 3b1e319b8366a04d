"""Multi-layer perceptron classifier, the reference workload simple enough to check by hand.

Structure (float32, B = ``batch_size``)::

    x (B, in_features)
    blocks[0]:   Linear(in_features, hidden) -> ReLU      -> (B, hidden)
    blocks[i]:   Linear(hidden, hidden)      -> ReLU      -> (B, hidden),  i = 1 .. n_layers-1
    head:        Linear(hidden, n_classes)                -> logits (B, n_classes)
    loss:        cross_entropy(logits, y),  y (B,) int64

What autograd saves for backward: each Linear saves its input, each (out-of-place) ReLU saves
its output. Block i's input is block i-1's output, so the distinct saved activations are the
input ``x`` (4 * B * in_features bytes) and one (B, hidden) tensor per block
(4 * B * hidden bytes), which the next block (or the head) also saves; the Linear outputs
before the ReLUs are freed during the forward. The loss additionally saves the log-softmax
(4 * B * n_classes bytes) and the labels. Batches are Gaussian inputs with random labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from sentinel_hm.workloads._base import Batch, Workload


@dataclass(frozen=True)
class MLPConfig:
    """``n_layers`` hidden blocks of width ``hidden``; batches of ``batch_size`` vectors."""

    in_features: int
    hidden: int
    n_layers: int
    n_classes: int
    batch_size: int


PRESETS: dict[str, MLPConfig] = {
    "tiny": MLPConfig(in_features=32, hidden=64, n_layers=3, n_classes=10, batch_size=8),
    "small": MLPConfig(in_features=1024, hidden=2048, n_layers=6, n_classes=10, batch_size=1024),
    "medium": MLPConfig(in_features=1024, hidden=4096, n_layers=6, n_classes=10, batch_size=1024),
    "large": MLPConfig(in_features=1024, hidden=8192, n_layers=6, n_classes=10, batch_size=1024),
}


class Block(nn.Module):
    """Linear followed by ReLU: one hidden layer."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.linear(x))


class MLP(nn.Module):
    """Stack of blocks and a linear head; ``forward(x, y)`` returns the classification loss."""

    def __init__(self, cfg: MLPConfig) -> None:
        super().__init__()
        widths = [cfg.in_features] + [cfg.hidden] * cfg.n_layers
        self.blocks = nn.ModuleList(Block(a, b) for a, b in pairwise(widths))
        self.head = nn.Linear(cfg.hidden, cfg.n_classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(x), y)


def build(size: str, seed: int) -> Workload:
    """Build the ``size`` preset (see `from_config`)."""
    return from_config(PRESETS[size], seed)


def from_config(cfg: MLPConfig, seed: int) -> Workload:
    """Build the ``size`` preset; parameters come from torch's global RNG (seeded by the caller).

    Batches come from a private generator seeded with ``seed`` so they are reproducible.
    """
    model = MLP(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)

    def make_batch() -> Batch:
        x = torch.randn(cfg.batch_size, cfg.in_features, generator=gen)
        return x, torch.randint(cfg.n_classes, (cfg.batch_size,), generator=gen)

    return Workload("mlp", model, optimizer, make_batch)
