"""A ResNet of ``BasicBlock`` stages (He et al. 2016) in the CIFAR form, for 32x32
inputs: a 3x3 stem and no max-pool. Pure torch, so that a comparison (the Flower side
of ``benchmarks/vs_flower_models.py``) builds the very same model from this file."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResNet", "BasicBlock"]


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.norm1 = _norm(norm, outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.norm2 = _norm(norm, outputs)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), _norm(norm, outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if kind == "batch" else nn.GroupNorm(min(8, channels), channels)


class ResNet(nn.Module):
    """Stages of ``BasicBlock`` s, ``width`` x 1, 2, 4, 8 channels, each stage after
    the first halving the resolution; global average pooling and a linear head."""

    def __init__(
        self,
        classes: int,
        channels: int = 3,
        width: int = 16,
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        norm: str = "batch",
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(channels, width, 3, 1, 1, bias=False), _norm(norm, width), nn.ReLU()
        )
        stages, inputs = [], width
        for i, count in enumerate(blocks):
            outputs = width * 2**i
            for j in range(count):
                stages.append(BasicBlock(inputs, outputs, 2 if i and not j else 1, norm))
                inputs = outputs
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(inputs, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stages(self.stem(x))
        return self.head(features.mean(dim=(2, 3)))
