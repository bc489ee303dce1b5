"""D''s images as fixed-size shards: `shards/<i>.npy` holds the rows of build chunk i (rmc.artifacts.dprime).

Rows are copy-major (rows [c*n, (c+1)*n) are copy c of the n training examples) and each copy is cut into shards of
`chunk` rows (its last shard may be shorter), so a row's shard and offset are arithmetic. Each shard is a plain
uint8 .npy file (K x C x H x W), written once, atomically, its sha256 computed as it is written.

`ShardImages` reads rows on demand: the shards a read touches are memory-mapped when first needed and kept open, at
most `max_open` at a time (least recently used closed first), so reading K rows opens only their shards. It pickles
as the store's path (plus the hash of its manifest): a Ray worker reads the shards from a file system it shares with
the driver, and refuses a path where it finds another store.
"""

from __future__ import annotations

import hashlib
import io
import math
import mmap
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rmc.data.arrays import LazyImages
from rmc.errors import RMCError
from rmc.io import atomic_path, sha256_file

SHARDS = "shards"       # the folder of a store that holds its shards
MAX_OPEN = 128          # memory-mapped shards kept open per reader (each costs one file descriptor and a mapping)
_NAME_DIGITS = 5        # shard file names are the chunk index, zero-padded to at least this many digits


