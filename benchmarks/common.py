"""Shared set-up of the benchmarks: the static model, a 240k-image D' and its features, cached under a work folder.

D' is built quickly rather than with PGD (which would take an hour on two cores): the 60,000 Fashion-MNIST training
images plus three copies with seeded uniform noise of up to +-25/255 per pixel (the default run's PGD radius is
0.1 = 25.5/255), labelled with the true label, stored like `rmc augment` stores D' (uint8, copy-major, memory-mapped).
Speed does not depend on how the copies were made; the accuracy comparisons are between the two implementations.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from rmc.cli.config import load_config
from rmc.data import load_dataset
from rmc.defense.core import DPrime, RMCConfig
from rmc.models import extract_features, load_checkpoint, save_checkpoint

DEFAULT_WORKDIR = os.environ.get("RMC_BENCH_DIR", "/tmp/rmc-bench")
PRETRAINED = "/tmp/rmcw/fm_small.safetensors"   # a small_cnn trained 1 epoch, if a previous session left one
NOISE_LEVELS = 25
COPIES = 3                                       # 60k clean + 3 noisy copies = 240k
LAYER = "block3"                                 # small_cnn's feature layer
# The default run's RMC settings and D' size, read from the preset itself so that the figures follow it.
_PRESET = load_config()
DEFAULT_RUN = {f.name: getattr(_PRESET.rmc, f.name) for f in dataclasses.fields(RMCConfig)}
DEFAULT_RUN_DPRIME = _PRESET.augment.train_subset   # training images in the default D' (x clean + 2 copies)


def run_cfg(**changes) -> RMCConfig:
    """The default run's RMC settings with `changes`."""
    return RMCConfig(**{**DEFAULT_RUN, **changes})


def log(msg: str) -> None:
    print(msg, flush=True)


def get_model(workdir: Path):
    """The static model (workdir/model.safetensors): a copy of a previous session's checkpoint if there is one, else
    small_cnn trained for one epoch (~2 minutes here)."""
    path = workdir / "model.safetensors"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        if Path(PRETRAINED).exists():
            model, info = load_checkpoint(PRETRAINED)
        else:
            from rmc.training import TrainConfig, train_model
            log("training the static model (1 epoch of Fashion-MNIST) ...")
            train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
            model, info = train_model(train, test, TrainConfig(epochs=1, batch_size=256), progress=False)
        save_checkpoint(model, info, path)
    model, info = load_checkpoint(path)
    return model.eval(), info


def get_dprime(workdir: Path, model, info, layer: str) -> tuple[np.memmap, np.ndarray, np.ndarray, np.ndarray]:
    """(images uint8 memmap N x 1 x 28 x 28, labels, copy, features N x d) of the 240k D', built once; the features
    are rebuilt when the model (its sha256) or layer is not the one they were made with."""
    workdir.mkdir(parents=True, exist_ok=True)
    f_img, f_lab, f_copy, f_feat = (workdir / n for n in ("images.npy", "labels.npy", "copy.npy", "features.npy"))
    meta_file = workdir / "dprime.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    if meta.get("n") is None:
        t0 = time.perf_counter()
        train = load_dataset("fashion-mnist", "train")
        clean = train.images.numpy()
        n = len(clean)
        images = np.lib.format.open_memmap(f_img, mode="w+", dtype=np.uint8, shape=(n * (COPIES + 1), *clean.shape[1:]))
        images[:n] = clean
        rng = np.random.default_rng(0)
        for c in range(1, COPIES + 1):
            noise = rng.integers(-NOISE_LEVELS, NOISE_LEVELS + 1, size=clean.shape, dtype=np.int16)
            images[c * n:(c + 1) * n] = np.clip(clean.astype(np.int16) + noise, 0, 255).astype(np.uint8)
        images.flush()
        np.save(f_lab, np.tile(train.labels.numpy(), COPIES + 1))
        np.save(f_copy, np.repeat(np.arange(COPIES + 1, dtype=np.int16), n))
        meta = {"n": len(images), "noise_levels": NOISE_LEVELS, "seconds": round(time.perf_counter() - t0, 1)}
        meta_file.write_text(json.dumps(meta))
    if (meta.get("model"), meta.get("layer")) != (info.sha256, layer):
        log(f"building D' features ({meta['n']} images) ...")
        feats = extract_features(model, layer, torch.from_numpy(np.load(f_img, mmap_mode="c")), batch_size=2048)
        np.save(f_feat, feats.numpy())
        meta_file.write_text(json.dumps({**meta, "model": info.sha256, "layer": layer}))
    images = np.load(f_img, mmap_mode="c")
    return images, np.load(f_lab), np.load(f_copy), np.load(f_feat, mmap_mode="c")


def subset_rows(n_train: int, per_copy: int, copies: int) -> np.ndarray:
    """Rows of D' holding the first `per_copy` training images in each of the first `copies` copies (copy-major)."""
    return np.concatenate([np.arange(c * n_train, c * n_train + per_copy) for c in range(copies)])


def make_bank(images: np.ndarray, labels: np.ndarray, copy: np.ndarray) -> DPrime:
    return DPrime(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                  torch.from_numpy(copy.astype(np.int64)))


def test_inputs(n: int, model, layer: str) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The first n Fashion-MNIST test images, labels and static-model features."""
    test = load_dataset("fashion-mnist", "test")
    x, y = test.float_images()[:n], test.labels[:n]
    return x, y, extract_features(model, layer, x).numpy()


def peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
