"""Small hand-built models with known answers for the tracer tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearReLU(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))  # fc's output is freed inside the block: short-lived


class Stack(nn.Module):
    """x -> blocks[0..n-1] (Linear+ReLU) -> head; forward(x, y) returns the loss."""

    def __init__(self, d: int = 16, n: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(LinearReLU(d, d) for _ in range(n))
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return F.cross_entropy(self.head(x), y)


class ConvBN(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a = ConvBN(c)
        self.b = ConvBN(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)) + x


class TinyResNet(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.stage1 = nn.Sequential(Residual(c), Residual(c))
        self.stage2 = nn.Sequential(Residual(c), Residual(c))
        self.fc = nn.Linear(c, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.stage2(self.stage1(self.stem(x)))
        return F.cross_entropy(self.fc(h.mean((2, 3))), y)
