"""Hidden features of D' and of evaluation sets, saved with their provenance (RMC step 2).

A feature file is `<name>.npy` (C-contiguous N x d, float32 or, for a large D', float16 if asked) plus the sidecar
`<name>.json`: {model_sha256, layer, source, count, dim, dtype, precision, channels_last, file_sha256, ...}.
`source` names what was embedded: `store:<fingerprint>` for D', `evalset:<name>:<content hash>` for an evaluation
set. `load_features` refuses features computed with another model, layer or source, because a neighbour search
across mismatched feature spaces is silently wrong.

D''s features are streamed to disk batch by batch (`write_features`, resumable) and read back memory-mapped, so a
D' of millions of rows never has its feature matrix in memory (5.1 M x 1024 float32 is 21 GB); evaluation sets are
small and computed in memory (`compute_features`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, cast

import numpy as np
import torch
from torch import nn

import rmc
from rmc.checks import check_positive
from rmc.data.arrays import LazyImages
from rmc.defense.optim import autocast_context, check_precision, resolve_channels_last, resolve_precision
from rmc.errors import RMCError
from rmc.io import check_free_space, read_json, sha256_file, write_json
from rmc.models.checkpoint import ModelInfo
from rmc.models.features import FeatureHook, default_layer
from rmc.schema import Const, Int, Obj, Str, check

FORMAT = "rmc-features/1"
FEATURE_DTYPES = ("float32", "float16")
PRECISIONS = ("auto", "fp32", "bf16")
DERIVED_MARK = ".index-"   # `<stem>.index-<kind>-<settings>.faiss`: an index built from `<stem>.npy`
MAX_ROWS = 1 << 40         # feature rows at most
MAX_DIM = 1 << 31          # feature dimensions at most
# The fields rmc reads back from a sidecar; others (make_provenance's extras) are kept as they are.
SIDECAR = Obj({"format": Const(FORMAT), "model_sha256": Str(max_len=128, empty=False),
               "layer": Str(max_len=300, empty=False), "source": Str(max_len=1000, empty=False),
               "count": Int(0, MAX_ROWS), "dim": Int(1, MAX_DIM), "dtype": Str(FEATURE_DTYPES)},
              {"model_arch": Str(max_len=300), "rmc_version": Str(max_len=100),
               "file_sha256": Str(max_len=64, empty=False), "file_bytes": Int(0)})


def store_source(store) -> str:
    """Source id of an augmented store (changes whenever its settings or contents do)."""
    return f"store:{store.fingerprint}"


def tensor_source(name: str, images: torch.Tensor, labels: torch.Tensor | None = None) -> str:
    """Source id of an in-memory image set: its name plus a hash of its contents."""
    h = hashlib.sha256()
    h.update(f"{tuple(images.shape)}|{images.dtype}".encode())
    h.update(images.detach().cpu().contiguous().numpy().tobytes())
    if labels is not None:
        h.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return f"evalset:{name}:{h.hexdigest()[:16]}"


def evalset_source(eval_set) -> str:
    """Source id of an `rmc.artifacts.evalsets.EvalSet`."""
    return tensor_source(eval_set.name, eval_set.images, eval_set.labels)


@dataclass
class FeatureConfig:
    dtype: str = "float32"             # D' features on disk: float32 | float16 (half the disk; the index searches
                                       # the rounded vectors)
    batch_size: int = 512              # images embedded per forward pass (and written per step)
    precision: str = "auto"            # auto (bf16 autocast on a GPU with native bfloat16, fp32 elsewhere) | fp32
                                       # | bf16
    channels_last: bool | None = None  # channels-last (NHWC) model and inputs; None: on a GPU only

    def __post_init__(self):
        self.validate()

    def validate(self) -> "FeatureConfig":
        if self.dtype not in FEATURE_DTYPES:
            raise RMCError(f"features.dtype must be float32 or float16, got {self.dtype!r}")
        check_positive(self.batch_size, "features.batch_size", integer=True)
        if self.precision not in PRECISIONS:
            raise RMCError(f"features.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.channels_last is not None and not isinstance(self.channels_last, bool):
            raise RMCError(f"features.channels_last must be true, false or null, got {self.channels_last!r}")
        return self


def _check_images(model_info: ModelInfo | None, images: torch.Tensor | LazyImages) -> None:
    if images.dim() != 4:
        raise RMCError(f"images have shape {tuple(images.shape)}; expected N x C x H x W")
    if model_info is not None and tuple(images.shape[1:]) != tuple(model_info.input_shape):
        raise RMCError(f"images are C x H x W = {tuple(images.shape[1:])} but the model takes "
                       f"{tuple(model_info.input_shape)}; use the model trained on this data")
    if not images.dtype == torch.uint8 and not images.is_floating_point():
        raise RMCError(f"images have dtype {images.dtype}; pass uint8 or float images in [0, 1]")


def arithmetic(config: FeatureConfig | None, device: torch.device) -> dict[str, Any]:
    """How features are computed on `device` under `config` (None: fp32, NCHW): recorded in their provenance."""
    if config is None:
        return {"precision": "fp32", "channels_last": False}
    check_precision(config.precision, device)
    return {"precision": resolve_precision(config.precision, device),
            "channels_last": resolve_channels_last(config.channels_last, device)}


@torch.no_grad()
def feature_batches(model: nn.Module, layer: str, images: torch.Tensor | LazyImages, batch_size: int, start: int = 0,
                    how: dict[str, Any] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, float32 CPU features) of each batch of `images[start:]`, checked finite. Each batch travels to
    the model's device on its own (uint8 from pinned memory to a GPU, float there), under `how` (from arithmetic)."""
    device = next(model.parameters()).device
    how = how or {"precision": "fp32", "channels_last": False}
    fmt = torch.channels_last if how["channels_last"] else torch.contiguous_format
    was_training, old_format = model.training, _memory_format(model)
    model.eval()
    if how["channels_last"]:
        cast(Any, model).to(memory_format=torch.channels_last)   # torch's stubs omit Module.to's memory_format
    try:
        with FeatureHook(model, layer) as hook:
            for first in range(start, len(images), batch_size):
                x = torch.as_tensor(images[first:first + batch_size])
                if device.type == "cuda":
                    x = x.pin_memory()
                x = x.to(device, non_blocking=True)
                x = (x.float().div_(255) if x.dtype == torch.uint8 else x.float()).contiguous(memory_format=fmt)
                with autocast_context(how["precision"], device):
                    model(x)
                f = hook.output().float().cpu()
                if not torch.isfinite(f).all():
                    raise RMCError(f"features at layer {layer!r} contain NaN or infinite values; the model weights "
                                   "are broken")
                yield first, f
    finally:
        model.train(was_training)
        if how["channels_last"]:
            cast(Any, model).to(memory_format=old_format)


