"""Data loaders, fed files the tests write themselves in the real on-disk formats."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rmc.data import load_dataset
from rmc.data.idx import FASHION_MNIST_DIR
from rmc.errors import RMCError


def raises_one_line(*needles: str):
    """Context manager: an RMCError whose single-line message contains every needle."""
    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(RMCError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            msg = str(self.info.value)
            assert "\n" not in msg, msg
            for needle in needles:
                assert needle in msg, f"{needle!r} not in {msg!r}"
            return handled
    return _Check()


# ---------------------------------------------------------------- IDX (MNIST family)

def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX: two zero bytes, dtype code 0x08 (uint8), number of dims, big-endian sizes, data."""
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def write_idx_set(folder: Path, n_train=5, n_test=3, gz=True, seed=0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = rng.integers(0, 10, n, dtype=np.uint8)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", x), (f"{prefix}-labels-idx1-ubyte", y)):
            data = idx_bytes(arr)
            if gz:
                (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / stem).write_bytes(data)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip(tmp_path, gz):
    written = write_idx_set(tmp_path, gz=gz)
    for split in ("train", "test"):
        ds = load_dataset("mnist", split, tmp_path)
        x, y = written[split]
        assert ds.images.shape == (len(x), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert torch.equal(ds.images[:, 0], torch.from_numpy(x))
        assert torch.equal(ds.labels, torch.from_numpy(y.astype(np.int64)))
        assert ds.classes == [str(i) for i in range(10)] and ds.mean == (0.5,)


def test_idx_fashion_mnist_from_root(tmp_path):
    written = write_idx_set(tmp_path)
    ds = load_dataset("fashion-mnist", "test", tmp_path)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(written["test"][0]))
    assert ds.classes[0] == "T-shirt/top" and ds.num_classes == 10


@pytest.mark.parametrize("sub", ["raw", "MNIST/raw"])
def test_idx_torchvision_raw_layout(tmp_path, sub):
    written = write_idx_set(tmp_path / sub, gz=False)
    ds = load_dataset("mnist", "train", tmp_path)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(written["train"][0]))


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    for split, n in (("train", 60000), ("test", 10000)):
        ds = load_dataset("fashion-mnist", split)
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
        # Fashion-MNIST is balanced: every class has n/10 images.
        assert torch.bincount(ds.labels).tolist() == [n // 10] * 10


def test_idx_truncated(tmp_path):
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with raises_one_line(str(path), "truncated"):
        load_dataset("mnist", "train", tmp_path)


def test_idx_truncated_gzip(tmp_path):
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with raises_one_line(str(path)):
        load_dataset("mnist", "train", tmp_path)


def test_idx_bad_magic(tmp_path):
    write_idx_set(tmp_path, gz=False)
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0d\x01" + path.read_bytes()[4:])   # 0x0d = float32: not supported
    with raises_one_line(str(path), "magic"):
        load_dataset("mnist", "test", tmp_path)


def test_idx_count_mismatch(tmp_path):
    write_idx_set(tmp_path, gz=True)
    labels = np.zeros(4, dtype=np.uint8)   # 5 images, 4 labels
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with raises_one_line("5 train images but 4 labels"):
        load_dataset("mnist", "train", tmp_path)


def test_idx_missing_file(tmp_path):
    write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with raises_one_line("t10k-labels-idx1-ubyte", str(tmp_path)):
        load_dataset("mnist", "test", tmp_path)


# ---------------------------------------------------------------- CIFAR-10 binary

def cifar_records(labels, rng) -> tuple[bytes, np.ndarray]:
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    recs = b"".join(bytes([lab]) + img.tobytes() for lab, img in zip(labels, images, strict=True))
    return recs, images


def write_cifar(folder: Path, per_batch=2, seed=0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    parts = {"train": [], "test": []}
    for split, names in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)]), ("test", ["test_batch.bin"])):
        for name in names:
            labels = rng.integers(0, 10, per_batch).tolist()
            data, images = cifar_records(labels, rng)
            (folder / name).write_bytes(data)
            parts[split].append((images, np.array(labels)))
    return {s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v])) for s, v in parts.items()}


