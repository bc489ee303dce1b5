"""ImageNet-layout folders read lazily: class numbering as torchvision's ImageFolder, the original's preprocessing,
rows decoded only when indexed, and a D' built from a folder larger than the process's address-space limit."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rmc.data import LazyImages, load_dataset
from rmc.data import imagefolder as imagefolder_mod
from rmc.errors import RMCError

# ImageNet-style class folder names (wnids) and mixed case: torchvision numbers classes by sorted(names), where
# upper case sorts before lower case.
CLASSES = ["n01440764", "n01443537", "Zebra", "apple"]


def _jpeg(path: Path, rng: np.random.Generator, h: int, w: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for split, per in (("train", 5), ("val", 2)):
        for c in CLASSES:
            for i in range(per):
                _jpeg(root / split / c / f"{c}_{i}.JPEG", rng, int(rng.integers(40, 90)), int(rng.integers(40, 90)))
    return root


def test_class_numbering_and_preprocessing_are_torchvision_s(folder):
    lazy = load_dataset("imagefolder", "train", folder, image_size=32, lazy=True)
    assert lazy.classes == sorted(CLASSES) == ["Zebra", "apple", "n01440764", "n01443537"]
    assert lazy.labels.tolist() == [i for i in range(4) for _ in range(5)]
    assert lazy.lazy and isinstance(lazy.images, LazyImages) and lazy.images.shape == (20, 3, 32, 32)
    assert lazy.preprocessing == {"resize_shorter_side": 37, "center_crop": 32, "interpolation": "bilinear",
                                  "color": "RGB"}                        # round(32 * 256 / 224) = 37
    val = load_dataset("imagefolder", "test", folder, image_size=32, lazy=True)   # val/ is the test split
    assert val.labels.tolist() == [i for i in range(4) for _ in range(2)]
    full = load_dataset("imagefolder", "train", folder, image_size=32, lazy=False)
    assert not full.lazy and torch.equal(full.images, lazy.images[:])   # the same pixels either way
    # The original's transform, by hand for one file: shorter side to 37 (bilinear), central 32 x 32.
    path = folder / "train" / "Zebra" / "Zebra_3.JPEG"
    with Image.open(path) as img:
        w, h = img.size
        size = (37, int(37 * h / w)) if w <= h else (int(37 * w / h), 37)
        r = img.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    top, left = int(round((r.size[1] - 32) / 2)), int(round((r.size[0] - 32) / 2))
    want = np.asarray(r.crop((left, top, left + 32, top + 32))).transpose(2, 0, 1)
    assert np.array_equal(lazy.images[3].numpy(), want)
    other = load_dataset("imagefolder", "train", folder, image_size=32, resize=64, lazy=True)
    assert other.preprocessing["resize_shorter_side"] == 64 and not torch.equal(other.images[3], lazy.images[3])
    with pytest.raises(RMCError, match="resize 20 is smaller than the crop 32"):
        load_dataset("imagefolder", "train", folder, image_size=32, resize=20)


def test_lazy_rows_are_decoded_only_when_indexed(folder, monkeypatch):
    ds = load_dataset("imagefolder", "train", folder, image_size=16, lazy=True)
    whole = load_dataset("imagefolder", "train", folder, image_size=16, lazy=False).images
    decoded = []
    real = imagefolder_mod._load_image
    monkeypatch.setattr(imagefolder_mod, "_load_image", lambda p, prep: decoded.append(p.name) or real(p, prep))
    rows = torch.tensor([17, 2, 2, -1, 9])
    assert torch.equal(ds.images[rows], whole[rows]) and len(decoded) == 4          # repeats decoded once
    assert torch.equal(ds.images[4:8], whole[4:8]) and torch.equal(ds.images[np.array([0])], whole[:1])
    assert torch.equal(ds.images[5, 1], whole[5, 1]) and torch.equal(ds.images[[1, 2], 0], whole[[1, 2], 0])
    decoded.clear()
    sub = ds.subset(torch.tensor([3, 12, 19]))                                     # nothing read
    assert decoded == [] and sub.lazy and sub.labels.tolist() == [0, 2, 3]
    assert torch.equal(sub.images[:], whole[[3, 12, 19]]) and len(decoded) == 3
    back = pickle.loads(pickle.dumps(ds.images))                                   # what a Ray worker receives
    assert len(pickle.dumps(ds.images)) < 4000 and torch.equal(back[[6, 1]], whole[[6, 1]])
    with pytest.raises(IndexError):
        ds.images[20]
    with pytest.raises(RMCError, match="read lazily.*cannot be converted whole"):
        ds.float_images()


def test_a_damaged_file_in_a_lazy_folder_is_named_when_read(folder, tmp_path):
    import shutil
    root = tmp_path / "copy"
    shutil.copytree(folder, root)
    bad = root / "train" / "apple" / "apple_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:100])
    ds = load_dataset("imagefolder", "train", root, image_size=16, lazy=True)       # listing reads no pixels
    ds.images[:5]
    with pytest.raises(RMCError, match=r"cannot read image .*apple_1.JPEG.*replace or delete the file"):
        ds.images[5:10]


def test_a_split_larger_than_the_in_memory_limit_is_lazy(folder, monkeypatch):
    assert not load_dataset("imagefolder", "train", folder, image_size=16).lazy   # 20 x 3 x 16 x 16: in memory
    monkeypatch.setattr(imagefolder_mod, "IN_MEMORY_LIMIT", 20 * 3 * 16 * 16 - 1)
    assert load_dataset("imagefolder", "train", folder, image_size=16).lazy


# A D' build in a process whose address space (RLIMIT_AS) is smaller than the decoded training folder.
_LIMITED_BUILD = """
import os, resource, sys
import numpy as np
import torch
from torch import nn
torch.set_num_threads(1)
from rmc.artifacts.dprime import AugmentConfig, build_dprime_store, open_dprime_store
from rmc.data import imagefolder, load_dataset
from rmc.models import ModelInfo