def _memory_format(model: nn.Module) -> torch.memory_format:
    w = next((p for p in model.parameters() if p.dim() == 4), None)
    return torch.channels_last if w is not None and w.is_contiguous(memory_format=torch.channels_last) \
        and not w.is_contiguous() else torch.contiguous_format


def compute_features(model: nn.Module, model_info: ModelInfo | None, layer: str | None,
                     images: torch.Tensor | LazyImages, batch_size: int = 512, progress: bool = False,
                     desc: str = "features", config: FeatureConfig | None = None) -> torch.Tensor:
    """N x d float32 (contiguous, CPU) features of `images` at `layer` (None: the model's default layer), in memory:
    for evaluation sets and small D' (`write_features` streams a large D' to disk instead).

    `images`: uint8 (e.g. a store's memory-mapped images) or float in [0, 1]. Read batch by batch into one
    preallocated output, so memory is the output plus one batch. The model is used in eval mode.
    """
    layer = layer or default_layer(model)
    _check_images(model_info, images)
    from tqdm.auto import tqdm
    how = arithmetic(config, next(model.parameters()).device)
    out: torch.Tensor | None = None
    n = len(images)
    with tqdm(total=n, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for first, f in feature_batches(model, layer, images, batch_size, how=how):
            if out is None:
                out = torch.empty((n, f.shape[1]), dtype=torch.float32)
            out[first:first + len(f)] = f
            bar.update(len(f))
    if out is None:
        raise RMCError("no images to embed")
    return out


def make_provenance(model_info: ModelInfo, layer: str, source: str, feats: torch.Tensor | np.ndarray,
                    **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "model_sha256": model_info.sha256, "model_arch": model_info.arch, "layer": layer,
            "source": source, "count": int(feats.shape[0]), "dim": int(feats.shape[1]), "dtype": "float32",
            "rmc_version": rmc.__version__, **extra}


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def derived_files(path: str | Path) -> list[Path]:
    """Files made from the features at `path` (its saved indexes and their sidecars, rmc.artifacts.index): removed
    whenever the features are replaced, so that no index outlives the vectors it was built from."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    prefix = f"{path.stem}{DERIVED_MARK}"
    return sorted(f for f in path.parent.iterdir() if f.name.startswith(prefix))


def _check_dtype(dtype: str) -> np.dtype:
    if dtype not in FEATURE_DTYPES:
        raise RMCError(f"feature dtype must be float32 or float16, got {dtype!r}")
    return np.dtype(dtype)


def _publish(tmp: Path, path: Path, prov: dict[str, Any]) -> None:
    """Put the finished file `tmp` in place of `path` with its sidecar. The old sidecar (and anything derived from
    the old features) goes first and the new sidecar comes last, so an interruption leaves features without a
    sidecar (refused by load_features), never features paired with another run's provenance or index."""
    side = sidecar_path(path)
    side.unlink(missing_ok=True)
    for f in derived_files(path):
        f.unlink(missing_ok=True)
    prov = {**prov, "file_sha256": sha256_file(tmp), "file_bytes": tmp.stat().st_size}
    os.replace(tmp, path)
    write_json(side, prov)


def save_features(path: str | Path, feats: torch.Tensor | np.ndarray, provenance: dict[str, Any],
                  dtype: str = "float32") -> Path:
    """Write `path` (.npy, C-contiguous, float32 or float16) and its JSON sidecar; returns the .npy path."""
    path = Path(path)
    if path.suffix != ".npy":
        raise RMCError(f"feature file {path} must end in .npy")
    arr = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    arr = np.ascontiguousarray(arr, dtype=_check_dtype(dtype))
    if arr.ndim != 2:
        raise RMCError(f"features must be N x d, got shape {arr.shape}")
    missing = [k for k in ("model_sha256", "layer", "source") if not provenance.get(k)]
    if missing:
        raise RMCError(f"feature provenance lacks {missing}; build it with make_provenance()")
    prov = {**provenance, "count": int(arr.shape[0]), "dim": int(arr.shape[1]), "dtype": dtype, "format": FORMAT}
    check_free_space(path.parent, arr.nbytes + (1 << 16), f"the features {path.name}")
    tmp = path.with_name(f".{path.name}.saving")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:   # a file object, so numpy does not append ".npy" to the temporary name
            np.save(f, arr)
        _publish(tmp, path, prov)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def partial_paths(path: str | Path) -> tuple[Path, Path]:
    """(the file being written, its progress record) of `write_features` to `path`: hidden names beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial"), path.with_name(f".{path.name}.progress.json")


def write_features(model: nn.Module, model_info: ModelInfo, layer: str | None, images: torch.Tensor | LazyImages,
                   path: str | Path,
                   source: str, config: FeatureConfig | None = None, progress: bool = False,
                   desc: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Embed `images` batch by batch straight into the .npy file at `path` (never the whole matrix in memory), with
    its sidecar; returns the path.

    The rows go to a hidden partial file, the progress record beside it naming what is being computed and the rows
    written so far; an interrupted write resumes from its last recorded batch (the same batches as an uninterrupted
    one, so the same bytes on the same machine) when model, layer, source and settings match, and starts over
    otherwise. The finished file is renamed into place with its sidecar written last. `extra`: more provenance.
    """
    config = config or FeatureConfig()
    path = Path(path)
    layer = layer or default_layer(model)
    _check_images(model_info, images)
    n = len(images)
    if n == 0:
        raise RMCError("no images to embed")
    how = arithmetic(config, next(model.parameters()).device)
    prov = make_provenance(model_info, layer, source, np.empty((n, 0)), **how, **(extra or {}))
    identity = {**{k: prov[k] for k in ("model_sha256", "layer", "source")}, "batch_size": config.batch_size, **how}
    from tqdm.auto import tqdm
    with FeatureWriter(path, n, config.dtype, identity) as out, \
            tqdm(total=n, initial=out.start, unit="img", desc=desc or f"features {path.stem}", disable=not progress,
                 dynamic_ncols=True) as bar:
        for first, f in feature_batches(model, layer, images, config.batch_size, out.start, how):
            out.write(first, f.numpy())
            bar.update(len(f))
    return out.finish(prov)


class FeatureWriter:
    """A .npy feature file of `count` rows written in order, block by block, straight to disk: what `write_features`
    uses, and what writes a synthetic matrix in benchmarks/scale.py.

    `identity` names what is written (blocks must start at multiples of its `batch_size`); `start` is the first row
    still to write: 0, or where an interrupted writer with the same identity, count and dtype stopped. Each block is
    in the page cache before the progress record counts it, so a killed process loses nothing recorded.
    """

    def __init__(self, path: str | Path, count: int, dtype: str, identity: dict[str, Any]):
        self.path = Path(path)
        if self.path.suffix != ".npy":
            raise RMCError(f"feature file {self.path} must end in .npy")
        self.count, self.dtype = count, _check_dtype(dtype)
        self.identity = {**identity, "count": count, "dtype": dtype}
        self.partial, self.record = partial_paths(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.start, self.dim = _resume_point(self.partial, self.record, self.identity)
        self._file: BinaryIO | None = None
        self._offset = 0

    def __enter__(self) -> "FeatureWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def write(self, first: int, block: np.ndarray) -> None:
        """Rows `first : first + len(block)` (an N x d array; converted to the file's dtype)."""
        if block.ndim != 2 or first < 0 or first + len(block) > self.count:
            raise RMCError(f"block of shape {block.shape} at row {first} does not fit {self.count} feature rows")
        if self.dim is None:
            self.dim = block.shape[1]
            _create_npy(self.partial, (self.count, self.dim), self.dtype)
        if self._file is None:
            self._file = open(self.partial, "r+b")   # kept open across writes; close() closes it
            self._offset = _data_offset(self.partial, (self.count, self.dim), self.dtype)
        if block.shape[1] != self.dim:
            raise RMCError(f"{block.shape[1]}-d features written to {self.partial.name}, which holds {self.dim}-d "
                           f"ones; delete {self.partial.name} and {self.record.name}")
        f = self._file
        f.seek(self._offset + first * self.dim * self.dtype.itemsize)
        f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
        f.flush()
        write_json(self.record, {**self.identity, "dim": self.dim, "rows_done": first + len(block)})

    def finish(self, provenance: dict[str, Any]) -> Path:
        """Publish the file (all rows written) with `provenance` as its sidecar; returns the path."""
        self.close()
        done = read_json(self.record, "feature progress record") if self.record.exists() else {}
        if self.dim is None or done.get("rows_done") != self.count:
            raise RMCError(f"{self.partial.name} holds {done.get('rows_done', 0)} of {self.count} rows; "
                           "write the rest before finishing")
        _publish(self.partial, self.path, {**provenance, "count": self.count, "dim": self.dim,
                                           "dtype": str(self.dtype), "format": FORMAT})
        self.record.unlink(missing_ok=True)
        return self.path


def _resume_point(partial: Path, record: Path, identity: dict[str, Any]) -> tuple[int, int | None]:
    """(first row to compute, feature dimension or None) of a write to `partial` described by `identity`."""
    if record.exists() and partial.exists():
        try:
            done = read_json(record, "feature progress record")
        except RMCError:
            done = None
        if isinstance(done, dict) and {k: done.get(k) for k in identity} == identity:
            rows, dim, count = done.get("rows_done"), done.get("dim"), identity["count"]
            if isinstance(rows, int) and isinstance(dim, int) and 0 < rows <= count and dim > 0 \
                    and (rows == count or rows % identity["batch_size"] == 0) \
                    and _data_offset_or_none(partial, (count, dim), np.dtype(identity["dtype"])) is not None:
                return rows, dim
    record.unlink(missing_ok=True)
    partial.unlink(missing_ok=True)
    return 0, None


def _create_npy(path: Path, shape: tuple[int, int], dtype: np.dtype) -> None:
    """A .npy file of `shape`: its header, then (sparse) room for the rows, which are written with write(2) (a full
    disk is then an error on that write, never a fault in a memory map)."""
    need = shape[0] * shape[1] * dtype.itemsize
    check_free_space(path.parent, need + (1 << 16), f"the features {path.name}")
    with open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                                                 "shape": shape})
        f.truncate(f.tell() + need)


