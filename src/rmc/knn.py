"""Nearest-neighbour search over stored features (FAISS), and the kNN-vote baselines DeepNN / WebNN."""

from __future__ import annotations

from enum import Enum

import faiss
import numpy as np
import torch

from rmc.errors import RMCError


class IndexKind(str, Enum):
    FLAT = "flat"   # exact L2 search (default)
    IVF = "ivf"     # inverted lists: approximate, for very large D'


class NeighbourIndex:
    """Euclidean k-NN over a fixed set of vectors. `ids` maps index rows back to rows of D' (for sub-indexes)."""

    def __init__(self, features: np.ndarray | torch.Tensor, kind: IndexKind | str = IndexKind.FLAT,
                 ids: np.ndarray | None = None, nlist: int = 1024, nprobe: int = 16, seed: int = 0):
        x = features.numpy() if isinstance(features, torch.Tensor) else features
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise RMCError(f"features must be a non-empty N x d matrix, got shape {x.shape}")
        if not np.isfinite(x).all():
            raise RMCError("features contain NaN or infinite values; re-run `rmc features`")
        self.dim, self.size = x.shape[1], x.shape[0]
        self.ids = np.arange(self.size) if ids is None else np.asarray(ids)
        kind = IndexKind(kind)
        if kind is IndexKind.FLAT:
            self.index = faiss.IndexFlatL2(self.dim)
        else:
            nlist = max(1, min(nlist, self.size // 39))   # FAISS wants >= 39 training points per list
            quantizer = faiss.IndexFlatL2(self.dim)
            self.index = faiss.IndexIVFFlat(quantizer, self.dim, nlist)
            self.index.cp.seed = seed
            self.index.train(x)
            self.index.nprobe = min(nprobe, nlist)
            self._quantizer = quantizer   # keep it alive: FAISS does not own it
        self.index.add(x)

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, D' rows) of the k nearest, closest first; distances are Euclidean (not squared)."""
        q = queries.numpy() if isinstance(queries, torch.Tensor) else queries
        q = np.ascontiguousarray(q, dtype=np.float32).reshape(-1, self.dim) if q.size else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RMCError(f"query features have dimension {q.shape[-1]}, the index has {self.dim}; "
                           "use features from the same model layer")
        if not 0 < k <= self.size:
            raise RMCError(f"k = {k} neighbours asked but the index holds {self.size} examples; lower k")
        d2, rows = self.index.search(q, k)
        return np.sqrt(np.maximum(d2, 0)), self.ids[rows]


def vote(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority vote per row (ties go to the smallest class index, deterministically)."""
    counts = np.zeros((neighbour_labels.shape[0], num_classes), dtype=np.int64)
    np.add.at(counts, (np.arange(len(neighbour_labels))[:, None], neighbour_labels), 1)
    return counts.argmax(1)
