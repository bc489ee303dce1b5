"""ImageNet-style folders: root/<split>/<class name>/<image>.png|jpg|jpeg.

Images are converted to RGB, resized so the shorter side is round(image_size * 256 / 224) and
centre-cropped to image_size x image_size: the usual ImageNet evaluation transform.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from rmc.checks import check_positive
from rmc.data.base import ImageDataset
from rmc.errors import RMCError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EXTENSIONS = {".png", ".jpg", ".jpeg"}
_SPLIT_DIRS = {"train": ("train",), "test": ("test", "val")}
LAYOUT = "expected <data-dir>/<split>/<class name>/<image>.png|jpg|jpeg"


def _class_dirs(folder: Path) -> list[Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def _split_dir(root: Path, split: str) -> Path:
    for name in _SPLIT_DIRS[split]:
        if (root / name).is_dir():
            return root / name
    tried = " or ".join(str(root / n) for n in _SPLIT_DIRS[split])
    raise RMCError(f"no {split} folder: {tried} does not exist; {LAYOUT}")


def _resize_crop(img: Image.Image, image_size: int) -> Image.Image:
    """Shorter side to round(size * 256/224) keeping the aspect ratio, then the central square."""
    short = round(image_size * 256 / 224)
    w, h = img.size
    # Same arithmetic as torchvision's Resize(int): the long side is truncated, not rounded.
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return img.crop((left, top, left + image_size, top + image_size))


def _load_image(path: Path, image_size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = _resize_crop(img.convert("RGB"), image_size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise RMCError(f"cannot read image {path} ({type(e).__name__}: {' '.join(str(e).split())}); "
                       "replace or delete the file") from None
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)   # H x W x C -> C x H x W


def load_imagefolder(split: str, root: str | Path | None, image_size: int = 224) -> ImageDataset:
    if split not in _SPLIT_DIRS:
        raise RMCError(f"unknown split {split!r}; use 'train' or 'test'")
    if root is None:
        raise RMCError(f"imagefolder needs --data-dir (rmc run: data.data_dir); {LAYOUT}")
    check_positive(image_size, "image_size", integer=True)
    root = Path(root)
    if not root.is_dir():
        raise RMCError(f"data directory {root} does not exist; {LAYOUT}")
    folder = _split_dir(root, split)
    # Class indices come from train/ when it exists, so a test/ lacking some class folder
    # still gets the same label numbering as the model was trained with.
    index_dir = root / "train" if (root / "train").is_dir() else folder
    classes = [d.name for d in _class_dirs(index_dir)]
    if not classes:
        raise RMCError(f"{index_dir} has no class sub-folders; {LAYOUT}")
    index = {name: i for i, name in enumerate(classes)}
    files: list[tuple[Path, int]] = []
    for d in _class_dirs(folder):
        if d.name not in index:
            raise RMCError(f"class folder {d} has no counterpart in {index_dir}; "
                           "train and test must use the same class folder names")
        files += [(p, index[d.name]) for p in sorted(d.iterdir())
                  if p.is_file() and p.suffix.lower() in EXTENSIONS]
    if not files:
        raise RMCError(f"no .png/.jpg/.jpeg images under {folder}; {LAYOUT}")
    if split == "train":
        have = {label for _, label in files}
        empty = [classes[i] for i in range(len(classes)) if i not in have]
        if empty:   # a class the model could never learn, yet counted in its outputs
            raise RMCError(f"class folder {folder / empty[0]} has no .png/.jpg/.jpeg images"
                           f"{f' (nor {len(empty) - 1} other class folders)' if len(empty) > 1 else ''}; add images "
                           "or remove the folder")
    images = np.empty((len(files), 3, image_size, image_size), dtype=np.uint8)
    for i, (path, _) in enumerate(files):
        images[i] = _load_image(path, image_size)
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    return ImageDataset(torch.from_numpy(images), labels, classes, "imagefolder",
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)
