"""LSTM language model, the recurrent reference workload.

Embedding -> dropout -> multi-layer ``nn.LSTM`` (dropout between layers) -> dropout ->
linear decoder over the vocabulary. Batches are uniform random tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sentinel_hm.workloads._base import Batch, Workload


@dataclass(frozen=True)
class LSTMConfig:
    """Shape of the model and of one batch of ``batch_size`` sequences of ``seq_len`` tokens.

    ``n_layers`` is at least 2 in every preset: ``nn.LSTM`` ignores (and warns about)
    inter-layer dropout with a single layer.
    """

    vocab_size: int
    seq_len: int
    d_embed: int
    d_hidden: int
    n_layers: int
    dropout: float
    batch_size: int


PRESETS: dict[str, LSTMConfig] = {
    "tiny": LSTMConfig(
        vocab_size=128, seq_len=16, d_embed=32, d_hidden=32, n_layers=2, dropout=0.1, batch_size=2
    ),
    "small": LSTMConfig(
        vocab_size=8192,
        seq_len=128,
        d_embed=512,
        d_hidden=512,
        n_layers=2,
        dropout=0.1,
        batch_size=20,
    ),
    "medium": LSTMConfig(
        vocab_size=16384,
        seq_len=256,
        d_embed=768,
        d_hidden=768,
        n_layers=2,
        dropout=0.1,
        batch_size=20,
    ),
    "large": LSTMConfig(
        vocab_size=32768,
        seq_len=256,
        d_embed=1024,
        d_hidden=1024,
        n_layers=3,
        dropout=0.1,
        batch_size=32,
    ),
}


class LSTMLM(nn.Module):
    """Word-level LSTM LM; ``forward(idx, targets)`` returns the next-token loss."""

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_embed)
        self.drop_in = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(
            cfg.d_embed,
            cfg.d_hidden,
            num_layers=cfg.n_layers,
            batch_first=True,
            dropout=cfg.dropout,
        )
        self.drop_out = nn.Dropout(cfg.dropout)
        self.decoder = nn.Linear(cfg.d_hidden, cfg.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.drop_in(self.embed(idx)))
        logits = self.decoder(self.drop_out(hidden))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(size: str, seed: int) -> Workload:
    """Build the ``size`` preset (see `from_config`)."""
    return from_config(PRESETS[size], seed)


def from_config(cfg: LSTMConfig, seed: int) -> Workload:
    """Build the ``size`` preset; parameters come from torch's global RNG (seeded by the caller).

    Batches come from a private generator seeded with ``seed`` so they are reproducible.
    """
    model = LSTMLM(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)

    def make_batch() -> Batch:
        tokens = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return Workload("lstm", model, optimizer, make_batch)
