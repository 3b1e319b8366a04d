"""Workloads for the GPU tests whose CUDA forward and backward are deterministic.

The reference workloads use ops whose CUDA backward has no deterministic kernel
(``AdaptiveAvgPool2d``) or reduces with atomics in some versions (embedding
backward, ``nll_loss``), so a bitwise comparison with them could fail for reasons
that are not Sentinel's. These models use only matrix products (deterministic
with ``CUBLAS_WORKSPACE_CONFIG=:4096:8``), convolutions (deterministic cuDNN
algorithms under ``torch.use_deterministic_algorithms(True)``), batch and layer
norms, elementwise ops, softmax, dropout (Philox: the same masks for the same
seed and call order) and plain reductions. The loss is cross-entropy against
one-hot targets made on the CPU: no gather, scatter or index op on the GPU.
Sized so that all-fast peaks are at least 1 GiB (see ``GPT`` and ``CNN``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from sentinel_hm.workloads import Workload
from sentinel_hm.workloads.cnn import BasicBlock


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability targets, without ``nll_loss``."""
    return -(targets * logits.float().log_softmax(-1)).sum(-1).mean()


class Attention(nn.Module):
    """Causal self-attention written out (no fused kernel: every op here is deterministic)."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        weights = self.drop(scores.masked_fill(mask, float("-inf")).softmax(-1))
        return self.drop(self.proj((weights @ v).transpose(1, 2).reshape(b, t, d)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask)
        return x + self.mlp(self.ln2(x))


class DenseGPT(nn.Module):
    """A GPT whose inputs are feature vectors (a linear projection instead of an embedding
    table) and whose targets are one-hot: the transformer's memory behaviour without the
    embedding's scatter in backward."""

    def __init__(self, features: int, seq: int, d: int, layers: int, heads: int,
                 classes: int, dropout: float) -> None:
        super().__init__()
        self.inp = nn.Linear(features, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)
        self.register_buffer("mask", torch.ones(seq, seq).triu(1).bool(), persistent=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        h = self.drop(self.inp(x) + self.pos)
        for block in self.blocks:
            h = block(h, self.mask)
        return soft_cross_entropy(self.head(self.ln_f(h)), targets)


class MeanPoolResNet(nn.Module):
    """The reference CNN's residual blocks, with a mean over the image instead of
    ``AdaptiveAvgPool2d`` (whose CUDA backward has no deterministic kernel)."""

    def __init__(self, widths: tuple[int, ...], classes: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, ch = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(ch, w, 2 if i else 1), BasicBlock(w, w, 1)]
            ch = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(ch, classes)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return soft_cross_entropy(self.fc(self.blocks(self.stem(images)).mean((2, 3))), targets)


# Sizes: all-fast peaks of at least 1 GiB (GPT about 1.6 GiB, CNN about 1.4 GiB, traced on
# the CPU), so that the fixed overheads of CUDA (cuBLAS workspaces, the allocator's rounding,
# tens of MiB) no longer dominate a budget; steps stay short on an H100/H200 (tens of ms).
GPT = dict(batch=8, seq=512, features=64, d=256, layers=6, heads=8, classes=256)
CNN = dict(batch=160, image=64, widths=(32, 64, 128), classes=10)


def make(name: str, dropout: float = 0.1, device: str = "cuda") -> Workload:
    """``gpt`` or ``cnn`` on ``device`` (the current GPU); parameters from seed 0, batches from
    a private CPU generator (the same sequence in every run), copied to the device."""
    torch.manual_seed(0)  # seeds the GPU's generator too: dropout draws the same masks
    gen = torch.Generator().manual_seed(0)
    if name == "gpt":
        g = GPT
        batch, seq, features, classes = g["batch"], g["seq"], g["features"], g["classes"]
        model: nn.Module = DenseGPT(features, seq, d=g["d"], layers=g["layers"],
                                    heads=g["heads"], classes=classes, dropout=dropout)
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def cpu_batch() -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.randn(batch, seq, features, generator=gen)
            labels = torch.randint(classes, (batch, seq), generator=gen)
            return x, F.one_hot(labels, classes).float()
    elif name == "cnn":
        c = CNN
        batch, image, classes = c["batch"], c["image"], c["classes"]
        model = MeanPoolResNet(c["widths"], classes)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def cpu_batch() -> tuple[torch.Tensor, torch.Tensor]:
            images = torch.randn(batch, 3, image, image, generator=gen)
            labels = torch.randint(classes, (batch,), generator=gen)
            return images, F.one_hot(labels, classes).float()
    else:
        raise ValueError(f"unknown test workload {name!r}: use 'gpt' or 'cnn'")
    model.to(device)  # parameters keep their identity: the optimizer still holds them

    def make_batch() -> tuple[torch.Tensor, ...]:
        return tuple(t.to(device) for t in cpu_batch())

    return Workload(name, model, optimizer, make_batch)