root, out, headroom = sys.argv[1], sys.argv[2], int(sys.argv[3])
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
limit = vm + headroom
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
train = load_dataset("imagefolder", "train", root, image_size=224)
train.images.threads = 2   # each decoding thread reserves a stack: two keep the test's address space small
decoded = train.images.numel()
print("limit", limit, "decoded", decoded, "lazy", train.lazy, flush=True)
reads = []
real = imagefolder.FolderImages._read
imagefolder.FolderImages._read = lambda self, rows: reads.append(len(rows)) or real(self, rows)
torch.manual_seed(0)
model = nn.Sequential(nn.AvgPool2d(28), nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
info = ModelInfo("linear-probe", 10, (3, 224, 224), dataset="imagefolder", sha256="0" * 64)
cfg = AugmentConfig(steps=(1,), eps=8 / 255, step_size=2 / 255, chunk_size=32, batch_size=16, per_class=20)
store = build_dprime_store(model, info, train, out, cfg, progress=False)
s = open_dprime_store(out, verify="full")
print("rows", len(s), "max read", max(reads), "reads", len(reads), flush=True)
assert torch.equal(s.images[:32], train.images[s.source_index[:32].numpy()])
try:
    train.images[:]
    print("whole split decoded", flush=True)
except MemoryError:
    print("whole split does not fit", flush=True)
"""


def test_dprime_builds_from_a_folder_larger_than_the_memory_limit(tmp_path):
    """8,000 training images, 1.2 GB decoded at 224 px, in a process allowed 0.45 GB of address space beyond what it
    has mapped after its imports (about 1.1 GB in all, under the folder's size): the folder is listed, not decoded;
    D' (20 per class, one PGD copy) reads its chunks' rows only; decoding the whole split in that process fails."""
    root = tmp_path / "data"
    rng = np.random.default_rng(1)
    tiny = [Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)) for _ in range(50)]
    for c in range(10):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True)
        for i in range(800):
            tiny[(c * 800 + i) % 50].save(d / f"n{c:08d}_{i}.JPEG", quality=75)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    proc = subprocess.run([sys.executable, "-c", _LIMITED_BUILD, str(root), str(tmp_path / "dprime"),
                           str(450 << 20)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    words = proc.stdout.split()
    value = {k: words[i + 1] for i, k in enumerate(words[:-1]) if k in ("limit", "decoded", "lazy", "rows", "read",
                                                                          "reads")}
    assert value["lazy"] == "True" and int(value["decoded"]) == 8000 * 3 * 224 * 224 > int(value["limit"])
    assert int(value["rows"]) == 400 and int(value["read"]) <= 32 and int(value["reads"]) >= 400 // 32
    assert "whole split does not fit" in proc.stdout