@dataclass(frozen=True)
class ShardLayout:
    """Where each row of a store lives: `copies` copies of `n` rows each, cut into shards of `chunk` rows."""
    copies: int
    n: int
    chunk: int
    image_shape: tuple[int, int, int]

    def __post_init__(self):
        for name in ("copies", "n", "chunk"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        if len(self.image_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in self.image_shape):
            raise ValueError(f"image shape must be three positive whole numbers, got {self.image_shape!r}")

    @property
    def per_copy(self) -> int:
        return math.ceil(self.n / self.chunk)

    @property
    def count(self) -> int:
        return self.copies * self.per_copy

    @property
    def total(self) -> int:
        return self.copies * self.n

    def name(self, shard: int) -> str:
        return f"{shard:0{max(_NAME_DIGITS, len(str(self.count - 1)))}d}.npy"

    def rows_of(self, shard: int) -> int:
        k = shard % self.per_copy
        return min(self.chunk, self.n - k * self.chunk)

    def shape_of(self, shard: int) -> tuple[int, int, int, int]:
        return (self.rows_of(shard), *self.image_shape)

    def header_size(self, shard: int) -> int:
        """Bytes of the shard's .npy header (its rows follow)."""
        return len(_npy_header(self.shape_of(shard)))

    def file_size(self, shard: int) -> int:
        """Bytes of the shard's .npy file (its header, then its rows)."""
        return self.header_size(shard) + int(np.prod(self.shape_of(shard)))

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard, offset within the shard) of each row."""
        copy, pos = np.divmod(rows, self.n)
        k, offset = np.divmod(pos, self.chunk)
        return copy * self.per_copy + k, offset


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                               "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


class _HashingWriter:
    """A file wrapper that hashes what is written through it (numpy writes .npy files through `write`)."""

    def __init__(self, f):
        self.f, self.h = f, hashlib.sha256()

    def write(self, data) -> int:
        self.h.update(data)
        return self.f.write(data)


class ShardMismatch(RMCError):
    """A shard rebuilt into a finished store did not come out with the bytes its manifest records."""


def write_shard(path: Path, rows: np.ndarray, expect: str | None = None) -> str:
    """Write `rows` (uint8) as the .npy file `path`, atomically and flushed to disk; return its sha256. With
    `expect`, a file whose hash differs is not put in place (ShardMismatch): a finished store is never altered."""
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            w = _HashingWriter(f)
            w.write(_npy_header(rows.shape))
            w.write(rows.reshape(-1).data)
            f.flush()
            os.fsync(f.fileno())
        digest = w.h.hexdigest()
        if expect is not None and digest != expect:
            raise ShardMismatch(f"rebuilt shard {path.name} differs from the one its manifest records (its hash "
                                f"{digest[:12]}, recorded {expect[:12]}): the store was made with another compute "
                                "path (machine, threads, library versions); delete it and re-run `rmc augment`")
    return digest


def open_shard(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The shard at `path` memory-mapped read-only, checked to hold uint8 `shape`. The array's `base` is its
    `mmap.mmap`, through which reads are announced to the kernel (`prefetch`)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found, fortran, dtype = read_header(f)
            offset = f.tell()
            if dtype != np.uint8 or tuple(found) != tuple(shape) or fortran:
                raise RMCError(f"store shard {path} holds {dtype} {list(found)}, expected uint8 {list(shape)}; "
                               "re-run `rmc augment` with the same settings to rebuild it")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.ndarray(shape, dtype=np.uint8, buffer=mm, offset=offset)
    except FileNotFoundError:
        raise RMCError(f"store shard {path} is missing; re-run `rmc augment` with the same settings to rebuild "
                       "it") from None
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise RMCError(f"store shard {path} is not a readable .npy file ({e}); re-run `rmc augment` with the same "
                       "settings to rebuild it") from None


def prefetch(arr: np.ndarray, header: int, offsets: np.ndarray) -> None:
    """Tell the kernel that rows `offsets` of the memory-mapped shard `arr` (its .npy header `header` bytes long) are
    about to be read (madvise(MADV_WILLNEED)): it reads them all ahead, side by side, instead of one page fault at a
    time (a cold read of 2048 scattered rows took 1-4 s with it, 6-7 s without, on this machine). Only a hint: it
    changes no data."""
    mm = arr.base
    if not isinstance(mm, mmap.mmap) or not hasattr(mmap, "MADV_WILLNEED"):
        return
    row = arr.strides[0]
    for off in offsets:
        start = header + int(off) * row
        aligned = start - start % mmap.PAGESIZE
        mm.madvise(mmap.MADV_WILLNEED, aligned, start + row - aligned)


class ShardImages(LazyImages):
    """A store's images, read from its shards on demand (see the module docstring)."""

    def __init__(self, folder: Path, layout: ShardLayout, manifest_sha256: str | None = None,
                 max_open: int = MAX_OPEN):
        super().__init__((layout.total, *layout.image_shape))
        self.folder, self.layout, self.manifest_sha256, self.max_open = Path(folder), layout, manifest_sha256, max_open
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()   # threads share a D' (rmc.defense.batched): one cache, changed by one at a time
        self._check_path = False

    @property
    def source_path(self) -> str:
        return str(self.folder)

    def identity(self) -> str:
        return self.manifest_sha256 or ""

    def shard_path(self, shard: int) -> Path:
        return self.folder / SHARDS / self.layout.name(shard)

    def shard(self, i: int) -> np.ndarray:
        """Shard i, memory-mapped (opened on first use; the least recently used is closed beyond max_open)."""
        with self._lock:
            if self._check_path:
                self._same_store()
            arr = self._open.get(i)
            if arr is None:
                arr = self._open[i] = open_shard(self.shard_path(i), self.layout.shape_of(i))
                while len(self._open) > self.max_open:
                    self._open.popitem(last=False)
            else:
                self._open.move_to_end(i)
            return arr

    def _read(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), *self.layout.image_shape), dtype=np.uint8)
        shards, offsets = self.layout.locate(rows)
        # Rows come ascending, so each shard's rows are one contiguous run of `rows`, in file order.
        bounds = np.flatnonzero(np.diff(shards)) + 1
        runs = list(zip(np.r_[0, bounds], np.r_[bounds, len(rows)], strict=True))
        for a, b in runs:   # every read announced first, so the disk serves them side by side
            i = int(shards[a])
            prefetch(self.shard(i), self.layout.header_size(i), offsets[a:b])
        for a, b in runs:
            out[a:b] = self.shard(int(shards[a]))[offsets[a:b]]
        return out

    def close(self) -> None:
        with self._lock:
            self._open.clear()

    def _same_store(self) -> None:
        """On a worker: the path must hold the store the driver opened (a shared file system at the same path)."""
        self._check_path = False
        manifest = self.folder / "manifest.json"
        try:
            found = sha256_file(manifest)
        except OSError:
            found = None
        if found != self.manifest_sha256:
            import socket
            raise RMCError(f"{socket.gethostname()} does not see the D' store the driver opened at {self.folder} "
                           f"({'no ' + manifest.name if found is None else 'another store there'}); mount the "
                           "shared file system at the same path on every worker, or pass --dprime-via object-store")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        del state["_open"], state["_lock"]   # memory maps stay in their process; the path travels
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open, self._lock = OrderedDict(), threading.Lock()
        self._check_path = self.manifest_sha256 is not None


__all__ = ["MAX_OPEN", "SHARDS", "ShardImages", "ShardLayout", "ShardMismatch", "open_shard", "write_shard"]
