"""Data sets as uint8 N x C x H x W tensors and int64 labels, from the standard on-disk formats."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from rmc.data.arrays import LazyImages
from rmc.data.base import ImageDataset, per_class_subset
from rmc.errors import RMCError


class DatasetName(str, Enum):
    FASHION_MNIST = "fashion-mnist"   # embedded default (Debian package dataset-fashion-mnist)
    MNIST = "mnist"
    CIFAR10 = "cifar10"               # official binary version
    IMAGEFOLDER = "imagefolder"       # one sub-folder per class (ImageNet-style)
    DIGITS = "digits"                 # scikit-learn's 8 x 8 digits, for tiny tests


def load_dataset(name: str | DatasetName, split: str = "train", root: str | Path | None = None,
                 image_size: int | None = None, resize: int | None = None, lazy: bool | None = None) -> ImageDataset:
    """Load `split` ("train" or "test") of a data set. `root` is the directory holding it.

    `image_size` (the centre crop), `resize` (the shorter side before it) and `lazy` (decode on demand; None: by
    size) apply to imagefolder only (rmc.data.imagefolder).
    """
    try:
        name = DatasetName(name)
    except ValueError:
        raise RMCError(f"unknown dataset {name!r}; choose one of {[d.value for d in DatasetName]}") from None
    if split not in ("train", "test"):
        raise RMCError(f"unknown split {split!r}; use 'train' or 'test'")
    if name is DatasetName.FASHION_MNIST:
        from rmc.data.idx import load_fashion_mnist
        return load_fashion_mnist(split, root)
    if name is DatasetName.MNIST:
        from rmc.data.idx import load_mnist
        return load_mnist(split, root)
    if name is DatasetName.CIFAR10:
        from rmc.data.cifar10 import load_cifar10
        return load_cifar10(split, root)
    if name is DatasetName.IMAGEFOLDER:
        from rmc.data.imagefolder import load_imagefolder
        return load_imagefolder(split, root, 224 if image_size is None else image_size, resize, lazy)
    from rmc.data.digits import load_digits
    return load_digits(split)


__all__ = ["DatasetName", "ImageDataset", "LazyImages", "load_dataset", "per_class_subset"]
