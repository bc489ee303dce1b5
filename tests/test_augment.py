"""Training-time augmentation (rmc.data.augment)."""

import torch
import torch.nn.functional as F

from rmc.data.augment import random_shift_flip


def test_augmentation_is_the_documented_shift_and_flip():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    gen = torch.Generator().manual_seed(4)
    out = random_shift_flip(x, gen, pad=2)
    g = torch.Generator().manual_seed(4)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        want = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5]
        assert torch.equal(out[i], want.flip(-1) if flip[i] else want)
