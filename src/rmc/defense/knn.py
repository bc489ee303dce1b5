"""Nearest-neighbour search over stored features (FAISS), and the kNN-vote baselines DeepNN / WebNN."""

from __future__ import annotations

import sys
from enum import Enum
from typing import cast

from rmc.cpu import configure_openblas

if "faiss" not in sys.modules:
    # FAISS's own OpenBLAS reads this when it loads: on AVX-512 AMD CPUs ask for its AVX-512 kernels (see rmc.cpu).
    configure_openblas()

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from rmc.errors import RMCError


class IndexKind(str, Enum):
    FLAT = "flat"   # exact L2 search (default)
    IVF = "ivf"     # inverted lists: approximate, for very large D'


# Candidates fetched beyond k for the exact re-ranking. FAISS's flat search computes |x|^2 + |q|^2 - 2 x.q in
# float32 BLAS, whose rounding can swap neighbours whose distances differ by ~1e-6 relative; re-ranking the best
# k + REFINE_MARGIN candidates with directly computed distances makes the result independent of that rounding.
REFINE_MARGIN = 32
QUERY_CHUNK = 256      # queries per FAISS call (bounds its result buffers; larger blocks gained nothing:
                       # benchmarks/README.md)
ROUNDING = 1e-5        # relative slack for float32 rounding in the safety check (float32 eps is 1.2e-7)


