"""D' as the algorithm sees it: images, true labels and copy ids (rmc.artifacts.dprime stores it)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rmc.data.arrays import LazyImages


@dataclass
class DPrime:
    """D': uint8 images (N x C x H x W: in memory, memory-mapped, or a store's shards read on demand), true labels,
    and which copy each row is."""
    images: torch.Tensor | np.ndarray | LazyImages
    labels: torch.Tensor
    copy: torch.Tensor                    # 0 = clean, i = i-th adversarial copy
    copy_names: list[str] = field(default_factory=lambda: ["clean"])
    # Content fingerprint of the store it was read from (its manifest, file hashes included); None in memory.
    # Record streams include it, so a D' rebuilt with different bytes never resumes another D''s streams.
    fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, rows: np.ndarray, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels of the given rows (one sorted read: of a store, only the shards holding
        them), on `device` (default: the CPU). Rows travel to a GPU as uint8 from pinned memory (a quarter of
        float32's bytes) and become float there."""
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")
        ascending = rows[order]
        # a memory map is indexed with the array, a tensor (or a store's lazy images) with a tensor
        index = ascending if isinstance(self.images, np.ndarray) else torch.from_numpy(ascending)
        x = torch.as_tensor(self.images[index])[torch.from_numpy(np.argsort(order, kind="stable"))]
        y = self.labels[torch.from_numpy(rows)]
        if device is not None and torch.device(device).type != "cpu":
            if torch.device(device).type == "cuda":
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x, y
