"""ResNet-style CNN image classifier, the convolutional reference workload.

A 3x3 conv stem, then stages of BasicBlocks (two 3x3 convs with BatchNorm and a residual
shortcut; every stage after the first halves the resolution), global average pooling and a
linear classifier. ReLUs are in-place, as in torchvision, so in-place ops show up in traces.
Batches are Gaussian noise images with uniform random labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sentinel_hm.workloads._base import Batch, Workload


@dataclass(frozen=True)
class CNNConfig:
    """Channel width per stage, BasicBlocks per stage, and the shape of one batch."""

    widths: tuple[int, ...]
    blocks_per_stage: int
    image_size: int
    in_channels: int
    n_classes: int
    batch_size: int


PRESETS: dict[str, CNNConfig] = {
    "tiny": CNNConfig(
        widths=(8, 16),
        blocks_per_stage=1,
        image_size=16,
        in_channels=3,
        n_classes=10,
        batch_size=4,
    ),
    # small and up are ResNet-18 as adapted to CIFAR-sized inputs.
    "small": CNNConfig(
        widths=(64, 128, 256, 512),
        blocks_per_stage=2,
        image_size=32,
        in_channels=3,
        n_classes=10,
        batch_size=48,
    ),
    "medium": CNNConfig(
        widths=(64, 128, 256, 512),
        blocks_per_stage=2,
        image_size=32,
        in_channels=3,
        n_classes=10,
        batch_size=128,
    ),
    "large": CNNConfig(
        widths=(64, 128, 256, 512),
        blocks_per_stage=2,
        image_size=64,
        in_channels=3,
        n_classes=10,
        batch_size=96,
    ),
}


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (1x1 conv + bn when the shape changes), then relu."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet(nn.Module):
    """Small ResNet; ``forward(images, labels)`` returns the classification loss."""

    def __init__(self, cfg: CNNConfig) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(cfg.widths[0]),
            nn.ReLU(inplace=True),
        )
        stages = []
        in_ch = cfg.widths[0]
        for i, width in enumerate(cfg.widths):
            blocks = [
                BasicBlock(in_ch if j == 0 else width, width, 2 if i > 0 and j == 0 else 1)
                for j in range(cfg.blocks_per_stage)
            ]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cfg.widths[-1], cfg.n_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(images)))
        return F.cross_entropy(self.fc(x.flatten(1)), labels)


def build(size: str, seed: int) -> Workload:
    """Build the ``size`` preset (see `from_config`)."""
    return from_config(PRESETS[size], seed)


def from_config(cfg: CNNConfig, seed: int) -> Workload:
    """Build the ``size`` preset; parameters come from torch's global RNG (seeded by the caller).

    Batches come from a private generator seeded with ``seed`` so they are reproducible.
    """
    model = ResNet(cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.batch_size, cfg.in_channels, cfg.image_size, cfg.image_size)

    def make_batch() -> Batch:
        images = torch.randn(shape, generator=gen)
        return images, torch.randint(cfg.n_classes, (cfg.batch_size,), generator=gen)

    return Workload("cnn", model, optimizer, make_batch)