@pytest.mark.parametrize("nested", [False, True])
def test_cifar_roundtrip(tmp_path, nested):
    written = write_cifar(tmp_path / "cifar-10-batches-bin" if nested else tmp_path)
    for split, n in (("train", 10), ("test", 2)):
        ds = load_dataset("cifar10", split, tmp_path)
        x, y = written[split]
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert torch.equal(ds.images, torch.from_numpy(x))
        assert torch.equal(ds.labels, torch.from_numpy(y.astype(np.int64)))
        assert ds.classes[0] == "airplane" and ds.mean == (0.4914, 0.4822, 0.4465)


def test_cifar_plane_layout(tmp_path):
    """Bytes 1..1024 are red, 1025..2048 green, 2049..3072 blue, each row-major 32 x 32."""
    write_cifar(tmp_path)
    red = np.arange(1024, dtype=np.uint16).reshape(32, 32) % 256   # varies along rows and columns
    rec = bytes([7]) + red.astype(np.uint8).tobytes() + bytes([200]) * 1024 + bytes([3]) * 1024
    (tmp_path / "test_batch.bin").write_bytes(rec)
    ds = load_dataset("cifar10", "test", tmp_path)
    assert ds.labels.tolist() == [7]
    img = ds.images[0]
    assert torch.equal(img[0], torch.from_numpy(red.astype(np.uint8)))
    assert int(img[0, 0, 1]) == 1 and int(img[0, 1, 0]) == 32   # x then y: row-major
    assert (img[1] == 200).all() and (img[2] == 3).all()


def test_cifar_meta_class_names(tmp_path):
    write_cifar(tmp_path)
    names = [f"c{i}" for i in range(10)]
    (tmp_path / "batches.meta.txt").write_text("\n".join(names) + "\n\n")   # the official file ends in blanks
    assert load_dataset("cifar10", "test", tmp_path).classes == names


def test_cifar_wrong_length(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:-1])
    with raises_one_line(str(path), "3073", "binary version"):
        load_dataset("cifar10", "train", tmp_path)


