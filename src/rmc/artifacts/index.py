"""The neighbour index of a large D', saved beside its features and reused (rmc.defense.knn builds it).

For an IVF kind, `open_index(features_path, config)` looks for `<stem>.index-<kind>-<settings hash>.faiss` beside
`<stem>.npy`, with the sidecar `<stem>.index-<kind>-<settings hash>.json`: {format, features (file name, sha256,
bytes, count, dim, dtype), the build settings (kind, nlist, train_rows, seed, pq_m, pq_bits), nprobe, the index
file's sha256 and bytes, faiss_version, build seconds}. A matching pair is read back memory-mapped (the inverted
lists stay in the page cache); none is built in batches from the memory-mapped features and written atomically,
the sidecar last. An index whose sidecar names other features or settings, or whose bytes differ from its sidecar,
is refused in one line (its name carries the settings, so that happens only to a damaged or foreign file).
The flat kind is not saved: it is a float32 copy of the features, built in memory in one pass.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from rmc.artifacts.features import DERIVED_MARK, load_features, sidecar_path
from rmc.defense.knn import IndexConfig, IndexKind, NeighbourIndex, build_ivf, faiss
from rmc.errors import RMCError
from rmc.io import check_free_space, read_json, sha256_file, write_json

FORMAT = "rmc-index/1"


def index_path(features_path: str | Path, settings: dict[str, Any]) -> Path:
    """Where the index built with `settings` (IndexConfig.build_settings) from `features_path` lives."""
    features_path = Path(features_path)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return features_path.with_name(f"{features_path.stem}{DERIVED_MARK}{settings['kind']}-{key}.faiss")


def _features_identity(path: Path, prov: dict[str, Any]) -> dict[str, Any]:
    """What an index records of the features it was built from (the file's hash from its sidecar, or computed)."""
    sha = prov.get("file_sha256") or sha256_file(path)
    return {"file": path.name, "sha256": sha, "bytes": path.stat().st_size, "count": prov["count"],
            "dim": prov["dim"], "dtype": prov["dtype"]}


def open_index(features_path: str | Path, config: IndexConfig, progress: bool = False, log=None,
               features: np.ndarray | None = None) -> NeighbourIndex:
    """The neighbour index over the features at `features_path` (checked against their sidecar) under `config`:
    flat in memory, or an IVF index read from beside the features (built and saved there first if missing).
    `features`: the same file already opened (memory-mapped), to avoid opening it twice."""
    features_path = Path(features_path)
    arr, prov = load_features(features_path, mmap=True)
    vectors = features if features is not None else arr.numpy()
    n, dim = vectors.shape
    settings = config.build_settings(n, dim)
    if not settings:
        return NeighbourIndex(vectors)
    path = index_path(features_path, settings)
    side = sidecar_path(path)
    ident = _features_identity(features_path, prov)
    if path.exists() and side.exists():
        return _load(path, side, vectors, ident, settings, config)
    started = time.perf_counter()
    if log is not None:
        log(f"[index] building {settings['kind']} over {n:,} x {dim} features ({features_path.name}): "
            f"nlist {settings['nlist']}, trained on {settings['train_rows']:,} rows")
    from tqdm.auto import tqdm
    with tqdm(total=n, unit="row", desc=f"index {settings['kind']}", disable=not progress, dynamic_ncols=True) as bar:
        index = build_ivf(vectors, settings, config.add_batch, bar.update)
    seconds = round(time.perf_counter() - started, 1)
    save_index(index, path, {"format": FORMAT, "features": ident, **settings, "nprobe": config.nprobe,
                             "faiss_version": faiss.__version__, "build_seconds": seconds})
    del index
    return _load(path, side, vectors, ident, settings, config)


def save_index(index, path: Path, sidecar: dict[str, Any]) -> None:
    """Write `index` to `path` and its sidecar, atomically: the old sidecar goes first, the new one comes last."""
    side = sidecar_path(path)
    side.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.writing")
    need = int(index.sa_code_size() * index.ntotal * 1.2) + (64 << 20)
    check_free_space(path.parent, need, f"the index {path.name}")
    try:
        faiss.write_index(index, str(tmp))
        sidecar = {**sidecar, "index_sha256": sha256_file(tmp), "index_bytes": tmp.stat().st_size}
        os.replace(tmp, path)
    except RuntimeError as e:
        raise RMCError(f"cannot write the index {path} ({str(e).splitlines()[0]}); free some space or choose "
                       "another --out") from None
    finally:
        tmp.unlink(missing_ok=True)
    write_json(side, sidecar)


def _load(path: Path, side: Path, vectors: np.ndarray, ident: dict[str, Any], settings: dict[str, Any],
          config: IndexConfig) -> NeighbourIndex:
    meta = read_json(side, "index sidecar")
    fix = f"delete {path.name} and {side.name} to rebuild it"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RMCError(f"{side} is not an rmc index sidecar ({FORMAT}); {fix}")
    got = {"features": meta.get("features"), **{k: meta.get(k) for k in settings}}
    want = {"features": ident, **settings}
    wrong = [k for k in want if got[k] != want[k]]
    if wrong:
        k = wrong[0]
        if k == "features":
            recorded = meta.get("features")
            have: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
            diff = [f for f in ident if have.get(f) != ident[f]]
            detail = f"{diff[0]} {_short(have.get(diff[0]))} but the features now have {_short(ident[diff[0]])}"
            raise RMCError(f"index {path.name} was built from other features ({detail}); {fix}")
        raise RMCError(f"index {path.name} was built with {k} = {got[k]!r}, not {want[k]!r}; {fix}")
    size = path.stat().st_size
    if size != meta.get("index_bytes") or sha256_file(path) != meta.get("index_sha256"):
        raise RMCError(f"index {path.name} does not match the sha256 in {side.name} (damaged?); {fix}")
    try:
        index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    except RuntimeError as e:
        raise RMCError(f"index {path.name} is not readable by FAISS ({str(e).splitlines()[0]}); {fix}") from None
    kind = IndexKind(settings["kind"])
    want_type = faiss.IndexIVFPQ if kind is IndexKind.IVFPQ else faiss.IndexIVFFlat
    if not isinstance(index, want_type) or index.nlist != settings["nlist"]:
        raise RMCError(f"index {path.name} holds a {type(index).__name__}, not the {kind.value} its sidecar names; "
                       f"{fix}")
    return NeighbourIndex.from_faiss(index, vectors, config.nprobe, config.rerank)


def _short(v: Any) -> str:
    s = str(v)
    return s[:12] if len(s) == 64 else s


__all__ = ["FORMAT", "index_path", "open_index", "save_index"]
