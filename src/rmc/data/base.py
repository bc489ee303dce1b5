"""The in-memory dataset type every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ImageDataset:
    """Images as uint8 N x C x H x W (exactly `float() / 255` gives [0, 1]) and int64 labels."""
    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    name: str = ""
    mean: tuple[float, ...] | None = None   # per-channel statistics for the model's Normalize layer
    std: tuple[float, ...] | None = None

    def __post_init__(self):
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, "loaders return uint8 N x C x H x W"
        assert self.labels.dtype == torch.int64 and len(self.labels) == len(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return c, h, w

    def float_images(self) -> torch.Tensor:
        return self.images.float().div_(255)

    def subset(self, index) -> "ImageDataset":
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name, self.mean, self.std)