def test_cifar_bad_label(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "test_batch.bin"
    data, _ = cifar_records([3, 11], np.random.default_rng(1))
    path.write_bytes(data)
    with raises_one_line(str(path), "label 11"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar_missing_file(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_5.bin").unlink()
    with raises_one_line("data_batch_5.bin", "CIFAR-10 binary version"):
        load_dataset("cifar10", "train", tmp_path)
    with raises_one_line("CIFAR-10 binary version"):
        load_dataset("cifar10", "train", tmp_path / "empty-subdir-that-does-not-exist")


def test_cifar_refuses_pickle_version(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    # Content that would run code if unpickled; the loader must not even open it.
    (folder / "data_batch_1").write_bytes(b"cos\nsystem\n(S'false'\ntR.")
    with raises_one_line("python (pickle) version", "binary version"):
        load_dataset("cifar10", "train", tmp_path)


# ---------------------------------------------------------------- imagefolder

def save_image(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def test_imagefolder_classes_sizes_formats(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):   # `val` is accepted for the test split
        save_image(tmp_path / split / "zebra" / "a.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
        save_image(tmp_path / split / "ant" / "b.jpg", rng.integers(0, 256, (30, 20, 3), dtype=np.uint8))
        save_image(tmp_path / split / "ant" / "c.JPEG", rng.integers(0, 256, (16, 16), dtype=np.uint8))  # grey
        (tmp_path / split / "ant" / "notes.txt").write_text("not an image")
    for split in ("train", "test"):
        ds = load_dataset("imagefolder", split, tmp_path, image_size=24)
        assert ds.classes == ["ant", "zebra"]
        assert ds.images.shape == (3, 3, 24, 24) and ds.images.dtype == torch.uint8
        assert ds.labels.tolist() == [0, 0, 1]
        assert ds.mean == (0.485, 0.456, 0.406) and ds.std == (0.229, 0.224, 0.225)


def test_imagefolder_centre_crop(tmp_path):
    """A 112 x 224 (H x W) image: shorter side 112 -> 128 (= 112 * 256/224), width -> 256, crop 112 x 112.

    The centre third of the width is white, the rest black; after resize + crop, the kept
    columns are 72..184 of the 256-wide image, so the white band (~85..171) sits in the middle.
    """
    arr = np.zeros((112, 224, 3), dtype=np.uint8)
    arr[:, 75:149] = 255
    arr[:, :, 1] = 0   # make it magenta so RGB channel order is checked too
    save_image(tmp_path / "train" / "only" / "x.png", arr)
    ds = load_dataset("imagefolder", "train", tmp_path, image_size=112)
    img = ds.images[0]
    assert img.shape == (3, 112, 112)
    assert (img[1] == 0).all()                                    # green stays 0
    row = img[0, 56].numpy().astype(int)
    assert (row[:8] == 0).all() and (row[-8:] == 0).all()          # edges: black
    assert (row[20:92] == 255).all()                               # middle: white band ~ 13..99
    assert torch.equal(img[0], img[2])                             # red == blue
    assert torch.equal(img[:, 0], img[:, -1])                      # vertical direction untouched


def test_imagefolder_exact_crop_without_resize(tmp_path):
    # Shorter side already round(7 * 256/224) = 8: no resampling, so the crop is exact.
    arr = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3)
    save_image(tmp_path / "train" / "c" / "x.png", arr)
    ds = load_dataset("imagefolder", "train", tmp_path, image_size=7)
    # torchvision CenterCrop: top = round((8 - 7) / 2) = 0 (banker's rounding), left = round(2.5) = 2.
    expected = torch.from_numpy(arr[0:7, 2:9].transpose(2, 0, 1).copy())
    assert torch.equal(ds.images[0], expected)


def test_imagefolder_corrupt_png(tmp_path):
    save_image(tmp_path / "train" / "a" / "good.png", np.zeros((8, 8, 3), dtype=np.uint8))
    bad = tmp_path / "train" / "a" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with raises_one_line(str(bad)):
        load_dataset("imagefolder", "train", tmp_path, image_size=8)


def test_imagefolder_truncated_jpeg(tmp_path):
    good = tmp_path / "train" / "a" / "x.jpg"
    save_image(good, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    good.write_bytes(good.read_bytes()[:200])
    with raises_one_line(str(good)):
        load_dataset("imagefolder", "train", tmp_path, image_size=8)


def test_imagefolder_missing_and_empty(tmp_path):
    with raises_one_line("does not exist"):
        load_dataset("imagefolder", "train", tmp_path / "nope")
    with raises_one_line(str(tmp_path / "train"), "does not exist"):
        load_dataset("imagefolder", "train", tmp_path)
    (tmp_path / "train").mkdir()
    with raises_one_line("no class sub-folders"):
        load_dataset("imagefolder", "train", tmp_path)
    (tmp_path / "train" / "a").mkdir()
    with raises_one_line("no .png/.jpg/.jpeg images"):
        load_dataset("imagefolder", "train", tmp_path)


def test_imagefolder_test_uses_train_class_numbering(tmp_path):
    img = np.zeros((8, 8, 3), dtype=np.uint8)
    for c in ("a", "b", "c"):
        save_image(tmp_path / "train" / c / "x.png", img)
    save_image(tmp_path / "test" / "c" / "x.png", img)   # test lacks a and b
    assert load_dataset("imagefolder", "test", tmp_path, image_size=8).labels.tolist() == [2]
    save_image(tmp_path / "test" / "d" / "x.png", img)
    with raises_one_line(str(tmp_path / "test" / "d")):
        load_dataset("imagefolder", "test", tmp_path, image_size=8)


# ---------------------------------------------------------------- digits

def test_digits():
    from sklearn.datasets import load_digits as sk
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1500, 1, 8, 8) and test.images.shape == (297, 1, 8, 8)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert set(train.labels.tolist()) == set(range(10)) == set(test.labels.tolist())
    ref = sk()
    assert torch.equal(train.images[:, 0].long(), torch.from_numpy(ref.images[:1500].astype(np.int64) * 255 // 16))
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    assert torch.equal(test.labels, torch.from_numpy(ref.target[1500:].astype(np.int64)))
    assert torch.equal(load_dataset("digits", "train").images, train.images)   # deterministic


# ---------------------------------------------------------------- names and splits

def test_unknown_dataset_name():
    with raises_one_line("unknown dataset 'svhn'", "cifar10"):
        load_dataset("svhn", "train")


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagefolder", "digits"])
def test_bad_split(tmp_path, name):
    with raises_one_line("unknown split 'validation'"):
        load_dataset(name, "validation", tmp_path)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "imagefolder"])
def test_root_required(name):
    with raises_one_line("--data-dir"):
        load_dataset(name, "train")
