"""Image arrays read on demand: what an `ImageDataset` or a D' holds when its images do not fit in memory.

A `LazyImages` behaves like a uint8 N x C x H x W tensor where rmc reads images: `len`, `shape`, `dtype`, `dim()`,
and indexing by an int, a slice, or an index array (numpy, torch or list; any order, repeats allowed) that returns
a uint8 tensor holding just those rows. Nothing is read until it is indexed, and only what is indexed. Subclasses
say how to read a set of rows (`_read`); they pickle as where their data lives, never as the data, so a Ray worker
given one reads the same files from a path it shares with the driver.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch


class LazyImages:
    """A uint8 N x C x H x W array whose rows are read when indexed (see the module docstring)."""

    dtype = torch.uint8

    def __init__(self, shape: tuple[int, int, int, int]):
        self._shape = torch.Size(shape)

    # -- what subclasses provide

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 len(rows) x C x H x W of `rows` (int64, ascending, unique, in range)."""
        raise NotImplementedError

    @property
    def source_path(self) -> str | None:
        """The file or folder the rows are read from (what a worker sharing the path reads), or None."""
        return None

    def identity(self) -> str:
        """A sha256 naming the rows' content without reading them all (e.g. the files and how they are decoded)."""
        raise NotImplementedError

    # -- the tensor-like surface

    @property
    def shape(self) -> torch.Size:
        return self._shape

    def __len__(self) -> int:
        return int(self._shape[0])

    def dim(self) -> int:
        return 4

    def size(self, d: int | None = None):
        return self._shape if d is None else self._shape[d]

    def is_floating_point(self) -> bool:
        return False

    def numel(self) -> int:
        return int(np.prod(self._shape))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._shape)}, uint8, from {self.source_path})"

    def rows(self, key: Any) -> np.ndarray:
        """The row numbers `key` selects, as int64 (negative numbers count from the end; out of range: IndexError)."""
        n = len(self)
        if isinstance(key, slice):
            return np.arange(n, dtype=np.int64)[key]
        if isinstance(key, torch.Tensor):
            key = key.detach().cpu().numpy()
        idx = np.asarray(key)
        if idx.dtype == np.bool_:
            if idx.shape != (n,):
                raise IndexError(f"a boolean index of shape {idx.shape} for {n} rows")
            return np.flatnonzero(idx).astype(np.int64)
        if idx.size == 0:
            return np.zeros(0, dtype=np.int64)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"rows are indexed by integers, slices or a boolean mask, not {idx.dtype}")
        idx = idx.astype(np.int64).reshape(-1)
        if idx.min() < -n or idx.max() >= n:
            raise IndexError(f"row index out of range for {n} rows")
        return np.where(idx < 0, idx + n, idx)

    def __getitem__(self, key: Any) -> torch.Tensor:
        if isinstance(key, tuple):   # rows first, then the rest as a tensor would index them
            picked = self[key[0]]
            rest = key[1:]
            return picked[rest] if picked.dim() == 3 else picked[(slice(None),) + rest]
        single = isinstance(key, (int, np.integer))
        idx = self.rows([key] if single else key)
        if len(idx) == 0:
            return torch.empty((0, *self._shape[1:]), dtype=torch.uint8)
        unique, inverse = np.unique(idx, return_inverse=True)
        data = self._read(unique)
        if len(unique) != len(idx) or not np.array_equal(unique, idx):
            data = data[inverse.reshape(-1)]
        out = torch.from_numpy(np.ascontiguousarray(data))
        return out[0] if single else out

    def take(self, index: Any) -> "LazyImages":
        """The rows `index` selects as another lazy array (nothing read): what `ImageDataset.subset` uses."""
        return TakenImages(self, self.rows(index))


class TakenImages(LazyImages):
    """Rows `rows` of another lazy array, read from it on demand."""

    def __init__(self, base: LazyImages, rows: np.ndarray):
        super().__init__((len(rows), *base.shape[1:]))
        self.base, self.index = base, np.asarray(rows, dtype=np.int64)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return self.base[self.index[rows]].numpy()

    @property
    def source_path(self) -> str | None:
        return self.base.source_path

    def take(self, index: Any) -> "LazyImages":
        return TakenImages(self.base, self.index[self.rows(index)])

    def identity(self) -> str:
        h = hashlib.sha256(self.base.identity().encode())
        h.update(self.index.tobytes())
        return h.hexdigest()


__all__ = ["LazyImages", "TakenImages"]
