"""`rmc migrate-dprime PATH`: convert a finished D' store of the single-file format (format 1: one preallocated
images.npy) to shards (format 2), in place.

The old store is verified first (every file against its manifest hash: a damaged store is not converted). The shards
are written beside images.npy, each atomically, with the manifest of the old store unchanged; the new manifest,
written last and atomically, is the commit point; images.npy is deleted after it. Interrupted at any point, the store
is either still a valid single-file store (run the command again) or already converted (running it again removes a
leftover images.npy). It needs free space for a second copy of the images while it runs.

The new manifest is the one `rmc augment` writes for the same settings, so the converted store equals a store built
in the shard format byte for byte; its fingerprint is new (the manifest changed), so features and record streams
keyed on the old fingerprint are recomputed (`rmc run` and `rmc features` do that on their own).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rmc.artifacts.dprime import (
    FILES,
    FORMAT_VERSION,
    KIND,
    MANIFEST,
    PROGRESS,
    SINGLE_FILE_FORMAT,
    AugmentConfig,
    fingerprint_of,
    layout_of,
    shards_section,
)
from rmc.artifacts.shards import SHARDS, ShardLayout, write_shard
from rmc.artifacts.verify import remember
from rmc.errors import RMCError
from rmc.io import check_free_space, read_json, sha256_file, write_json

OLD_IMAGES = "images.npy"   # the single file of format 1


def _note(message: str) -> None:
    print(message, file=sys.stderr)


def migrated_manifest(old: dict[str, Any]) -> dict[str, Any]:
    """The format-2 manifest of a format-1 store (without its content hashes): the keys `rmc augment` writes."""
    try:
        shape = [int(d) for d in old["shape"]]
        layout = ShardLayout(len(old["copy_names"]), int(old["counts"]["clean"]), int(old["chunk_size"]),
                             (shape[1], shape[2], shape[3]))
        dataset = dict(old["dataset"])
    except (KeyError, TypeError, ValueError, IndexError):
        raise RMCError("the store's manifest lacks its counts, shape or chunk size; it is damaged: delete the store "
                       "and re-run `rmc augment`") from None
    # An image folder of format 1 was decoded with the default preprocessing at its crop size.
    dataset["preprocessing"] = ({"resize_shorter_side": round(shape[-1] * 256 / 224), "center_crop": shape[-1],
                                 "interpolation": "bilinear", "color": "RGB"} if dataset.get("name") == "imagefolder"
                                else None)
    dataset["sha256_of"] = "pixels"
    # Attack settings a store of format 1 may predate: it was made with their defaults.
    default = AugmentConfig()
    attack = {"loss": default.loss, "clip": default.clip, "crop_shift": default.crop_shift, **old["attack"]}
    new = {k: v for k, v in old.items() if k != "content"}
    new.update(format_version=FORMAT_VERSION, dataset=dataset, attack=attack, per_class=None,
               shards=shards_section(layout), files=dict(FILES))
    return new


def _verify_old(path: Path, manifest: dict) -> np.ndarray:
    content = manifest.get("content")
    if not isinstance(content, dict):
        raise RMCError(f"{path / MANIFEST} has no content hashes (an unfinished or damaged store); delete it and "
                       "re-run `rmc augment`")
    for name, fname in {"images": OLD_IMAGES, **FILES}.items():
        f = path / fname
        if not f.is_file() or sha256_file(f) != content.get(name):
            raise RMCError(f"{f} is {'missing' if not f.is_file() else 'not what its manifest records'}; the store is "
                           "damaged and is not converted: delete it and re-run `rmc augment`")
    try:
        images = np.load(path / OLD_IMAGES, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise RMCError(f"{path / OLD_IMAGES} is not a readable .npy file ({e}); delete the store and re-run "
                       "`rmc augment`") from None
    if images.dtype != np.uint8 or list(images.shape) != list(manifest["shape"]):
        raise RMCError(f"{path / OLD_IMAGES} holds {images.dtype} {list(images.shape)}, not the manifest's uint8 "
                       f"{manifest['shape']}; delete the store and re-run `rmc augment`")
    return images


def migrate_dprime(path: str | Path, progress: bool = True, note: Callable[[str], None] = _note) -> str:
    """Convert the store at `path` to shards (see the module docstring); returns a one-line summary."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise RMCError(f"{path} has no {MANIFEST}; it is not a finished D' store (an unfinished single-file build "
                       "cannot be converted: delete it and re-run `rmc augment`)")
    old = read_json(path / MANIFEST, "store manifest")
    if not isinstance(old, dict) or old.get("kind") != KIND:
        raise RMCError(f"{path / MANIFEST} is not an augmented-dataset manifest; point to a D' store")
    if old.get("format_version") == FORMAT_VERSION:
        if (path / OLD_IMAGES).exists():   # a conversion stopped after its commit
            (path / OLD_IMAGES).unlink()
            note(f"note: removed {path / OLD_IMAGES}, left by an interrupted conversion")
        return f"{path} is already in the shard format (format {FORMAT_VERSION}); nothing to do"
    if old.get("format_version") != SINGLE_FILE_FORMAT:
        raise RMCError(f"{path / MANIFEST} has format version {old.get('format_version')!r}; this rmc converts "
                       f"format {SINGLE_FILE_FORMAT} only")
    images = _verify_old(path, old)
    new = migrated_manifest(old)
    layout = layout_of(new)
    check_free_space(path, int(images.nbytes) + (1 << 20), "the D' shards (a second copy of the images, until the "
                     "old file is deleted)")
    folder = path / SHARDS
    folder.mkdir(exist_ok=True)
    for f in folder.glob(".*.tmp"):
        f.unlink()
    from tqdm.auto import tqdm
    hashes = []
    for i in tqdm(range(layout.count), desc="migrate D'", unit="shard", disable=not progress, dynamic_ncols=True):
        start = (i // layout.per_copy) * layout.n + (i % layout.per_copy) * layout.chunk
        hashes.append(write_shard(folder / layout.name(i), images[start:start + layout.rows_of(i)]))
    del images
    content = {name: old["content"][name] for name in FILES}
    content["shards"] = hashes
    new["content"] = content
    write_json(path / PROGRESS, {"done": list(range(layout.count)), "total": layout.count,
                                 "hashes": {str(i): h for i, h in enumerate(hashes)}})
    write_json(path / MANIFEST, new)   # the commit point
    (path / OLD_IMAGES).unlink()
    for i, h in enumerate(hashes):
        remember(folder / layout.name(i), h)
    return (f"converted {path} to {layout.count} shards of at most {layout.chunk} rows; its fingerprint is now "
            f"{fingerprint_of(new)[:12]} (was {fingerprint_of(old)[:12]}): features of the old store are recomputed")


__all__ = ["migrate_dprime", "migrated_manifest"]