def _data_offset_or_none(path: Path, shape: tuple[int, int], dtype: np.dtype) -> int | None:
    """Where the data of the .npy file at `path` starts, if its header says `shape` and `dtype`; else None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            got_shape, fortran, got_dtype = read(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError):
        return None
    size = path.stat().st_size
    want_size = offset + shape[0] * shape[1] * dtype.itemsize
    if tuple(got_shape) != shape or fortran or got_dtype != dtype or size != want_size:
        return None
    return offset


def _data_offset(path: Path, shape: tuple[int, int], dtype: np.dtype) -> int:
    offset = _data_offset_or_none(path, shape, dtype)
    if offset is None:
        raise RMCError(f"{path} is not the {shape[0]} x {shape[1]} {dtype} file being written; delete it")
    return offset


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] if len(s) == 64 else s


def load_features(path: str | Path, expect_model_sha256: str | None = None, expect_layer: str | None = None,
                  expect_source: str | None = None, mmap: bool = False,
                  expect_dtype: str | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(N x d features, float32 or float16 as the sidecar says, and the provenance). Each `expect_*` given must match
    the sidecar, else RMCError.

    `mmap=True` leaves the matrix on disk (read-only pages, copy-on-write for the tensor): the way to read a large D''s
    features, which never need to be in memory whole.
    """
    path = Path(path)
    side = sidecar_path(path)
    if not path.exists():
        raise RMCError(f"feature file not found: {path}; compute it with `rmc features`")
    if not side.exists():
        raise RMCError(f"{path} has no provenance sidecar {side.name} (an interrupted save?); re-run `rmc features`")
    prov = read_json(side, "feature provenance")
    if not isinstance(prov, dict) or prov.get("format") != FORMAT:
        raise RMCError(f"{side} is not an rmc feature sidecar ({FORMAT}); re-run `rmc features`")
    check(prov, SIDECAR, side, "re-run `rmc features`")
    checks = (("model", "model_sha256", expect_model_sha256), ("layer", "layer", expect_layer),
              ("source", "source", expect_source), ("dtype", "dtype", expect_dtype))
    wrong = [(what, prov.get(key), want) for what, key, want in checks if want is not None and prov.get(key) != want]
    if wrong:
        have = " / ".join(f"{w} {_short(h)}" for w, h, _ in wrong)
        want = " / ".join(f"{w} {_short(x)}" for w, _, x in wrong)
        raise RMCError(f"features {path} were computed with {have} but you are using {want}; "
                       "re-run `rmc features` with this model, layer and store")
    dtype = prov["dtype"]   # one of FEATURE_DTYPES: SIDECAR checked it
    try:
        arr = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RMCError(f"{path} is not a readable .npy file ({e}); re-run `rmc features`") from None
    if arr.dtype != np.dtype(dtype) or arr.ndim != 2 or list(arr.shape) != [prov.get("count"), prov.get("dim")]:
        raise RMCError(f"{path} holds {arr.dtype} {list(arr.shape)} but its sidecar says {dtype} "
                       f"[{prov.get('count')}, {prov.get('dim')}]; re-run `rmc features`")
    if "file_bytes" in prov and path.stat().st_size != prov["file_bytes"]:
        raise RMCError(f"{path} has {path.stat().st_size} bytes but its sidecar says {prov['file_bytes']}; "
                       "re-run `rmc features`")
    return torch.from_numpy(arr), prov


