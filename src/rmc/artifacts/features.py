"""Hidden features of D' and of evaluation sets, saved with their provenance (RMC step 2).

A feature file is `<name>.npy` (float32, C-contiguous N x d: what FAISS indexes without a copy) plus the sidecar
`<name>.json`: {model_sha256, layer, source, count, dim, ...}. `source` names what was embedded: `store:<fingerprint>`
for D', `evalset:<name>:<content hash>` for an evaluation set. `load_features` refuses features computed with
another model, layer or source, because a neighbour search across mismatched feature spaces is silently wrong.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import rmc
from rmc.data.arrays import LazyImages
from rmc.errors import RMCError
from rmc.io import atomic_path, check_free_space, read_json, write_json
from rmc.models.checkpoint import ModelInfo
from rmc.models.features import FeatureHook, default_layer
from rmc.schema import Const, Int, Obj, Str, check

FORMAT = "rmc-features/1"
MAX_ROWS = 1 << 40         # feature rows at most
MAX_DIM = 1 << 31          # feature dimensions at most
# The fields rmc reads back from a sidecar; others (make_provenance's extras) are kept as they are.
SIDECAR = Obj({"format": Const(FORMAT), "model_sha256": Str(max_len=128, empty=False),
               "layer": Str(max_len=300, empty=False), "source": Str(max_len=1000, empty=False),
               "count": Int(0, MAX_ROWS), "dim": Int(1, MAX_DIM), "dtype": Const("float32")},
              {"model_arch": Str(max_len=300), "rmc_version": Str(max_len=100)})


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


@torch.no_grad()
def compute_features(model: nn.Module, model_info: ModelInfo | None, layer: str | None,
                     images: torch.Tensor | LazyImages, batch_size: int = 512, progress: bool = False,
                     desc: str = "features") -> torch.Tensor:
    """N x d float32 (contiguous, CPU) features of `images` at `layer` (None: the model's default layer).

    `images`: uint8 (e.g. a store's images, read from its shards) or float in [0, 1]. Read batch by batch into one
    preallocated output, so memory is the output plus one batch. The model is used in eval mode.
    """
    layer = layer or default_layer(model)
    if images.dim() != 4:
        raise RMCError(f"images have shape {tuple(images.shape)}; expected N x C x H x W")
    if model_info is not None and tuple(images.shape[1:]) != tuple(model_info.input_shape):
        raise RMCError(f"images are C x H x W = {tuple(images.shape[1:])} but the model takes "
                       f"{tuple(model_info.input_shape)}; use the model trained on this data")
    if not images.dtype == torch.uint8 and not images.is_floating_point():
        raise RMCError(f"images have dtype {images.dtype}; pass uint8 or float images in [0, 1]")
    from tqdm.auto import tqdm
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: torch.Tensor | None = None
    n = len(images)
    try:
        with FeatureHook(model, layer) as hook, tqdm(total=n, unit="img", desc=desc, disable=not progress,
                                                      dynamic_ncols=True) as bar:
            for start in range(0, n, batch_size):
                x = images[start:start + batch_size]
                x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
                model(x.to(device))
                f = hook.output().float().cpu()
                if out is None:
                    out = torch.empty((n, f.shape[1]), dtype=torch.float32)
                out[start:start + len(f)] = f
                bar.update(len(f))
    finally:
        model.train(was_training)
    if out is None:
        raise RMCError("no images to embed")
    if not torch.isfinite(out).all():
        raise RMCError(f"features at layer {layer!r} contain NaN or infinite values; the model weights are broken")
    return out


def make_provenance(model_info: ModelInfo, layer: str, source: str, feats: torch.Tensor | np.ndarray,
                    **extra: Any) -> dict[str, Any]:
    return {"format": FORMAT, "model_sha256": model_info.sha256, "model_arch": model_info.arch, "layer": layer,
            "source": source, "count": int(feats.shape[0]), "dim": int(feats.shape[1]), "dtype": "float32",
            "rmc_version": rmc.__version__, **extra}


def sidecar_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def save_features(path: str | Path, feats: torch.Tensor | np.ndarray, provenance: dict[str, Any]) -> Path:
    """Write `path` (.npy, float32 C-contiguous) and its JSON sidecar; returns the .npy path.

    The old sidecar is removed first and the new one written last, so an interrupted save leaves features without
    a sidecar (refused by load_features), never features paired with another run's provenance.
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise RMCError(f"feature file {path} must end in .npy")
    arr = feats.detach().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise RMCError(f"features must be N x d, got shape {arr.shape}")
    missing = [k for k in ("model_sha256", "layer", "source") if not provenance.get(k)]
    if missing:
        raise RMCError(f"feature provenance lacks {missing}; build it with make_provenance()")
    prov = {**provenance, "count": int(arr.shape[0]), "dim": int(arr.shape[1]), "dtype": "float32",
            "format": FORMAT}
    check_free_space(path.parent, arr.nbytes + (1 << 16), f"the features {path.name}")
    side = sidecar_path(path)
    side.unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:   # a file object, so numpy does not append ".npy" to the temporary name
            np.save(f, arr)
    write_json(side, prov)
    return path


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] if len(s) == 64 else s


def load_features(path: str | Path, expect_model_sha256: str | None = None, expect_layer: str | None = None,
                  expect_source: str | None = None, mmap: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
    """(N x d float32 features, provenance). Each `expect_*` given must match the sidecar, else RMCError.

    `mmap=True` leaves the matrix on disk (read-only pages, copy-on-write for the tensor).
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
              ("source", "source", expect_source))
    wrong = [(what, prov.get(key), want) for what, key, want in checks if want is not None and prov.get(key) != want]
    if wrong:
        have = " / ".join(f"{w} {_short(h)}" for w, h, _ in wrong)
        want = " / ".join(f"{w} {_short(x)}" for w, _, x in wrong)
        raise RMCError(f"features {path} were computed with {have} but you are using {want}; "
                       "re-run `rmc features` with this model, layer and store")
    try:
        arr = np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RMCError(f"{path} is not a readable .npy file ({e}); re-run `rmc features`") from None
    if arr.dtype != np.float32 or arr.ndim != 2 or list(arr.shape) != [prov.get("count"), prov.get("dim")]:
        raise RMCError(f"{path} holds {arr.dtype} {list(arr.shape)} but its sidecar says float32 "
                       f"[{prov.get('count')}, {prov.get('dim')}]; re-run `rmc features`")
    return torch.from_numpy(arr), prov


def ensure_features(model: nn.Module, model_info: ModelInfo, layer: str, store, path: str | Path) -> np.ndarray:
    """The D' features of `store` at `layer` of the model, cached at `path`: loaded when the file there was made
    with this model, layer and store, else computed and saved (replacing it)."""
    path = Path(path)
    source = store_source(store)
    if path.exists():
        try:
            return load_features(path, model_info.sha256, layer, source)[0].numpy()
        except RMCError:
            pass   # made with another model / layer / store: recomputed below (the file is replaced atomically)
    feats = compute_features(model, model_info, layer, store.images, progress=True, desc=f"features {path.stem}")
    save_features(path, feats, make_provenance(model_info, layer, source, feats))
    return feats.numpy()


def store_features_path(out_dir: str | Path) -> Path:
    """Where `rmc features` writes the features of D'."""
    return Path(out_dir) / "dprime.npy"


def evalset_features_path(out_dir: str | Path, name: str) -> Path:
    """Where `rmc features` writes the features of one evaluation set."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    return Path(out_dir) / "evalsets" / f"{safe}.npy"


__all__ = ["compute_features", "ensure_features", "evalset_features_path", "evalset_source", "load_features",
           "make_provenance", "save_features", "store_features_path", "store_source", "tensor_source"]
