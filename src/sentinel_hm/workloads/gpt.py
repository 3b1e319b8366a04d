"""GPT-style decoder-only language model, the transformer reference workload.

Pre-LayerNorm blocks (causal self-attention, then a 4x GELU MLP) between a token plus
learned position embedding and an untied LM head. Batches are uniform random tokens:
the memory behaviour of a step depends on shapes, not on what the text says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sentinel_hm.workloads._base import Batch, Workload


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model and of one batch of ``batch_size`` sequences of ``seq_len`` tokens."""

    vocab_size: int
    seq_len: int
    d_model: int
    n_layers: int
    n_heads: int
    dropout: float
    batch_size: int


PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(
        vocab_size=128, seq_len=16, d_model=32, n_layers=2, n_heads=2, dropout=0.1, batch_size=2
    ),
    "small": GPTConfig(
        vocab_size=4096, seq_len=256, d_model=256, n_layers=6, n_heads=4, dropout=0.1, batch_size=8
    ),
    "medium": GPTConfig(
        vocab_size=8192, seq_len=512, d_model=384, n_layers=6, n_heads=6, dropout=0.1, batch_size=8
    ),
    "large": GPTConfig(
        vocab_size=16384,
        seq_len=512,
        d_model=768,
        n_layers=8,
        n_heads=12,
        dropout=0.1,
        batch_size=8,
    ),
}


class CausalSelfAttention(nn.Module):
    """Multi-head attention in which each position sees only itself and earlier positions."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # (B, T, 3D) -> three (B, H, T, D/H) tensors, the layout SDPA expects.
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    """Position-wise feed-forward network with the usual 4x hidden expansion."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model)
        self.act = nn.GELU()
        self.out = nn.Linear(4 * cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.out(self.act(self.fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Decoder-only transformer; ``forward(idx, targets)`` returns the next-token loss."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build(size: str, seed: int) -> Workload:
    """Build the ``size`` preset (see `from_config`)."""
    return from_config(PRESETS[size], seed)


def from_config(cfg: GPTConfig, seed: int) -> Workload:
    """Build the ``size`` preset; parameters come from torch's global RNG (seeded by the caller).

    Batches come from a private generator seeded with ``seed``, so the batch sequence does
    not depend on how much global randomness (dropout) the steps consume.
    """
    model = GPT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)

    def make_batch() -> Batch:
        tokens = torch.randint(cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), generator=gen)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    return Workload("gpt", model, optimizer, make_batch)