def _faiss_search(index, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """index.search with FAISS's choice of kernel made by the number of queries: its matrix-product (BLAS) kernel for
    blocks of >= 16 queries (faster than the per-query kernel, see benchmarks/README.md; which this FAISS build
    otherwise uses up to `distance_compute_blas_threshold` = 128,000 queries), the per-query kernel below that (~3x
    faster for one)."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1 if len(q) >= 16 else 2 ** 31 - 1
    try:
        return index.search(q, k)
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def _chunks(n: int, size: int = 65536):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class NeighbourIndex:
    """Euclidean k-NN over a fixed set of vectors. `ids` maps index rows back to rows of D' (for sub-indexes).

    Kinds:
    - `flat` (default): exact. A FAISS flat index holds the vectors (the only copy); with `refine` the best
      k + REFINE_MARGIN candidates are re-ranked by directly computed float32 distances, ties broken by the lower
      row, after checking that rounding cannot have left a true neighbour outside the candidates. The result is
      exactly the textbook k-NN: the same neighbours, in the same order, as computing every distance directly.
    - `ivf`: approximate (inverted lists, `nprobe` of `nlist` searched), candidates re-ranked exactly.

    Queries are searched in blocks of QUERY_CHUNK: give all queries at once where possible (FAISS then computes the
    distances as one matrix product), e.g. every test input of an evaluation set.
    """

    def __init__(self, features: np.ndarray | torch.Tensor, kind: IndexKind | str = IndexKind.FLAT,
                 ids: np.ndarray | None = None, nlist: int = 1024, nprobe: int = 16, seed: int = 0,
                 refine: bool = True):
        x = features.numpy() if isinstance(features, torch.Tensor) else features
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or len(x) == 0:
            raise RMCError(f"features must be a non-empty N x d matrix, got shape {x.shape}")
        if not all(np.isfinite(x[sl]).all() for sl in _chunks(len(x))):
            raise RMCError("features contain NaN or infinite values; re-run `rmc features`")
        self.dim, self.size = x.shape[1], x.shape[0]
        self.ids = np.arange(self.size) if ids is None else np.asarray(ids)
        if len(self.ids) != self.size:
            raise RMCError(f"{len(self.ids)} ids for {self.size} feature rows")
        self._identity = ids is None or bool(np.array_equal(self.ids, np.arange(self.size)))
        self._id_order = None if self._identity else np.argsort(self.ids, kind="stable")
        self.kind, self.refine = IndexKind(kind), refine
        self._max_norm = float(np.einsum("ij,ij->i", x, x).max())   # no N x d temporary
        if self.kind is IndexKind.FLAT:
            self.index: faiss.Index = faiss.IndexFlatL2(self.dim)
            self.index.add(x)
            # The index's own storage, viewed (not copied): the vectors live in memory once.
            self._vectors = faiss.rev_swig_ptr(self.index.get_xb(), self.size * self.dim).reshape(self.size, self.dim)
        else:
            nlist = max(1, min(nlist, self.size // 39))   # FAISS wants >= 39 training points per list
            quantizer = faiss.IndexFlatL2(self.dim)
            ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist)
            ivf.cp.seed = seed
            ivf.train(x)
            ivf.nprobe = min(nprobe, nlist)
            self.index = ivf
            self._quantizer = quantizer   # keep it alive: FAISS does not own it
            self.index.add(x)
            # IVF keeps vectors in per-list order; re-ranking reads them from the caller's matrix (not copied when
            # it is already float32 and contiguous, e.g. a memory-mapped feature file).
            self._vectors = x

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of the given D' rows (float32, len(rows) x d)."""
        rows = np.asarray(rows)
        if self._identity:
            return self._vectors[rows]
        pos = np.searchsorted(self.ids, rows, sorter=self._id_order)
        pos = cast(np.ndarray, self._id_order)[np.minimum(pos, self.size - 1)]   # set when ids are not 0..n-1
        if not np.array_equal(self.ids[pos], rows):
            raise RMCError("rows asked for are not in this index")
        return self._vectors[pos]

    def search(self, queries: np.ndarray | torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, D' rows) of the k nearest, closest first; distances are Euclidean (not squared)."""
        q = queries.numpy() if isinstance(queries, torch.Tensor) else queries
        q = np.ascontiguousarray(q, dtype=np.float32).reshape(-1, self.dim) if q.size else q
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RMCError(f"query features have dimension {q.shape[-1]}, the index has {self.dim}; "
                           "use features from the same model layer")
        if not 0 < k <= self.size:
            raise RMCError(f"k = {k} neighbours asked but the index holds {self.size} examples; lower k")
        dist = np.empty((len(q), k), dtype=np.float32)
        rows = np.empty((len(q), k), dtype=np.int64)
        for start in range(0, len(q), QUERY_CHUNK):
            block = q[start:start + QUERY_CHUNK]
            d2, pos = self._search_block(block, k)
            dist[start:start + len(block)] = np.sqrt(np.maximum(d2, 0))
            rows[start:start + len(block)] = pos
        return dist, self.ids[rows]

    def _rerank(self, cand: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k closest of the candidate rows by directly computed distances (ties: lower row first)."""
        v = self._vectors[cand]                           # a copy (fancy indexing): computed on in place
        np.subtract(v, query, out=v)
        np.multiply(v, v, out=v)
        exact = v.sum(-1)                                 # sum((v - q)^2) in float32: the definition, directly
        order = np.lexsort((cand, exact))[:k]
        return exact[order], cand[order]

    def _search_block(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.refine:
            return _faiss_search(self.index, q, k)
        out_d, out_p = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        todo, margin = np.arange(len(q)), REFINE_MARGIN
        while len(todo):
            kk = min(self.size, k + margin)
            approx, cand = _faiss_search(self.index, q[todo], kk)
            unsafe = np.zeros(len(todo), bool)
            for j, i in enumerate(todo):
                c = cand[j][cand[j] >= 0]                 # IVF may return fewer than kk (-1 padded)
                if len(c) < k:
                    raise RMCError(f"the approximate index found only {len(c)} of k = {k} neighbours; raise nprobe "
                                   "or use the flat index")
                d, r = self._rerank(c, q[i], k)
                # All k must lie safely inside the candidate list: the k-th exact distance has to be below the
                # last candidate's approximate distance by more than that approximation's rounding error.
                if self.kind is IndexKind.FLAT and len(c) == kk < self.size:
                    if d[-1] > approx[j, -1] - ROUNDING * (float(q[i] @ q[i]) + self._max_norm):
                        unsafe[j] = True
                        continue
                out_d[i], out_p[i] = d, r
            todo, margin = todo[unsafe], margin * 4
        return out_d, out_p

def vote(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority vote per row (ties go to the smallest class index, deterministically)."""
    counts = np.zeros((neighbour_labels.shape[0], num_classes), dtype=np.int64)
    np.add.at(counts, (np.arange(len(neighbour_labels))[:, None], neighbour_labels), 1)
    return counts.argmax(1)
