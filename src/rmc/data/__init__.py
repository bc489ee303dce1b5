"""Data sets as uint8 N x C x H x W tensors and int64 labels, from the standard on-disk formats; the registry of the
data sets the code knows (`DATASETS`: how to load each, its class names, whether a flip keeps its classes)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rmc.data.arrays import LazyImages
from rmc.data.base import ImageDataset, per_class_subset
from rmc.data.cifar10 import CIFAR10_CLASSES
from rmc.data.digits import DIGITS_CLASSES
from rmc.data.idx import FASHION_CLASSES, MNIST_CLASSES
from rmc.errors import RMCError
from rmc.interface import Registry

DEFAULT_DATASET = "fashion-mnist"   # embedded on these machines (Debian package dataset-fashion-mnist)


@dataclass(frozen=True)
class LoadOptions:
    """How an image folder is read (the other formats have one size and ignore these)."""
    image_size: int | None = None   # the centre crop (None: 224)
    resize: int | None = None       # the shorter side before the crop
    lazy: bool | None = None        # decode on demand (None: by size)


def _fashion_mnist(split: str, root: Path | None, opts: LoadOptions) -> ImageDataset:
    from rmc.data.idx import load_fashion_mnist
    return load_fashion_mnist(split, root)


def _mnist(split: str, root: Path | None, opts: LoadOptions) -> ImageDataset:
    from rmc.data.idx import load_mnist
    return load_mnist(split, root)


def _cifar10(split: str, root: Path | None, opts: LoadOptions) -> ImageDataset:
    from rmc.data.cifar10 import load_cifar10
    return load_cifar10(split, root)


def _imagefolder(split: str, root: Path | None, opts: LoadOptions) -> ImageDataset:
    from rmc.data.imagefolder import load_imagefolder
    return load_imagefolder(split, root, 224 if opts.image_size is None else opts.image_size, opts.resize, opts.lazy)


def _digits(split: str, root: Path | None, opts: LoadOptions) -> ImageDataset:
    from rmc.data.digits import load_digits
    return load_digits(split)


@dataclass(frozen=True)
class DatasetSpec:
    """What the code needs to know of a data set without loading it."""
    name: str
    label: str                                  # as tables and figures name it
    load: Callable[[str, Path | None, LoadOptions], ImageDataset]   # (split, root, options) -> the split
    classes: tuple[str, ...]                    # class names by label; () when read from disk (image folders)
    flips: bool                                 # a horizontal flip keeps the class (not for handwritten digits)


DATASETS: Registry[DatasetSpec] = Registry("dataset", [
    DatasetSpec("fashion-mnist", "Fashion-MNIST", _fashion_mnist, tuple(FASHION_CLASSES), flips=True),
    DatasetSpec("mnist", "MNIST", _mnist, tuple(MNIST_CLASSES), flips=False),
    DatasetSpec("cifar10", "CIFAR-10", _cifar10, tuple(CIFAR10_CLASSES), flips=True),
    DatasetSpec("imagefolder", "image folder", _imagefolder, (), flips=True),
    DatasetSpec("digits", "sklearn digits", _digits, tuple(DIGITS_CLASSES), flips=False),
])


def class_names(dataset: str) -> list[str]:
    """The class names of a registered data set (by label), [] for one unknown or whose names live on disk."""
    return list(DATASETS[dataset].classes) if dataset in DATASETS else []


def load_dataset(name: str, split: str = "train", root: str | Path | None = None, image_size: int | None = None,
                 resize: int | None = None, lazy: bool | None = None) -> ImageDataset:
    """Load `split` ("train" or "test") of a data set. `root` is the directory holding it.

    `image_size` (the centre crop), `resize` (the shorter side before it) and `lazy` (decode on demand; None: by
    size) apply to imagefolder only (rmc.data.imagefolder).
    """
    spec = DATASETS[name]
    if split not in ("train", "test"):
        raise RMCError(f"unknown split {split!r}; use 'train' or 'test'")
    return spec.load(split, None if root is None else Path(root), LoadOptions(image_size, resize, lazy))


__all__ = ["DATASETS", "DEFAULT_DATASET", "DatasetSpec", "ImageDataset", "LazyImages", "LoadOptions", "class_names",
           "load_dataset", "per_class_subset"]
