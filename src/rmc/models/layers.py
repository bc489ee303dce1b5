"""Shared building blocks: per-channel normalisation inside the model."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std per channel, so that models take images in [0, 1] like every attack library expects.

    `persistent=False` keeps mean and std out of the state dict: architectures whose weights come from elsewhere
    (torchvision, Keras) then load those state dicts as they are, and their checkpoints record the statistics in
    their metadata (rmc.models.checkpoint.ModelInfo.mean / std) instead."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], persistent: bool = True):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=persistent)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=persistent)

    mean: torch.Tensor
    std: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std
