"""The dataset type every loader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rmc.data.arrays import LazyImages
from rmc.errors import RMCError


@dataclass
class ImageDataset:
    """Images as uint8 N x C x H x W (exactly `float() / 255` gives [0, 1]) and int64 labels.

    `images` is a tensor, or a `LazyImages` (a split too large for memory) that reads the rows it is indexed by."""
    images: torch.Tensor | LazyImages
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)
    name: str = ""
    mean: tuple[float, ...] | None = None   # per-channel statistics for the model's Normalize layer
    std: tuple[float, ...] | None = None
    preprocessing: dict[str, Any] | None = None   # how files became images (image folders), recorded in D' manifests

    def __post_init__(self):
        assert self.images.dtype == torch.uint8 and self.images.dim() == 4, "loaders return uint8 N x C x H x W"
        assert self.labels.dtype == torch.int64 and len(self.labels) == len(self.images)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lazy(self) -> bool:
        return isinstance(self.images, LazyImages)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def float_images(self) -> torch.Tensor:
        """Every image as float in [0, 1], in memory (a lazy data set is refused: index it in batches instead)."""
        if isinstance(self.images, LazyImages):
            raise RMCError(f"the {self.name or 'data'} set is read lazily ({len(self)} images, too many for memory) "
                           "and cannot be converted whole; this step needs an in-memory data set (data.lazy: false "
                           "or a per-class subset)")
        return self.images.float().div_(255)

    def subset(self, index) -> "ImageDataset":
        """The rows `index` selects (a lazy data set stays lazy: nothing is read)."""
        images = self.images.take(index) if isinstance(self.images, LazyImages) else self.images[index]
        return ImageDataset(images, self.labels[index], self.classes, self.name, self.mean, self.std,
                            self.preprocessing)


def per_class_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted indices of at most `per_class` examples of each class, chosen by a permutation seeded by `seed` (the same
    choice on every machine; a class with fewer examples is kept whole)."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).numpy()
    y = labels.numpy()[perm]
    # The first `per_class` of each class in permutation order: rank of each position within its class.
    order = np.argsort(y, kind="stable")
    sorted_y = y[order]
    starts = np.searchsorted(sorted_y, sorted_y, side="left")
    rank = np.empty(len(y), dtype=np.int64)
    rank[order] = np.arange(len(y)) - starts
    return torch.from_numpy(np.sort(perm[rank < per_class]).astype(np.int64))
