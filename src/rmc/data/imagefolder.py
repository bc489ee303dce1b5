"""ImageNet-style folders: root/<split>/<class name>/<image>.png|jpg|jpeg (ImageNet's train/<wnid>/*.JPEG,
val/<wnid>/*.JPEG).

Class indices are the positions of the class folders' names in sorted order, as torchvision's ImageFolder numbers
them, so a pretrained network's outputs line up with the labels. Images are converted to RGB, resized so the shorter
side is `Preprocessing.resize` (default round(crop * 256 / 224): 256 for a 224 crop, the original's) and
centre-cropped to crop x crop: the usual ImageNet evaluation transform.

A split whose decoded images exceed `IN_MEMORY_LIMIT` (or a quarter of the memory left to the process) is not
decoded at load: its images are a `FolderImages`,
which decodes the rows asked for, in batches on a thread pool, each time they are asked for (ImageNet's 1.28 M
training images are 193 GB decoded at 224 px). Smaller splits are decoded once into a tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rmc.checks import check_positive
from rmc.data.arrays import LazyImages
from rmc.data.base import ImageDataset
from rmc.errors import RMCError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = {".png", ".jpg", ".jpeg"}   # compared in lower case: ImageNet's .JPEG included
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
LAYOUT = "expected <data-dir>/<split>/<class name>/<image>.png|jpg|jpeg"
IN_MEMORY_LIMIT = 2 << 30    # decoded bytes of a split up to which it may be decoded at load (above: read lazily)
MEMORY_SHARE = 4             # ... and at most this fraction (1/4) of the memory the process may still use
DECODE_THREADS = min(8, os.cpu_count() or 1)   # Pillow decodes and resizes without the GIL: threads scale
BAR_MIN = 512                # reads of at least this many images show a progress bar


@dataclass(frozen=True)
class Preprocessing:
    """How a file becomes a model input; recorded with the data (D' manifests record it)."""
    crop: int = 224              # side of the centre crop: the model's input size (the original: 224)
    resize: int | None = None    # shorter side after resizing, before the crop; None: round(crop * 256 / 224)

    def validate(self) -> "Preprocessing":
        check_positive(self.crop, "image_size (the centre crop)", integer=True)
        if self.resize is not None:
            check_positive(self.resize, "resize (the shorter side before the crop)", integer=True)
            if self.resize < self.crop:
                raise RMCError(f"resize {self.resize} is smaller than the crop {self.crop}: the shorter side must "
                               "be at least the crop; raise data.resize or lower data.image_size")
        return self

    @property
    def shorter_side(self) -> int:
        return round(self.crop * 256 / 224) if self.resize is None else self.resize

    def record(self) -> dict:
        return {"resize_shorter_side": self.shorter_side, "center_crop": self.crop, "interpolation": "bilinear",
                "color": "RGB"}


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _split_dir(root: Path, split: str) -> Path:
    for name in _SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    tried = " or ".join(str(root / n) for n in _SPLIT_DIRS[split])
    raise RMCError(f"no {split} folder: {tried} does not exist; {LAYOUT}")


def _resize_crop(img: Image.Image, prep: Preprocessing) -> Image.Image:
    """Shorter side to `prep.shorter_side` keeping the aspect ratio, then the central square."""
    short, size = prep.shorter_side, prep.crop
    w, h = img.size
    # Same arithmetic as torchvision's Resize(int): the long side is truncated, not rounded.
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _load_image(path: Path, prep: Preprocessing) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = _resize_crop(img.convert("RGB"), prep)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RMCError(f"cannot read image {path} ({type(e).__name__}: {' '.join(str(e).split())}); "
                       "replace or delete the file") from None
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)   # H x W x C -> C x H x W


