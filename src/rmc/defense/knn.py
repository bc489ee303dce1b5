"""Nearest-neighbour search over stored features (FAISS), and the kNN-vote baselines DeepNN / WebNN.

Three kinds of index (`IndexKind`): the exact flat index (the default while D''s float32 features fit in
`knn.flat_max_mb`), and for larger D' two inverted-file indexes built in batches from the (possibly memory-mapped,
possibly float16) feature matrix, their candidates re-ranked by exact distances read from that matrix.
This module computes only; rmc.artifacts.index saves an index beside its features and reuses it.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, Iterator, cast

from rmc.cpu import configure_openblas

if "faiss" not in sys.modules:
    # FAISS's own OpenBLAS reads this when it loads: on AVX-512 AMD CPUs ask for its AVX-512 kernels (see rmc.cpu).
    configure_openblas()

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from rmc.checks import check_positive  # noqa: E402
from rmc.errors import RMCError  # noqa: E402


class IndexKind(str, Enum):
    FLAT = "flat"     # exact L2 search over float32 vectors held in memory (N x d x 4 bytes)
    IVF = "ivf"       # IVF-Flat: inverted lists of float32 vectors (N x d x 4 bytes); approximate only by nprobe
    IVFPQ = "ivfpq"   # IVF-PQ: inverted lists of product-quantised codes (N x pq_m bytes); approximate codes too


AUTO = "auto"

# Candidates fetched beyond k for the exact re-ranking. FAISS's flat search computes |x|^2 + |q|^2 - 2 x.q in
# float32 BLAS, whose rounding can swap neighbours whose distances differ by ~1e-6 relative; re-ranking the best
# k + REFINE_MARGIN candidates with directly computed distances makes the result independent of that rounding.
REFINE_MARGIN = 32
QUERY_CHUNK = 256      # queries per FAISS call (bounds its result buffers; larger blocks gained nothing:
                       # benchmarks/README.md)
ROUNDING = 1e-5        # relative slack for float32 rounding in the safety check (float32 eps is 1.2e-7)
MIN_PER_LIST = 39      # FAISS's k-means wants at least this many training points per centroid
# Rows FAISS's product quantiser encodes at once. With 16-d sub-vectors it encodes through a distance table of
# rows x 256 x pq_m floats: FAISS's own blocks (32,768 rows while adding) make that 2.1 GB at pq_m = 64, this 1 GB,
# as fast on two threads (4,096 rows: 0.27 GB but 1.8x slower there; docs/scale.md).
PQ_ENCODE_ROWS = 16384


@dataclass
class IndexConfig:
    index: str = AUTO                # flat (exact) | ivf (IVF-Flat) | ivfpq (IVF-PQ) | auto: flat while the float32
                                     # features (N x d x 4 bytes) fit in flat_max_mb, else ivfpq
    flat_max_mb: int = 2048          # auto: the largest float32 feature matrix searched exactly (docs/scale.md:
                                     # memory, and a flat query's time, grow with it)
    nlist: int | None = None         # ivf / ivfpq: inverted lists; None: 2 x sqrt(N) rounded to a power of two,
                                     # at most N / 39
    nprobe: int = 64                 # ivf / ivfpq: lists searched per query (more: better recall, slower)
    pq_m: int = 64                   # ivfpq: sub-quantisers, i.e. bytes per vector at 8 bits (must divide d)
    pq_bits: int = 8                 # ivfpq: bits per sub-quantiser code
    train_rows: int | None = None    # ivf / ivfpq: rows of the seeded training sample; None: 64 x nlist (at most N)
    add_batch: int = 100_000         # ivf / ivfpq: rows converted to float32 and added per build step (bounds the
                                     # build's memory)
    rerank: int = 2048               # ivf / ivfpq: candidates beyond k re-ranked by exact distances computed from
                                     # the stored features
    seed: int = 0                    # ivf / ivfpq: picks the training sample and seeds k-means

    def __post_init__(self):
        self.validate()

    def validate(self) -> "IndexConfig":
        kinds = [AUTO] + [k.value for k in IndexKind]
        if getattr(self.index, "value", self.index) not in kinds:
            raise RMCError(f"knn.index must be one of {' | '.join(kinds)}, got {self.index!r}")
        self.index = getattr(self.index, "value", self.index)
        for name in ("flat_max_mb", "nprobe", "pq_m", "pq_bits", "add_batch"):
            check_positive(getattr(self, name), f"knn.{name}", integer=True)
        for name in ("nlist", "train_rows"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), f"knn.{name}", integer=True)
        if isinstance(self.rerank, bool) or not isinstance(self.rerank, int) or self.rerank < 0:
            raise RMCError(f"knn.rerank must be a whole number >= 0, got {self.rerank!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise RMCError(f"knn.seed must be an integer >= 0, got {self.seed!r}")
        return self

    def kind(self, n: int, dim: int) -> IndexKind:
        """The kind used for an N x d matrix (auto: flat while its float32 copy fits in flat_max_mb)."""
        if self.index != AUTO:
            return IndexKind(self.index)
        return IndexKind.FLAT if n * dim * 4 <= self.flat_max_mb * 2 ** 20 else IndexKind.IVFPQ

    def lists(self, n: int) -> int:
        if self.nlist is not None:
            return max(1, min(self.nlist, n // MIN_PER_LIST))
        return max(1, min(2 ** round(math.log2(2 * math.sqrt(n))), n // MIN_PER_LIST))

    def build_settings(self, n: int, dim: int) -> dict:
        """What an index built for an N x d matrix depends on (beyond the matrix itself); {} for the flat kind."""
        kind = self.kind(n, dim)
        if kind is IndexKind.FLAT:
            return {}
        nlist = self.lists(n)
        out = {"kind": kind.value, "nlist": nlist, "train_rows": min(n, self.train_rows or 64 * nlist),
               "seed": self.seed}
        if kind is IndexKind.IVFPQ:
            if dim % self.pq_m:
                raise RMCError(f"knn.pq_m = {self.pq_m} does not divide the feature dimension {dim}; pick a divisor "
                               f"of {dim} (e.g. {math.gcd(dim, 64)})")
            out.update(pq_m=self.pq_m, pq_bits=self.pq_bits)
        return out

    def search_settings(self, n: int, dim: int) -> dict:
        """What the neighbours found depend on: the build settings and the search-time ones; {} when exact."""
        build = self.build_settings(n, dim)
        return {**build, "nprobe": self.nprobe, "rerank": self.rerank} if build else {}


def _faiss_search(index, q: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """index.search with FAISS's choice of kernel made by the number of queries: its matrix-product (BLAS) kernel for
    blocks of >= 16 queries (faster than the per-query kernel, see benchmarks/README.md; which this FAISS build
    otherwise uses up to `distance_compute_blas_threshold` = 128,000 queries), the per-query kernel below that (~3x
    faster for one)."""
    old = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 1 if len(q) >= 16 else 2 ** 31 - 1
    try:
        return index.search(q, k) if params is None else index.search(q, k, params=params)
    finally:
        faiss.cvar.distance_compute_blas_threshold = old


def _chunks(n: int, size: int = 65536) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def float32_rows(vectors: np.ndarray, sl: slice) -> np.ndarray:
    """Rows `sl` of a (memory-mapped, float16 or float32) matrix as a float32 C-contiguous block, checked finite."""
    block = np.ascontiguousarray(vectors[sl], dtype=np.float32)
    if not np.isfinite(block).all():
        raise RMCError("features contain NaN or infinite values; re-run `rmc features`")
    return block


def train_sample(vectors: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """A seeded sample of `rows` rows (read in ascending order: sequential pages of a memory map), float32."""
    n = len(vectors)
    pick = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    out = np.empty((len(pick), vectors.shape[1]), dtype=np.float32)
    for sl in _chunks(len(pick)):
        out[sl] = vectors[pick[sl]]
    if not np.isfinite(out).all():
        raise RMCError("features contain NaN or infinite values; re-run `rmc features`")
    return out


def build_ivf(vectors: np.ndarray, settings: dict, add_batch: int = 100_000,
              progress: Callable[[int], None] | None = None) -> faiss.Index:
    """An IVF-Flat or IVF-PQ index (`settings` from IndexConfig.build_settings) over the rows of `vectors`, labelled
    by row: trained on a seeded sample, then filled `add_batch` rows at a time, each converted to float32 (memory:
    the sample, one batch and the index itself). `progress(rows)` is called after training (0) and each batch."""
    n, dim = vectors.shape
    kind, nlist = IndexKind(settings["kind"]), settings["nlist"]
    quantizer = faiss.IndexFlatL2(dim)   # FAISS's Python constructors keep a reference to it in the index
    index: faiss.IndexIVF
    if kind is IndexKind.IVF:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist)
    else:
        pq = faiss.IndexIVFPQ(quantizer, dim, nlist, settings["pq_m"], settings["pq_bits"])
        pq.pq.cp.seed = settings["seed"]
        index = pq
    index.cp.seed = settings["seed"]
    sample = train_sample(vectors, settings["train_rows"], settings["seed"])
    index.train(sample)
    del sample
    if progress is not None:
        progress(0)
    cvar: Any = faiss.cvar     # FAISS's globals; its type stubs list only some of them
    old = cvar.product_quantizer_compute_codes_bs
    cvar.product_quantizer_compute_codes_bs = PQ_ENCODE_ROWS
    try:
        for sl in _chunks(n, add_batch):
            index.add(float32_rows(vectors, sl))
            if progress is not None:
                progress(sl.stop - sl.start)
    finally:
        cvar.product_quantizer_compute_codes_bs = old
    return index


class NeighbourIndex:
    """Euclidean k-NN over a fixed set of vectors. `ids` maps index rows back to rows of D' (for sub-indexes).

    Kinds:
    - `flat` (default): exact. A FAISS flat index holds the vectors (the only copy); with `refine` the best
      k + REFINE_MARGIN candidates are re-ranked by directly computed float32 distances, ties broken by the lower
      row, after checking that rounding cannot have left a true neighbour outside the candidates. The result is
      exactly the textbook k-NN: the same neighbours, in the same order, as computing every distance directly.
    - `ivf`, `ivfpq`: approximate (inverted lists, `nprobe` of `nlist` searched; ivfpq compares compressed codes),
      the best k + `rerank` candidates re-ranked by exact distances computed from the caller's matrix, which stays
      where it is (e.g. a memory-mapped float16 feature file): only the candidates' rows are read.

    Queries are searched in blocks of QUERY_CHUNK: give all queries at once where possible (FAISS then computes the
    distances as one matrix product), e.g. every test input of an evaluation set.
    """

    def __init__(self, features: np.ndarray | torch.Tensor, kind: IndexKind | str = IndexKind.FLAT,
                 ids: np.ndarray | None = None, nlist: int = 1024, nprobe: int = 16, seed: int = 0,
                 refine: bool = True, rerank: int = REFINE_MARGIN, pq_m: int = 64, pq_bits: int = 8,
                 train_rows: int | None = None):
        x = features.numpy() if isinstance(features, torch.Tensor) else features
        if x.ndim != 2 or len(x) == 0:
            raise RMCError(f"features must be a non-empty N x d matrix, got shape {x.shape}")
        self.kind, self.refine = IndexKind(kind), refine
        if self.kind is IndexKind.FLAT:
            index = faiss.IndexFlatL2(x.shape[1])
            for sl in _chunks(len(x)):
                index.add(float32_rows(x, sl))
            # The index's own storage, viewed (not copied): the vectors live in memory once.
            vectors = faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)
            self._setup(index, vectors, ids, nprobe, rerank)
            return
        nl = max(1, min(nlist, len(x) // MIN_PER_LIST))
        settings = {"kind": self.kind.value, "nlist": nl, "seed": seed,
                    "train_rows": min(len(x), train_rows or max(64 * nl, 4096)), "pq_m": pq_m, "pq_bits": pq_bits}
        if not x.flags["C_CONTIGUOUS"] or x.dtype not in (np.float32, np.float16):
            x = np.ascontiguousarray(x, dtype=np.float32)
        self._setup(build_ivf(x, settings), x, ids, nprobe, rerank)

    @classmethod
    def from_faiss(cls, index: faiss.Index, vectors: np.ndarray, nprobe: int, rerank: int = REFINE_MARGIN,
                   refine: bool = True) -> "NeighbourIndex":
        """Wrap a built (e.g. loaded) IVF index whose labels are rows of `vectors` (the matrix it was built from,
        left where it is: the re-ranking reads only the candidates' rows)."""
        kind = IndexKind.IVFPQ if isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ) else IndexKind.IVF
        if index.ntotal != len(vectors) or index.d != vectors.shape[1]:
            raise RMCError(f"the index holds {index.ntotal} x {index.d} vectors but the features are "
                           f"{len(vectors)} x {vectors.shape[1]}; rebuild the index from these features")
        self = cls.__new__(cls)
        self.kind, self.refine = kind, refine
        self._setup(index, vectors, None, nprobe, rerank)
        return self

    def _setup(self, index, vectors: np.ndarray, ids: np.ndarray | None, nprobe: int, rerank: int) -> None:
        self.index, self._vectors = index, vectors
        self.dim, self.size = vectors.shape[1], vectors.shape[0]
        self.ids = np.arange(self.size) if ids is None else np.asarray(ids)
        if len(self.ids) != self.size:
            raise RMCError(f"{len(self.ids)} ids for {self.size} feature rows")
        self._identity = ids is None or bool(np.array_equal(self.ids, np.arange(self.size)))
        self._id_order = None if self._identity else np.argsort(self.ids, kind="stable")
        self.margin = rerank if self.kind is not IndexKind.FLAT else REFINE_MARGIN
        self._members: np.ndarray | None = None    # restricted(): the rows searched, as a sorted array
        self._params: faiss.SearchParametersIVF | None = None
        self._keep: tuple = ()                      # what FAISS holds pointers into (restricted()'s selector)
        if self.kind is IndexKind.FLAT:
            self._max_norm = max(float(np.einsum("ij,ij->i", vectors[sl], vectors[sl]).max())
                                 for sl in _chunks(self.size))   # no N x d temporary
        else:
            self.nprobe = index.nprobe = min(nprobe, index.nlist)

    def restricted(self, rows: np.ndarray) -> "NeighbourIndex":
        """The same IVF index searching only the given rows (e.g. the clean part of D', for DeepNN), without a copy
        of their vectors: FAISS skips the other rows while scanning its lists."""
        if self.kind is IndexKind.FLAT or not self._identity:
            raise RMCError("restricted() is for an IVF index over all of D'; build a flat sub-index with ids instead")
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) == 0 or rows[0] < 0 or rows[-1] >= self.size:
            raise RMCError(f"restricted rows must lie in [0, {self.size}), got {len(rows)} rows")
        other = NeighbourIndex.__new__(NeighbourIndex)
        other.__dict__.update(self.__dict__)
        bits = np.zeros((self.size + 7) // 8, dtype=np.uint8)
        np.bitwise_or.at(bits, rows >> 3, (1 << (rows & 7)).astype(np.uint8))
        selector = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bits))
        params = faiss.SearchParametersIVF()
        params.sel, params.nprobe = selector, self.nprobe
        other._members, other._keep, other._params = rows, (bits, selector), params
        other.size = len(rows)
        return other

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The stored vectors of the given D' rows (float32, len(rows) x d)."""
        rows = np.asarray(rows)
        if self._members is not None:
            pos = np.searchsorted(self._members, rows)
            if not np.array_equal(self._members[np.minimum(pos, self.size - 1)], rows):
                raise RMCError("rows asked for are not in this index")
            return np.asarray(self._vectors[rows], dtype=np.float32)
        if self._identity:
            return np.asarray(self._vectors[rows], dtype=np.float32)
        pos = np.searchsorted(self.ids, rows, sorter=self._id_order)
        pos = cast(np.ndarray, self._id_order)[np.minimum(pos, self.size - 1)]   # set when ids are not 0..n-1
        if not np.array_equal(self.ids[pos], rows):
            raise RMCError("rows asked for are not in this index")
        return np.asarray(self._vectors[pos], dtype=np.float32)

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
        cand = np.sort(cand)                              # ascending rows: sequential pages of a memory map
        v = np.array(self._vectors[cand], dtype=np.float32)   # a copy, computed on in place
        np.subtract(v, query, out=v)
        np.multiply(v, v, out=v)
        exact = v.sum(-1)                                 # sum((v - q)^2) in float32: the definition, directly
        order = np.lexsort((cand, exact))[:k]
        return exact[order], cand[order]

    def _search_block(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.refine:
            d, p = _faiss_search(self.index, q, k, self._params)
            if (p < 0).any():
                raise RMCError(f"the approximate index found fewer than k = {k} neighbours; raise knn.nprobe "
                               "or use the flat index")
            return d, p
        out_d, out_p = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        todo, margin = np.arange(len(q)), self.margin
        while len(todo):
            kk = min(self.size, k + margin)
            approx, cand = _faiss_search(self.index, q[todo], kk, self._params)
            unsafe = np.zeros(len(todo), bool)
            for j, i in enumerate(todo):
                c = cand[j][cand[j] >= 0]                 # IVF may return fewer than kk (-1 padded)
                if len(c) < k:
                    raise RMCError(f"the approximate index found only {len(c)} of k = {k} neighbours; raise "
                                   "knn.nprobe or use the flat index")
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


def vote_counts(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Votes per class of each row's neighbours: N x num_classes counts."""
    counts = np.zeros((neighbour_labels.shape[0], num_classes), dtype=np.int64)
    np.add.at(counts, (np.arange(len(neighbour_labels))[:, None], neighbour_labels), 1)
    return counts


def vote(neighbour_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Majority vote per row (ties go to the smallest class index, deterministically)."""
    return vote_counts(neighbour_labels, num_classes).argmax(1)