def ensure_features(model: nn.Module, model_info: ModelInfo, layer: str, store, path: str | Path,
                    config: FeatureConfig | None = None) -> np.ndarray:
    """The D' features of `store` at `layer` of the model, cached at `path` and returned memory-mapped: loaded when
    the file there was made with this model, layer, store and dtype, else streamed to disk (replacing it)."""
    config = config or FeatureConfig()
    path = Path(path)
    source = store_source(store)
    expect = dict(expect_model_sha256=model_info.sha256, expect_layer=layer, expect_source=source,
                  expect_dtype=config.dtype)
    if path.exists():
        try:
            return load_features(path, mmap=True, **expect)[0].numpy()
        except RMCError:
            pass   # made with another model / layer / store: recomputed below (the file is replaced atomically)
    write_features(model, model_info, layer, store.images, path, source, config, progress=True)
    return load_features(path, mmap=True, **expect)[0].numpy()


def store_features_path(out_dir: str | Path) -> Path:
    """Where `rmc features` writes the features of D'."""
    return Path(out_dir) / "dprime.npy"


def evalset_features_path(out_dir: str | Path, name: str) -> Path:
    """Where `rmc features` writes the features of one evaluation set."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return Path(out_dir) / "evalsets" / f"{safe}.npy"


__all__ = ["FeatureConfig", "compute_features", "derived_files", "ensure_features", "evalset_features_path",
           "evalset_source", "feature_batches", "load_features", "make_provenance", "save_features",
           "store_features_path", "store_source", "tensor_source", "write_features"]
