"""CIFAR-10 from the official *binary* version (`cifar-10-binary.tar.gz`).

Each record is 3073 bytes: one label byte (0-9), then 1024 red, 1024 green and 1024 blue bytes,
each plane a 32 x 32 image in row-major order, so a record's pixels are already C x H x W.
The Python ("pickle") version is deliberately not read: unpickling a downloaded file can run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rmc.data.base import ImageDataset
from rmc.errors import RMCError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
SUBDIR = "cifar-10-batches-bin"   # the folder the official tarball unpacks to
RECORD = 1 + 3 * 32 * 32
_FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
HOW_TO_GET = ("download the 'CIFAR-10 binary version' (cifar-10-binary.tar.gz) from "
              "https://www.cs.toronto.edu/~kriz/cifar.html and unpack it there")


def _find_dir(root: Path) -> Path:
    """Accept the unpacked folder itself or the directory holding it."""
    for folder in (root, root / SUBDIR):
        if any((folder / name).is_file() for names in _FILES.values() for name in names):
            return folder
    # The python version has the same batch names without `.bin`; point at the right download.
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file() or (folder / "test_batch").is_file():
            raise RMCError(f"{folder} holds the CIFAR-10 python (pickle) version, which rmc does not read "
                           f"(unpickling can run code); {HOW_TO_GET}")
    return root / SUBDIR if (root / SUBDIR).is_dir() else root


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise RMCError(f"missing CIFAR-10 file {path}; {HOW_TO_GET}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RMCError(f"cannot read {path} ({e}); {HOW_TO_GET}") from None
    if len(raw) == 0 or len(raw) % RECORD:
        raise RMCError(f"{path} has {len(raw)} bytes, not a positive multiple of the {RECORD}-byte CIFAR-10 "
                       f"record; the file is truncated or not the binary version: {HOW_TO_GET}")
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise RMCError(f"{path}: record {bad} has label {labels[bad]}, expected 0-9; the file is corrupt "
                       f"or not CIFAR-10: {HOW_TO_GET}")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _read_classes(folder: Path) -> list[str]:
    meta = folder / "batches.meta.txt"
    if not meta.is_file():
        return list(CIFAR10_CLASSES)
    try:
        names = [line.strip() for line in meta.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise RMCError(f"cannot read {meta} ({e}); delete it or {HOW_TO_GET}") from None
    if len(names) != 10:
        raise RMCError(f"{meta} lists {len(names)} class names, expected 10 (one a line); delete it or {HOW_TO_GET}")
    return names


def load_cifar10(split: str, root: str | Path | None = None) -> ImageDataset:
    if split not in _FILES:
        raise RMCError(f"unknown split {split!r}; use 'train' or 'test'")
    if root is None:
        raise RMCError("cifar10 needs --data-dir (rmc run: data.data_dir): a directory with the CIFAR-10 binary "
                       f"batches; {HOW_TO_GET}")
    root = Path(root)
    if not root.is_dir():
        raise RMCError(f"data directory {root} does not exist; {HOW_TO_GET}")
    folder = _find_dir(root)
    parts = [_read_batch(folder / name) for name in _FILES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                        _read_classes(folder), "cifar10", mean=CIFAR10_MEAN, std=CIFAR10_STD)
