"""MNIST-family IDX files (Fashion-MNIST, MNIST): gzip or raw, flat or torchvision's `raw/` layout."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from rmc.data.base import ImageDataset
from rmc.errors import RMCError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")   # Debian package dataset-fashion-mnist
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
_PREFIX = {"train": "train", "test": "t10k"}
_IDX_DTYPE = {0x08: np.uint8}


def find_file(root: Path, stem: str, how_to_get: str) -> Path:
    """Locate `<stem>` or `<stem>.gz` in root or root/raw (torchvision's layout)."""
    for folder in (root, root / "raw", root / "MNIST" / "raw", root / "FashionMNIST" / "raw"):
        for name in (stem + ".gz", stem):
            if (folder / name).is_file():
                return folder / name
    raise RMCError(f"missing {stem}(.gz) in {root}; {how_to_get}")


def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """Parse one IDX file (magic: 0, 0, dtype code, number of dims; big-endian sizes; then the data)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise RMCError(f"cannot read {path} ({e}); the file is corrupt: download it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPE or raw[3] != expect_dims:
        raise RMCError(f"{path} is not an IDX file with {expect_dims} dimension(s) of uint8 "
                       "(bad magic number); download it again")
    header = 4 + 4 * expect_dims
    if len(raw) < header:
        raise RMCError(f"{path} is truncated (header incomplete); download it again")
    dims = struct.unpack(">" + "I" * expect_dims, raw[4:header])
    count = int(np.prod(dims))
    if len(raw) - header != count:
        raise RMCError(f"{path} holds {len(raw) - header} data bytes but its header promises {count} "
                       f"(shape {dims}); the file is truncated or corrupt: download it again")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_dataset(root: str | Path, split: str, name: str, classes: list[str], how_to_get: str) -> ImageDataset:
    root = Path(root)
    if not root.is_dir():
        raise RMCError(f"data directory {root} does not exist; {how_to_get}")
    prefix = _PREFIX[split]
    images = read_idx(find_file(root, f"{prefix}-images-idx3-ubyte", how_to_get), 3)
    labels = read_idx(find_file(root, f"{prefix}-labels-idx1-ubyte", how_to_get), 1)
    if len(images) != len(labels):
        raise RMCError(f"{root}: {len(images)} {split} images but {len(labels)} labels; "
                       "the files do not belong together")
    if labels.size and labels.max() >= len(classes):
        raise RMCError(f"{root}: label {labels.max()} out of range for {len(classes)} classes; "
                       "the labels file is corrupt")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return ImageDataset(x, y, classes, name, mean=(0.5,), std=(0.5,))


def load_fashion_mnist(split: str, root: str | Path | None = None) -> ImageDataset:
    how = ("install it with `apt-get install dataset-fashion-mnist`, or download the four "
           "*-ubyte.gz files of Fashion-MNIST into a directory and pass it with --data-dir")
    return load_idx_dataset(root or FASHION_MNIST_DIR, split, "fashion-mnist", FASHION_CLASSES, how)


def load_mnist(split: str, root: str | Path | None = None) -> ImageDataset:
    if root is None:
        raise RMCError("mnist needs --data-dir (rmc run: data.data_dir): a directory with the four MNIST "
                       "*-ubyte(.gz) files")
    how = "download the four MNIST *-ubyte(.gz) files into it (or its raw/ sub-folder)"
    return load_idx_dataset(root, split, "mnist", MNIST_CLASSES, how)