class FolderImages(LazyImages):
    """The images of one split of an image folder, decoded when indexed (see the module docstring).

    Holds the file list (paths relative to the split's folder, as bytes) and their sizes; pickles as that list, so a
    worker decodes from the folder at the same path (a file system it shares with the driver)."""

    def __init__(self, folder: Path, files: np.ndarray, sizes: np.ndarray, prep: Preprocessing,
                 threads: int = DECODE_THREADS, progress: bool = True):
        super().__init__((len(files), 3, prep.crop, prep.crop))
        self.folder, self.files, self.sizes, self.prep = Path(folder), files, sizes, prep
        self.threads, self.progress = threads, progress

    @property
    def source_path(self) -> str:
        return str(self.folder)

    def path(self, row: int) -> Path:
        return self.folder / os.fsdecode(self.files[row])

    def _read(self, rows: np.ndarray) -> np.ndarray:
        from tqdm.auto import tqdm
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.uint8)

        def decode(i: int) -> None:
            out[i] = _load_image(self.path(int(rows[i])), self.prep)

        with ThreadPoolExecutor(max(1, min(self.threads, len(rows)))) as pool, \
                tqdm(total=len(rows), unit="img", desc=f"decode {self.folder.name}", leave=False,
                     disable=not self.progress or len(rows) < BAR_MIN, dynamic_ncols=True) as bar:
            for _ in pool.map(decode, range(len(rows))):
                bar.update(1)
        return out

    def identity(self) -> str:
        """sha256 of what the images are made from, without decoding them: the preprocessing and every file's
        relative path and size (a D' manifest records it as the training set's hash)."""
        h = hashlib.sha256(json.dumps(self.prep.record(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.files).tobytes())
        h.update(np.ascontiguousarray(self.sizes, dtype=np.int64).tobytes())
        return h.hexdigest()


def _list_split(root: Path, split: str) -> tuple[Path, list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(split folder, class names, relative file paths as bytes, their sizes, their labels)."""
    folder = _split_dir(root, split)
    # Class indices come from train/ when it exists, so a test/ lacking some class folder
    # still gets the same label numbering as the model was trained with.
    index_dir = root / "train" if (root / "train").is_dir() else folder
    classes = [d.name for d in _class_dirs(index_dir)]
    if not classes:
        raise RMCError(f"{index_dir} has no class sub-folders; {LAYOUT}")
    index = {name: i for i, name in enumerate(classes)}
    names: list[bytes] = []
    sizes: list[int] = []
    labels: list[int] = []
    for d in _class_dirs(folder):
        if d.name not in index:
            raise RMCError(f"class folder {d} has no counterpart in {index_dir}; "
                           "train and test must use the same class folder names")
        with os.scandir(d) as it:
            entries = sorted((e for e in it if e.is_file() and Path(e.name).suffix.lower() in EXTENSIONS),
                             key=lambda e: e.name)
        names += [os.fsencode(f"{d.name}/{e.name}") for e in entries]
        sizes += [e.stat().st_size for e in entries]
        labels += [index[d.name]] * len(entries)
    if not names:
        raise RMCError(f"no .png/.jpg/.jpeg images under {folder}; {LAYOUT}")
    if split == "train":
        have = set(labels)
        empty = [classes[i] for i in range(len(classes)) if i not in have]
        if empty:   # a class the model could never learn, yet counted in its outputs
            raise RMCError(f"class folder {folder / empty[0]} has no .png/.jpg/.jpeg images"
                           f"{f' (nor {len(empty) - 1} other class folders)' if len(empty) > 1 else ''}; add images "
                           "or remove the folder")
    return folder, classes, np.array(names, dtype=bytes), np.array(sizes, dtype=np.int64), \
        np.array(labels, dtype=np.int64)


def memory_room() -> int | None:
    """Bytes this process may still allocate: the machine's available memory, and the room left under an address-space
    limit (RLIMIT_AS); None where neither can be read."""
    room = []
    try:
        room.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import resource
        limit = resource.getrlimit(resource.RLIMIT_AS)[0]
        if limit != resource.RLIM_INFINITY:
            with open("/proc/self/status") as f:
                used = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
            room.append(max(0, limit - used))
    except (ImportError, OSError, StopIteration, ValueError):
        pass
    return min(room) if room else None


def decode_at_load(nbytes: int) -> bool:
    """Whether a split of `nbytes` decoded is decoded at load (small) rather than read lazily."""
    room = memory_room()
    return nbytes <= IN_MEMORY_LIMIT and (room is None or nbytes <= room // MEMORY_SHARE)


def load_imagefolder(split: str, root: str | Path | None, image_size: int = 224, resize: int | None = None,
                     lazy: bool | None = None) -> ImageDataset:
    """One split of an image folder. `image_size`: the centre crop; `resize`: the shorter side before it (None:
    round(image_size * 256 / 224)); `lazy`: decode on demand (True), at load (False), or by size (None: lazily
    when the decoded split exceeds IN_MEMORY_LIMIT or a quarter of the memory left to the process)."""
    if split not in _SPLIT_DIRS:
        raise RMCError(f"unknown split {split!r}; use 'train' or 'test'")
    if root is None:
        raise RMCError(f"imagefolder needs --data-dir (rmc run: data.data_dir); {LAYOUT}")
    prep = Preprocessing(image_size, resize).validate()
    root = Path(root)
    if not root.is_dir():
        raise RMCError(f"data directory {root} does not exist; {LAYOUT}")
    folder, classes, files, sizes, labels = _list_split(root, split)
    lazy_images = FolderImages(folder, files, sizes, prep)
    if lazy is None:
        lazy = not decode_at_load(lazy_images.numel())
    images: torch.Tensor | FolderImages = lazy_images if lazy else lazy_images[:]
    return ImageDataset(images, torch.from_numpy(labels), classes, "imagefolder", mean=IMAGENET_MEAN,
                        std=IMAGENET_STD, preprocessing=prep.record())


__all__ = ["FolderImages", "IMAGENET_MEAN", "IMAGENET_STD", "IN_MEMORY_LIMIT", "Preprocessing", "load_imagefolder"]
