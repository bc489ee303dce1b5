"""The augmented dataset D': the clean training set plus one untargeted L-inf PGD copy per configured step count,
every copy labelled with the TRUE label (RMC step 1). PGD attacks the static model's prediction, as the original's
label-free PGD does (`AugmentConfig.label`).

On-disk layout of a finished store `<out>/` (format 2):

    manifest.json      provenance (model hash, data hash, attack settings, seed, counts) and content hashes: of the
                       small arrays, and of every shard (`content.shards`, in shard order)
    shards/<i>.npy     uint8  K x C x H x W: the rows of chunk i (rmc.artifacts.shards); copy-major: rows
                       [c*n, (c+1)*n) of the store are copy c (0 = clean), cut into shards of chunk_size rows
    labels.npy         int64  N   true labels
    copy.npy           int16  N   0 = clean, i = i-th PGD copy
    source_index.npy   int64  N   index of the example in the training set
    progress.json      the chunks finished and their shards' hashes (all of them, in a finished store)

It is built in `<out>.partial/` and renamed to `<out>` when the last shard is written. The work is split into chunks
(`chunk_size` images of one copy), one shard each; each chunk's randomness comes from its own generator seeded by
(seed, copy, chunk index), so chunks can run in any order, on any worker, and a killed build resumes to
byte-identical shards. A shard is written whole under a temporary name and renamed into place; its hash is recorded
in progress.json after that, so a shard on record is always complete, and one that no longer matches its hash (a
damaged file) is rebuilt, alone, by the next build with the same settings (in a finished store too: the rebuilt
shard must reproduce the recorded hash).

`build_dprime_store` is the one driver: `StoreWriter.prepare` -> the pending chunks run by `run_chunk` as tasks of an
executor (in this process, or on Ray's workers: they read the training images from a path they share when the data
set is lazy, and write nothing) -> `writer.write_chunk` here, in the order they finish -> `writer.finalize()`. Either
way the store, its manifest and its resume points are the same, byte for byte.

Stores in format 1 (one preallocated images.npy) are refused with the command that converts them in place
(`rmc migrate-dprime`, rmc.artifacts.migrate).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

import rmc
from rmc.artifacts.provenance import check_model_data
from rmc.artifacts.shards import SHARDS, ShardImages, ShardLayout, write_shard
from rmc.artifacts.verify import matches_hash, remember
from rmc.attacks.gradient import LOSSES, check_attack_settings, pgd
from rmc.checks import check_positive
from rmc.data.arrays import LazyImages
from rmc.data.augment import random_shift_flip
from rmc.data.base import ImageDataset, per_class_subset
from rmc.defense.dprime import DPrime
from rmc.errors import RMCError
from rmc.io import atomic_path, check_free_space, read_json, sha256_file, write_json
from rmc.models.checkpoint import ModelInfo
from rmc.scaleout.executors import cached, executor, get, handle_key, model_device, worker_model
from rmc.schema import SHA256, Bool, Const, Int, ListOf, MapOf, Name, Num, Obj, Opt, Str, TupleOf, check

FORMAT_VERSION = 2
SINGLE_FILE_FORMAT = 1   # one images.npy: converted by `rmc migrate-dprime` (rmc.artifacts.migrate)
KIND = "rmc-augmented-dataset"
STORAGE_DTYPE = "uint8"
FILES = {"labels": "labels.npy", "copy": "copy.npy", "source_index": "source_index.npy"}
DTYPES = {"labels": np.int64, "copy": np.int16, "source_index": np.int64}
MANIFEST = "manifest.json"
ATTACK_LABELS = ("predicted", "true")   # what the PGD copies attack (AugmentConfig.label)
PROGRESS = "progress.json"
# Keys of the manifest that do not describe the requested work (filled in when the store is finished).
_NOT_SETTINGS = ("content", "rmc_version")


@dataclass(frozen=True)
class AugmentConfig:
    """How D' is made. Every field is recorded in the manifest; resuming requires the same values."""
    steps: tuple[int, ...] = (10, 30, 100)   # PGD step count of each adversarial copy (the original: 10, 30, 100)
    eps: float = 0.1                          # L-inf radius in [0, 1] pixel units (original, ImageNet: 16/255)
    step_size: float = 0.01                   # PGD step size in [0, 1] pixel units (original: 0.01)
    random_start: bool = True                 # uniform start in the eps-ball, as the original
    seed: int = 0                             # seeds the random starts and the training subset
    chunk_size: int = 2048                    # images of one copy per unit of work / resume granularity
    batch_size: int = 512                     # PGD batch inside a chunk (changes the random stream, so recorded)
    train_subset: int | None = None           # use only the first n of a seeded permutation of the training set
    label: str = "predicted"                  # what PGD moves away from: predicted (original: the static model's
                                              # prediction) | true (the true label); copies are stored with the true
                                              # label either way
    loss: str = "logits"                      # PGD's loss: logits (cross-entropy on logits) | softmax_output (the
                                              # original: cross-entropy on the softmax output, a double softmax)
    clip: bool = True                         # clip every PGD iterate to [0, 1] (the original does not; stored images
                                              # are clipped either way, as its PNGs)
    crop_shift: int = 0                       # attack a random shift of each image by up to this many pixels
                                              # (zero-padded), stored shifted (the original attacks random 224-px
                                              # crops); 0: none
    per_class: int | None = None              # at most this many training images per class (seeded; before subset)

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))

    def validate(self) -> "AugmentConfig":
        steps = tuple(self.steps)
        if not steps:
            raise RMCError("no PGD copies requested; give at least one step count "
                           "(augment --steps 10 30 100; rmc run: augment.steps)")
        for s in steps:
            check_positive(s, "PGD steps of each copy", integer=True)
        check_attack_settings(self.eps, self.step_size, 1)
        if _levels(self.eps) < 1:
            raise RMCError(f"eps {self.eps:g} is below one 8-bit level (1/255): the perturbation cannot be stored "
                           "in uint8 images; use eps >= 1/255")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RMCError(f"seed must be an integer >= 0, got {self.seed!r}")
        check_positive(self.chunk_size, "chunk size", integer=True)
        check_positive(self.batch_size, "batch size", integer=True)
        if self.train_subset is not None:
            check_positive(self.train_subset, "train subset", integer=True)
        if self.per_class is not None:
            check_positive(self.per_class, "per-class subset (augment.per_class)", integer=True)
        if self.label not in ATTACK_LABELS:
            raise RMCError(f"augment.label must be one of {', '.join(ATTACK_LABELS)}, got {self.label!r}")
        if self.loss not in LOSSES:
            raise RMCError(f"augment.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if not isinstance(self.clip, bool):
            raise RMCError(f"augment.clip must be true or false, got {self.clip!r}")
        check_positive(self.crop_shift, "augment.crop_shift", integer=True, allow_zero=True)
        return self

    @property
    def copy_names(self) -> list[str]:
        return copy_names(self.steps)


def copy_names(steps) -> list[str]:
    """["clean", "pgd10", "pgd30", ...]; a step count used twice gets numbered names (pgd40_1, pgd40_2)."""
    steps = list(steps)
    names = ["clean"]
    for i, s in enumerate(steps):
        if steps.count(s) > 1:
            names.append(f"pgd{s}_{steps[:i + 1].count(s)}")
        else:
            names.append(f"pgd{s}")
    return names


def _levels(eps: float) -> int:
    # Largest whole number of 8-bit levels within eps; the epsilon guards 8/255 * 255 = 7.9999999.
    return int(math.floor(eps * 255 + 1e-6))


def quantize_within_eps(adv: torch.Tensor, clean: torch.Tensor, eps: float) -> torch.Tensor:
    """Round adversarial images (float, [0, 1]) to the nearest 1/255 and re-project onto the eps-ball of the
    clean uint8 images; returns uint8.

    Why: D' is stored as 8-bit images, as the original stored PNGs (4x smaller than float32). Rounding alone can
    move a pixel up to half a level past eps, so the result is clipped again to the whole levels inside eps:
    every stored adversarial example is still a valid eps-bounded perturbation of its clean image.
    """
    r = _levels(eps)
    c = clean.to(adv.device, torch.float32)
    q = torch.round(adv.float() * 255)
    q = torch.maximum(torch.minimum(q, c + r), c - r).clamp_(0, 255)
    return q.to(torch.uint8)


@dataclass(frozen=True)
class ChunkTask:
    """One unit of work: rows [row_start, row_start + stop - start) of the store, made from positions
    [start, stop) of the (subset of the) training set, as copy `copy` with `steps` PGD steps (0 = clean)."""
    index: int        # position in chunk_tasks(); what progress.json records
    copy: int
    chunk: int        # chunk number within its copy
    start: int
    stop: int
    row_start: int
    steps: int
    seed: int         # seed of this chunk's own torch.Generator

    def __len__(self) -> int:
        return self.stop - self.start


def chunk_seed(seed: int, copy: int, chunk: int) -> int:
    """A 63-bit seed that depends only on (seed, copy, chunk): chunks are independent of order and of each other."""
    digest = hashlib.sha256(f"rmc-augment:{seed}:{copy}:{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def chunk_tasks(n: int, config: AugmentConfig) -> list[ChunkTask]:
    """All chunks of a store over `n` training examples, clean copy first."""
    tasks: list[ChunkTask] = []
    for copy, steps in enumerate((0, *config.steps)):
        for chunk, start in enumerate(range(0, n, config.chunk_size)):
            stop = min(start + config.chunk_size, n)
            tasks.append(ChunkTask(len(tasks), copy, chunk, start, stop, copy * n + start, steps,
                                   chunk_seed(config.seed, copy, chunk)))
    return tasks


def run_chunk(model: nn.Module, task: ChunkTask, images: torch.Tensor, labels: torch.Tensor,
              config: AugmentConfig) -> torch.Tensor:
    """The uint8 images of one chunk. `images` (uint8) and `labels` are the chunk's slice of the training set.

    No file I/O and no shared state: a worker holding the static model can run it. The model is used in eval mode
    (batch-norm running statistics untouched) and its parameters are not changed.
    """
    if len(images) != len(task) or len(labels) != len(task):
        raise ValueError(f"chunk {task.index} needs {len(task)} images and labels, got {len(images)}/{len(labels)}")
    if task.steps == 0:
        return images.clone()
    device = next(model.parameters()).device
    # The generator lives on the CPU (pgd draws the random start there), so results do not depend on the device's RNG.
    gen = torch.Generator().manual_seed(task.seed)
    if config.crop_shift:
        # The shift's randomness comes first from the chunk's generator, then PGD's random start. Shifted as uint8:
        # a shift moves whole pixels and pads with zeros, so this is the shift of the float images, exactly.
        images = random_shift_flip(images, gen, pad=config.crop_shift, flip=False)
    out = torch.empty_like(images)
    was_training = model.training
    model.eval()
    try:
        # One PGD batch at a time, start to finish: memory is one batch's floats, not the chunk's (a 2048-image chunk
        # at 224 px is 1.2 GB as float). pgd draws each batch's random start from `gen` in this same order, so the
        # result is the one a single pgd call over the chunk would give.
        for start in range(0, len(images), config.batch_size):
            clean = images[start:start + config.batch_size]
            x = clean.to(device).float().div_(255)
            y = labels[start:start + config.batch_size].to(device) if config.label == "true" else _predictions(model, x)
            adv = pgd(model, x, y, config.eps, config.step_size, task.steps, random_start=config.random_start,
                      generator=gen, batch_size=config.batch_size, loss_fn=LOSSES[config.loss], clip=config.clip)
            out[start:start + len(clean)] = quantize_within_eps(adv, clean, config.eps).cpu()
    finally:
        model.train(was_training)
    return out


@torch.no_grad()
def _predictions(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The static model's predicted classes (what the original's label-free PGD attacks)."""
    return model(x).argmax(1)


# ---------------------------------------------------------------- manifest

def dataset_sha256(data: ImageDataset) -> str:
    """Content hash of a data set (images and labels): the same name with other files is another data set. A lazy
    data set is hashed by what its images are made from (for an image folder: every file's path and size, and the
    preprocessing), never decoded whole."""
    h = hashlib.sha256()
    h.update(json.dumps([list(data.images.shape), str(data.images.dtype)]).encode())
    if isinstance(data.images, LazyImages):
        h.update(data.images.identity().encode())
    else:
        h.update(data.images.contiguous().numpy().tobytes())
    h.update(data.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def select_subset(labels: torch.Tensor, config: AugmentConfig) -> torch.Tensor:
    """Training-set indices used, in data order: all, or at most `per_class` of each class (seeded), then at most
    `train_subset` of those (the first of a seeded permutation). A set no larger than a bound is used whole."""
    index = torch.arange(len(labels), dtype=torch.int64)
    if config.per_class is not None:
        index = per_class_subset(labels, config.per_class, config.seed)
    if config.train_subset is None or config.train_subset >= len(index):
        return index
    perm = torch.randperm(len(index), generator=torch.Generator().manual_seed(config.seed))
    return index[perm[:config.train_subset].sort().values]


def layout_of(manifest: dict) -> ShardLayout:
    """Where a store's rows live, from its manifest (untrusted: a damaged one gets a one-line error)."""
    try:
        names, n, chunk = manifest["copy_names"], manifest["counts"]["clean"], manifest["chunk_size"]
        c, h, w = manifest["shape"][1:]
        layout = ShardLayout(len(names), n, chunk, (c, h, w))
        ok = manifest["total"] == layout.total and manifest["shards"]["count"] == layout.count
    except (KeyError, TypeError, ValueError, IndexError):
        ok = False
    if not ok:
        raise RMCError("the store's manifest has inconsistent counts, shape or shards; it is damaged: delete the "
                       "store and re-run `rmc augment`")
    return layout


def make_manifest(model_info: ModelInfo, train: ImageDataset, n: int, config: AugmentConfig) -> dict[str, Any]:
    names = config.copy_names
    layout = ShardLayout(len(names), n, config.chunk_size, train.input_shape)
    lazy = isinstance(train.images, LazyImages)
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "storage_dtype": STORAGE_DTYPE,
        "rmc_version": rmc.__version__,
        "model": {"sha256": model_info.sha256, "arch": model_info.arch, "num_classes": model_info.num_classes,
                  "input_shape": list(model_info.input_shape), "adversarial": model_info.adversarial,
                  "dataset": model_info.dataset},
        "dataset": {"name": train.name, "split": "train", "size": len(train), "sha256": dataset_sha256(train),
                    "sha256_of": "files and preprocessing" if lazy else "pixels", "classes": list(train.classes),
                    "preprocessing": train.preprocessing},
        "attack": {"method": "pgd", "norm": "linf", "targeted": False, "attack_labels": config.label,
                   "stored_labels": "true",
                   "steps": list(config.steps), "eps": config.eps, "step_size": config.step_size,
                   "random_start": config.random_start, "batch_size": config.batch_size, "loss": config.loss,
                   "clip": config.clip, "crop_shift": config.crop_shift},
        "seed": config.seed,
        "train_subset": config.train_subset,
        "per_class": config.per_class,
        "chunk_size": config.chunk_size,
        "copy_names": names,
        "counts": {name: n for name in names},
        "total": layout.total,
        "shape": [layout.total, *layout.image_shape],
        "layout": "copy-major: rows [i*n, (i+1)*n) hold copy i; copy 0 is clean",
        "shards": shards_section(layout),
        "files": dict(FILES),
    }


def shards_section(layout: ShardLayout) -> dict[str, Any]:
    """The manifest's description of the shards (a record for readers: rmc derives every name from the index)."""
    return {"count": layout.count, "rows": layout.chunk, "first": f"{SHARDS}/{layout.name(0)}",
            "files": f"{SHARDS}/<chunk index, zero-padded>.npy, one per chunk; a copy's last shard may hold fewer rows"}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_differences(existing: dict, requested: dict) -> list[str]:
    """'key: existing X, requested Y' for every setting that differs (content hashes and version ignored)."""
    a = _flat({k: v for k, v in existing.items() if k not in _NOT_SETTINGS})
    b = _flat({k: v for k, v in requested.items() if k not in _NOT_SETTINGS})
    diffs = []
    for key in sorted(set(a) | set(b)):
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
            if key.endswith("sha256"):
                va, vb = str(va)[:12], str(vb)[:12]
            diffs.append(f"{key}: existing {va}, requested {vb}")
    return diffs


def fingerprint_of(manifest: dict) -> str:
    """Hash of the manifest content (which, for a finished store, includes the hashes of its files)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def partial_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:   # a file object, so numpy does not append ".npy" to the temporary name
            np.save(f, arr)


_SIDE = Int(1, 1 << 16)      # an image dimension at most
_ROWS = Int(0, 1 << 40)      # rows of a store at most
# Every field rmc reads back from a manifest (a store's other keys are kept for the record).
MANIFEST_SCHEMA = Obj({
    "storage_dtype": Const(STORAGE_DTYPE),
    "model": Obj({"sha256": Str(max_len=128, empty=False), "num_classes": Int(1, 10 ** 6),
                  "input_shape": ListOf(_SIDE, 3, 3)}, {"arch": Str(max_len=300), "adversarial": Bool(),
                                                        "dataset": Str(max_len=200)}),
    "dataset": Obj({"size": _ROWS}, {"name": Str(max_len=200), "split": Str(max_len=50), "sha256": SHA256,
                                     "classes": ListOf(Str(max_len=200), 0, 10 ** 6)}),
    "attack": Obj({"steps": ListOf(Int(1, 10 ** 6), 1, 1000), "eps": Num(0, 1), "step_size": Num(0, 1),
                   "random_start": Bool(), "batch_size": Int(1, 1 << 30)},
                  {"attack_labels": Str(ATTACK_LABELS), "loss": Str(tuple(LOSSES)), "clip": Bool(),
                   "crop_shift": Int(0, 1 << 16)}),
    "seed": Int(0, 2 ** 63), "train_subset": Opt(Int(1, 1 << 40)), "per_class": Opt(Int(1, 1 << 40)),
    "chunk_size": Int(1, 1 << 30), "copy_names": ListOf(Name(), 2, 1001), "counts": MapOf(Name(), _ROWS, 1001),
    # shape is (rows, C, H, W): the rows are bounded like total (equal to it, checked below), the rest like a side.
    "total": _ROWS, "shape": TupleOf(_ROWS, _SIDE, _SIDE, _SIDE),
    "files": MapOf(Str(tuple(FILES)), Str(tuple(FILES.values()))),
    "shards": Obj({"count": Int(1, 1 << 40)}, {"rows": Int(1, 1 << 30), "first": Str(), "files": Str()})},
    {"content": Obj({}, {**{name: SHA256 for name in FILES}, "shards": ListOf(SHA256, 0, 1 << 40)}),
     "rmc_version": Str(max_len=100)})


def _check_manifest(manifest: Any, where: Path, store: Path | None = None) -> dict:
    """A parsed manifest of this format, every field checked, or a one-line error (a single-file store: the command
    converting it)."""
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND:
        raise RMCError(f"{where} is not an augmented-dataset manifest; point to a directory written by `rmc augment`")
    version = manifest.get("format_version")
    if version == SINGLE_FILE_FORMAT and store is not None:
        raise RMCError(f"the D' store {store} is in the single-file format of an earlier rmc (one images.npy); "
                       f"convert it in place to shards with `rmc migrate-dprime {store}`")
    if version == SINGLE_FILE_FORMAT:
        raise RMCError(f"{where.parent} is an unfinished build in the single-file format of an earlier rmc; it "
                       "cannot be resumed as shards: delete it and re-run `rmc augment`")
    if version != FORMAT_VERSION:
        raise RMCError(f"{where} has format version {version!r}, this rmc reads "
                       f"{FORMAT_VERSION}; rebuild the store with `rmc augment`")
    fix = "the manifest is damaged: delete the store and re-run `rmc augment`"
    check(manifest, MANIFEST_SCHEMA, where, fix)
    names, counts, a = manifest["copy_names"], manifest["counts"], manifest["attack"]
    n = counts.get("clean")
    consistent = (names == copy_names(a["steps"]) and set(counts) == set(names) and len(set(counts.values())) == 1
                  and manifest["total"] == n * len(names) and manifest["shape"][0] == manifest["total"]
                  and manifest["shape"][1:] == manifest["model"]["input_shape"] and manifest["files"] == FILES)
    if not consistent:
        raise RMCError(f"{where}: copy_names, counts, total, shape and files do not agree with each other and the "
                       f"attack's steps; {fix}")
    return manifest


def _refuse_if_different(existing: dict, requested: dict, where: Path) -> None:
    diffs = settings_differences(existing, requested)
    if diffs:
        raise RMCError(f"{where} was built with other settings ({'; '.join(diffs)}); "
                       f"use a new --out or delete {where}")


# ---------------------------------------------------------------- writing

class StoreWriter:
    """Driver side of a build: writes finished chunks as shards and records them.

    Three cases: a new or resumed build in `<out>.partial/` (renamed to `<out>` when complete); a finished store with
    damaged shards (`repair`: those shards are rebuilt in place and must reproduce their recorded hashes, so the
    store's content and fingerprint do not change); a finished, intact store (`complete`: nothing to do)."""

    def __init__(self, out: Path, folder: Path, manifest: dict, subset: torch.Tensor, tasks: list[ChunkTask],
                 done: set[int], hashes: dict[int, str], repair: bool = False):
        self.out, self.folder, self.partial = out, folder, partial_path(out)
        self.manifest, self.subset, self.tasks, self.done = manifest, subset, tasks, done
        self.hashes = hashes   # sha256 of each finished chunk's shard file, as written
        self.layout = layout_of(manifest)
        self.repair = repair

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.tasks) and self.folder == self.out

    def shard_path(self, index: int) -> Path:
        return self.folder / SHARDS / self.layout.name(index)

    def damaged(self, candidates) -> list[int]:
        """The chunks among `candidates` whose shard does not match its recorded hash (a missing, truncated or
        edited file). Re-hashes a shard only when it changed since it last verified."""
        bad = []
        for i in sorted(candidates):
            path = self.shard_path(i)
            if not path.is_file() or path.stat().st_size != self.layout.file_size(i) or \
                    not matches_hash(path, self.hashes.get(i)):
                bad.append(i)
        return bad

    def _save_progress(self) -> None:
        write_json(self.folder / PROGRESS, {"done": sorted(self.done), "total": len(self.tasks),
                                            "hashes": {str(i): self.hashes[i] for i in sorted(self.hashes)}})

    @classmethod
    def prepare(cls, model_info: ModelInfo, train: ImageDataset, out_dir: str | Path,
                config: AugmentConfig) -> "StoreWriter":
        """Create `<out>.partial/`, or re-open it (same settings only), or open a finished `<out>` (its damaged
        shards, if any, to be rebuilt)."""
        config.validate()
        _check_model_and_data(model_info, train)
        out = Path(out_dir)
        partial = partial_path(out)
        subset = select_subset(train.labels, config)
        manifest = make_manifest(model_info, train, len(subset), config)
        tasks = chunk_tasks(len(subset), config)
        if out.exists() and not out.is_dir():
            raise RMCError(f"--out {out} is a file; name a directory")
        if out.exists() and (out / MANIFEST).exists():
            existing = _check_manifest(read_json(out / MANIFEST, "store manifest"), out / MANIFEST, store=out)
            _refuse_if_different(existing, manifest, out)
            return cls._reopen_finished(out, existing, train, subset, tasks)
        if out.exists() and any(out.iterdir()):
            raise RMCError(f"--out {out} exists and is not an augmented dataset; use a new --out or delete it")
        if (partial / MANIFEST).exists():
            existing = _check_manifest(read_json(partial / MANIFEST, "store manifest"), partial / MANIFEST)
            _refuse_if_different(existing, manifest, partial)
            _repair_small_arrays(partial, train, subset, manifest)
            _remove_unfinished_shards(partial / SHARDS)
            done, hashes = _read_progress(partial, len(tasks), with_hashes=True)
            writer = cls(out, partial, existing, subset, tasks, done, hashes)
            bad = writer.damaged(done)
            if bad:
                print(f"note: {partial}: {len(bad)} finished shard(s) do not match their recorded hashes "
                      f"(chunks {bad[:8]}{' ...' if len(bad) > 8 else ''}); rebuilding them", file=sys.stderr)
                writer.done -= set(bad)
                for i in bad:
                    writer.hashes.pop(i, None)
                writer._save_progress()
            return writer
        # Fresh start (or a start killed before its manifest was written: everything is rewritten).
        need = int(np.prod(manifest["shape"])) + manifest["total"] * 18 + (1 << 20)
        check_free_space(partial, need, "the augmented dataset")
        (partial / SHARDS).mkdir(parents=True, exist_ok=True)
        for name, arr in _small_arrays(train, subset, manifest).items():
            _save_npy(partial / FILES[name], arr)
        write_json(partial / MANIFEST, manifest)   # last: its presence marks a usable partial store
        return cls(out, partial, manifest, subset, tasks, set(), {})

    @classmethod
    def _reopen_finished(cls, out: Path, manifest: dict, train: ImageDataset, subset: torch.Tensor,
                         tasks: list[ChunkTask]) -> "StoreWriter":
        content = manifest.get("content")
        shards = content.get("shards") if isinstance(content, dict) else None
        if not isinstance(shards, list) or len(shards) != len(tasks):
            raise RMCError(f"{out / MANIFEST} has no content hashes for its {len(tasks)} shards; the manifest is "
                           "damaged: delete the store and re-run `rmc augment`")
        _repair_small_arrays(out, train, subset, manifest, expect=content)
        writer = cls(out, out, manifest, subset, tasks, {t.index for t in tasks},
                     {i: h for i, h in enumerate(shards) if isinstance(h, str)}, repair=True)
        bad = writer.damaged(writer.done)
        if bad:
            print(f"note: {out}: {len(bad)} shard(s) do not match the manifest (chunks {bad[:8]}"
                  f"{' ...' if len(bad) > 8 else ''}); rebuilding only those", file=sys.stderr)
            writer.done -= set(bad)
        return writer

    def pending(self) -> list[ChunkTask]:
        return [t for t in self.tasks if t.index not in self.done]

    def write_chunk(self, task: ChunkTask, data: torch.Tensor) -> None:
        """Write one chunk's shard (whole, then renamed into place), then record the chunk as finished."""
        if task.index in self.done:
            raise RuntimeError(f"chunk {task.index} is already written")
        expect = (len(task), *self.manifest["shape"][1:])
        if data.dtype != torch.uint8 or tuple(data.shape) != expect:
            raise ValueError(f"chunk {task.index}: expected uint8 {expect}, got {data.dtype} {tuple(data.shape)}")
        path = self.shard_path(task.index)
        digest = write_shard(path, data.numpy(), expect=self.hashes[task.index] if self.repair else None)
        remember(path, digest)
        self.done.add(task.index)
        self.hashes[task.index] = digest
        if not self.repair:
            self._save_progress()

    def finalize(self) -> "DPrimeStore":
        """Hash the small arrays into the manifest (the shards' hashes are known) and rename `<out>.partial` to
        `<out>`; a finished store is opened as it is."""
        missing = len(self.pending())
        if missing:
            raise RuntimeError(f"{missing} chunks are not written yet")
        if self.folder == self.partial:
            content: dict[str, Any] = {name: sha256_file(self.partial / fname) for name, fname in FILES.items()}
            content["shards"] = [self.hashes[t.index] for t in self.tasks]
            self.manifest = {**self.manifest, "content": content}
            write_json(self.partial / MANIFEST, self.manifest)
            if self.out.exists():
                self.out.rmdir()   # an empty directory the user made; anything else was refused in prepare()
            os.replace(self.partial, self.out)
            self.folder = self.out
            for name, fname in FILES.items():   # just hashed: the next open need not hash them again
                remember(self.out / fname, content[name])
            for t in self.tasks:                # the verified-files cache is keyed by path, and the path moved
                remember(self.shard_path(t.index), self.hashes[t.index])
        elif partial_path(self.out).exists():
            print(f"note: {partial_path(self.out)} is left over beside the finished store {self.out} (an earlier "
                  "build); it is not used: delete it", file=sys.stderr)
        return open_dprime_store(self.out)


def _check_model_and_data(info: ModelInfo, train: ImageDataset) -> None:
    check_model_data(info, train, "the training set")
    if not info.sha256:
        raise RMCError("the model has no weights hash (ModelInfo.sha256); load it with load_checkpoint "
                       "or save it with save_checkpoint first")


def _small_arrays(train: ImageDataset, subset: torch.Tensor, manifest: dict) -> dict[str, np.ndarray]:
    """labels, copy and source_index of a store: a function of the training set and the subset alone."""
    n, k = len(subset), len(manifest["copy_names"])
    return {"labels": np.tile(train.labels[subset].numpy().astype(np.int64), k),
            "copy": np.repeat(np.arange(k, dtype=np.int16), n),
            "source_index": np.tile(subset.numpy().astype(np.int64), k)}


def _repair_small_arrays(folder: Path, train: ImageDataset, subset: torch.Tensor, manifest: dict,
                         expect: dict | None = None) -> None:
    """The small arrays of a store are re-derived, never trusted: rewritten where they differ. In a finished store
    (`expect`: its content hashes) the rewritten file must have its recorded hash."""
    for name, want in _small_arrays(train, subset, manifest).items():
        f = folder / FILES[name]
        try:
            ok = np.array_equal(np.load(f, allow_pickle=False), want)
        except (ValueError, OSError, EOFError):
            ok = False
        if ok and expect is not None:
            ok = matches_hash(f, expect.get(name))
        if not ok:
            print(f"note: {f} is missing or damaged; rewriting it", file=sys.stderr)
            _save_npy(f, want)
            if expect is not None and not matches_hash(f, expect.get(name), full=True):
                raise RMCError(f"{f} re-derived from the training set differs from the store's record; the store was "
                               "made from other data: delete it and re-run `rmc augment`")


def _remove_unfinished_shards(folder: Path) -> None:
    """Shards a killed build left under their temporary names (never complete: a shard is renamed when whole)."""
    if folder.is_dir():
        for f in folder.glob(".*.tmp"):
            f.unlink(missing_ok=True)
    else:
        folder.mkdir(parents=True)


def _read_progress(partial: Path, total: int, with_hashes: bool = False):
    """The finished chunks (and, `with_hashes`, their recorded hashes). A damaged progress file on resume means
    nothing is trusted: every chunk is rebuilt."""
    empty: tuple[set[int], dict[int, str]] | set[int] = (set(), {}) if with_hashes else set()
    if not (partial / PROGRESS).exists():
        return empty
    try:
        progress = read_json(partial / PROGRESS, "store progress")
    except RMCError:
        progress = None
    done = progress.get("done") if isinstance(progress, dict) else None
    hashes = progress.get("hashes", {}) if isinstance(progress, dict) else None
    if (not isinstance(done, list) or not all(isinstance(i, int) and 0 <= i < total for i in done)
            or not isinstance(hashes, dict)):
        if not with_hashes:
            raise RMCError(f"{partial / PROGRESS} is damaged; re-run `rmc augment` (its chunks are rebuilt)")
        print(f"note: {partial / PROGRESS} is damaged; rebuilding every chunk", file=sys.stderr)
        return empty
    if not with_hashes:
        return set(done)
    return set(done), {int(k): v for k, v in hashes.items() if str(k).isdigit() and isinstance(v, str)}


def _chunk_inputs(images, labels: np.ndarray, subset: np.ndarray, task: ChunkTask) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's slice of the (subset of the) training set: uint8 images and labels. `images` is a numpy array or
    a LazyImages (read here: only this chunk's rows)."""
    idx = subset[task.start:task.stop]
    x = images[idx]
    return (x if isinstance(x, torch.Tensor) else torch.from_numpy(x)), torch.from_numpy(labels[idx])


def _chunk(inputs: tuple, task: ChunkTask, config: AugmentConfig, fault: Callable[[], None] | None) -> np.ndarray:
    """One chunk's uint8 images, on whichever worker runs it. `inputs` (handles of the model, the training images and
    labels, the subset) come inside a tuple, so Ray passes the references rather than the objects."""
    model_h, *data = inputs
    model = cached("augment-model", handle_key(model_h), lambda: worker_model(model_h))   # once per worker
    images, labels, subset = (get(h) for h in data)
    out = run_chunk(model, task, *_chunk_inputs(images, labels, subset, task), config)
    if fault is not None:
        fault()
    return out.numpy()


def build_dprime_store(model: nn.Module, model_info: ModelInfo, train: ImageDataset, out_dir: str | Path,
                       config: AugmentConfig = AugmentConfig(), progress: bool = True,
                       on_chunk: Callable[[ChunkTask], None] | None = None, ray: str | None = None,
                       workers: int | None = None, fault: Callable[[], None] | None = None) -> "DPrimeStore":
    """Build (or resume, or repair, or find finished) the augmented dataset D' of `train` against `model` in
    `out_dir`.

    `model_info` is the model's checkpoint metadata (its sha256 is recorded). `on_chunk(task)` is called after each
    chunk is safely on disk. Killed at any point, the same call resumes from the last finished chunk; on a finished
    store it rebuilds only shards that no longer match their hashes. `ray` ("local" or a cluster address) runs the
    PGD chunks as Ray tasks, at most `workers` at a time; None runs them here, in order. A lazy training set travels
    to Ray's workers as its file list: they read their chunk's images from the same path. `fault()`, if given, is
    called by each PGD task after its chunk is computed (tests use it to kill a worker mid-task).
    """
    writer = StoreWriter.prepare(model_info, train, out_dir, config)
    if writer.complete:
        return writer.finalize()
    from tqdm.auto import tqdm
    pending = writer.pending()
    names = writer.manifest["copy_names"]
    total = sum(len(t) for t in writer.tasks)
    images = train.images if isinstance(train.images, LazyImages) else train.images.numpy()
    labels, subset = train.labels.numpy(), writer.subset.numpy()

    with tqdm(total=total, initial=total - sum(len(t) for t in pending), unit="img", desc="augment",
              disable=not progress, dynamic_ncols=True) as bar:
        def done(task: ChunkTask, data: torch.Tensor) -> None:
            writer.write_chunk(task, data)
            bar.set_postfix_str(f"{names[task.copy]} chunk {task.chunk}")
            bar.update(len(task))
            if on_chunk is not None:
                on_chunk(task)

        for task in [t for t in pending if t.steps == 0]:   # the clean copy: no attack, nothing to hand out
            done(task, run_chunk(model, task, *_chunk_inputs(images, labels, subset, task), config))
        attacked = deque(t for t in pending if t.steps > 0)
        if attacked:
            with executor(ray, workers, model_device(model)) as ex:   # one worker per GPU for a CUDA model
                inputs = (ex.put_model(model), ex.put(images), ex.put(labels), ex.put(subset))
                by_index = {t.index: t for t in attacked}
                while attacked or len(ex):
                    while attacked and ex.has_room():
                        t = attacked.popleft()
                        ex.submit(t.index, _chunk, inputs, t, config, fault)
                    index, data = ex.next()
                    done(by_index[index], torch.from_numpy(np.array(data)))
    return writer.finalize()


# ---------------------------------------------------------------- reading

class DPrimeStore:
    """A finished D' on disk. `images` is a `ShardImages` (uint8 N x C x H x W, read from the shards on demand: never
    whole); `labels` (int64, true labels), `copy` (int16), `source_index` (int64) are small and loaded."""

    def __init__(self, path: Path, manifest: dict, images: ShardImages, labels: torch.Tensor, copy: torch.Tensor,
                 source_index: torch.Tensor):
        self.path = path
        self.manifest = manifest
        self.fingerprint = fingerprint_of(manifest)
        self.images = images
        self.labels = labels
        self.copy = copy
        self.source_index = source_index
        self.copy_names: list[str] = list(manifest["copy_names"])

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (f"DPrimeStore({str(self.path)!r}, {len(self)} images, copies {self.copy_names}, "
                f"fingerprint {self.fingerprint[:12]})")

    @property
    def model_sha256(self) -> str:
        """Hash of the weights of the model D' was crafted against."""
        return self.manifest["model"]["sha256"]

    @property
    def num_classes(self) -> int:
        """Classes of the model D' was crafted against."""
        return int(self.manifest["model"]["num_classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """C, H, W of D''s images."""
        c, h, w = self.manifest["shape"][1:]
        return int(c), int(h), int(w)

    def dprime(self) -> DPrime:
        """The view the defense takes (images stay on disk, read per gather)."""
        return DPrime(self.images, self.labels, self.copy, self.copy_names, self.fingerprint)

    def copy_rows(self, name: str) -> slice:
        """Rows of one copy (copies are contiguous: copy-major layout)."""
        if name not in self.copy_names:
            raise RMCError(f"store has no copy {name!r}; it has {self.copy_names}")
        n = self.manifest["counts"][name]
        i = self.copy_names.index(name)
        return slice(i * n, (i + 1) * n)

    def float_images(self, index) -> torch.Tensor:
        """Images at `index` as float32 in [0, 1] (reads only those rows)."""
        return self.images[index].float().div_(255)

    def verify(self, full: bool = True) -> None:
        """Check the files against the manifest's content hashes. `full`: re-hash everything (reads the whole store
        once); else a shard is re-hashed only when its size or mtime changed since it last verified (the small
        arrays always are: they cost little)."""
        _verify_content(self.path, self.manifest, full)


def _verify_content(path: Path, manifest: dict, full: bool) -> None:
    content = manifest.get("content")
    if not isinstance(content, dict):
        raise RMCError(f"store {path} has no content hashes in its manifest (an unfinished or damaged store); "
                       "delete it and re-run `rmc augment`")
    for name, fname in FILES.items():
        if not matches_hash(path / fname, content.get(name), full=True):
            raise RMCError(f"{path / fname} does not match its manifest hash; the store was modified or damaged: "
                           "delete it and re-run `rmc augment`")
    layout = layout_of(manifest)
    shards = content.get("shards")
    if not isinstance(shards, list) or len(shards) != layout.count:
        raise RMCError(f"store {path} has no content hashes for its {layout.count} shards; the manifest is damaged: "
                       "delete the store and re-run `rmc augment`")
    from tqdm.auto import tqdm
    for i in tqdm(range(layout.count), desc="verify D'", unit="shard", leave=False,
                  disable=not full or layout.count < 64):
        if not matches_hash(path / SHARDS / layout.name(i), shards[i], full=full):
            raise RMCError(f"{path / SHARDS / layout.name(i)} does not match its manifest hash (a damaged shard); "
                           "re-run `rmc augment` with the same settings: it rebuilds only the damaged shards")


def open_dprime_store(path: str | Path, verify: str = "auto") -> DPrimeStore:
    """Open a finished store read-only (shards read on demand); clear RMCError for missing, partial, damaged or
    single-file (format 1) stores.

    `verify`: "auto" (shapes, dtypes and sizes; hashes of the small arrays; a shard re-hashed only when its size or
    mtime changed since it last verified), "full" (every file re-hashed) or "none" (structure only)."""
    if verify not in ("auto", "full", "none"):
        raise ValueError(f"verify must be auto, full or none, got {verify!r}")
    path = Path(path)
    if not (path / MANIFEST).exists():
        partial = partial_path(path)
        if (partial / MANIFEST).exists():
            m = _check_manifest(read_json(partial / MANIFEST, "store manifest"), partial / MANIFEST)
            total = len(m["copy_names"]) * -(-m["counts"]["clean"] // m["chunk_size"])
            done = len(_read_progress(partial, total)) if total else 0
            raise RMCError(f"store {path} is not finished ({partial} holds {done} of {total} chunks); re-run "
                           "`rmc augment` with the same settings to finish it")
        if path.is_dir():
            raise RMCError(f"{path} has no {MANIFEST}; it is not an augmented dataset (build one with `rmc augment`)")
        raise RMCError(f"augmented dataset not found: {path}; build it with `rmc augment`")
    manifest = _check_manifest(read_json(path / MANIFEST, "store manifest"), path / MANIFEST, store=path)
    layout = layout_of(manifest)
    arrays = {}
    for name, fname in FILES.items():
        f = path / fname
        if not f.exists():
            raise RMCError(f"store {path} is missing {fname}; delete the store and re-run `rmc augment`")
        try:
            arrays[name] = np.load(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise RMCError(f"store {path}: {fname} is not a readable .npy file ({e}); delete the store and re-run "
                           "`rmc augment`") from None
        if arrays[name].dtype != DTYPES[name] or list(arrays[name].shape) != [layout.total]:
            raise RMCError(f"store {path}: {fname} is {arrays[name].dtype} {list(arrays[name].shape)}, expected "
                           f"{np.dtype(DTYPES[name])} [{layout.total}]; delete the store and re-run `rmc augment`")
    for i in range(layout.count):   # structure: every shard present with its size (a stat each, no read)
        f = path / SHARDS / layout.name(i)
        size = f.stat().st_size if f.is_file() else None
        if size != layout.file_size(i):
            raise RMCError(f"store shard {f} is {'missing' if size is None else f'{size} bytes, expected '}"
                           f"{'' if size is None else layout.file_size(i)}; re-run `rmc augment` with the same "
                           "settings to rebuild it")
    if verify != "none":
        _verify_content(path, manifest, verify == "full")
    images = ShardImages(path, layout, manifest_sha256=sha256_file(path / MANIFEST))
    return DPrimeStore(path, manifest, images,
                       *(torch.from_numpy(arrays[k]) for k in ("labels", "copy", "source_index")))


def config_from_manifest(manifest: dict) -> AugmentConfig:
    """The AugmentConfig a store was built with (to rebuild or extend it elsewhere)."""
    a = manifest["attack"]
    return AugmentConfig(steps=tuple(a["steps"]), eps=a["eps"], step_size=a["step_size"],
                         random_start=a["random_start"], seed=manifest["seed"], chunk_size=manifest["chunk_size"],
                         batch_size=a["batch_size"], train_subset=manifest["train_subset"], label=a["attack_labels"],
                         loss=a["loss"], clip=a["clip"], crop_shift=a["crop_shift"], per_class=manifest["per_class"])


__all__ = ["AugmentConfig", "DPrimeStore", "ChunkTask", "StoreWriter", "build_dprime_store", "chunk_seed",
           "chunk_tasks", "config_from_manifest", "copy_names", "fingerprint_of", "open_dprime_store", "partial_path",
           "quantize_within_eps", "run_chunk"]
