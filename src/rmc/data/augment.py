"""Training-time augmentation of image batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_shift_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """The usual training-time augmentation: random translation by up to `pad` pixels, random horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)                      # n x h
    cols = dx[:, None] + torch.arange(w)                      # n x w
    if flip:
        mirrored = torch.rand(n, generator=gen) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(-1), cols)
    # One gather over the flattened padded images (the same result as indexing rows and columns separately).
    # The randomness is drawn on the CPU (the generator's device, so results do not depend on the device); the
    # index then goes where the images are.
    idx = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w).to(x.device)
    return padded.reshape(n, c, -1).gather(2, idx).view(n, c, h, w)
