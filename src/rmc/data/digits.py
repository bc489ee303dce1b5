"""scikit-learn's bundled 8 x 8 handwritten digits (1797 images): a data set for tiny, offline tests."""

from __future__ import annotations

import numpy as np
import torch

from rmc.data.base import ImageDataset
from rmc.errors import RMCError

N_TRAIN = 1500   # fixed split: the first 1500 images train, the remaining 297 test
DIGITS_CLASSES = [str(i) for i in range(10)]


def load_digits(split: str) -> ImageDataset:
    """Pixel values 0..16 become uint8 v * 255 // 16 (exact integers: 0 -> 0, 16 -> 255).

    The split is by position, not a random permutation, so it is identical across numpy/sklearn
    versions; sklearn stores the digits interleaved, so both parts hold all ten classes.
    """
    if split not in ("train", "test"):
        raise RMCError(f"unknown split {split!r}; use 'train' or 'test'")
    from sklearn.datasets import load_digits as sk_load_digits
    bunch = sk_load_digits()
    values = np.rint(bunch.images).astype(np.int64)   # stored as floats holding whole numbers 0..16
    images = (values * 255 // 16).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    part = slice(0, N_TRAIN) if split == "train" else slice(N_TRAIN, None)
    return ImageDataset(torch.from_numpy(images[part].copy()), torch.from_numpy(labels[part].copy()),
                        list(DIGITS_CLASSES), "digits", mean=(0.5,), std=(0.5,))
