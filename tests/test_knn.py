"""Neighbour search (rmc.defense.knn): exact FAISS search equals brute force, IVF and sub-indexes."""

import numpy as np
import pytest

from rmc.defense.knn import IndexConfig, IndexKind, NeighbourIndex
from rmc.errors import RMCError


def _brute(feats, q, k):
    d = ((feats[None] - q[:, None]) ** 2).sum(-1)
    return np.stack([np.lexsort((np.arange(len(feats)), row))[:k] for row in d])


def test_flat_search_is_exactly_brute_force_even_with_ties():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(3000, 16)).astype(np.float32) + 20     # far from the origin: rounding matters
    feats[1000:1100] = feats[:100]                                  # exact duplicates: ties broken by row
    q = np.concatenate([feats[:40] + 1e-3, rng.normal(size=(30, 16)).astype(np.float32) + 20])
    index = NeighbourIndex(feats)
    dist, rows = index.search(q, 50)
    assert np.array_equal(rows, _brute(feats, q, 50))
    np.testing.assert_allclose(dist, np.sqrt(((feats[rows] - q[:, None]) ** 2).sum(-1)), rtol=1e-5)
    one = np.stack([index.search(q[i], 50)[1][0] for i in range(5)])   # one query at a time: same answer
    assert np.array_equal(one, rows[:5])


def test_ivf_search_and_sub_index_ids():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(4000, 8)).astype(np.float32)
    q = rng.normal(size=(20, 8)).astype(np.float32)
    exact = NeighbourIndex(feats).search(q, 10)[1]
    ivf = NeighbourIndex(feats, "ivf", nlist=16, nprobe=16)            # every list probed: exact again
    assert np.array_equal(ivf.search(q, 10)[1], exact)
    ids = np.arange(0, 8000, 2)
    sub = NeighbourIndex(feats, ids=ids)
    assert np.array_equal(sub.search(q, 10)[1], ids[exact])
    np.testing.assert_array_equal(sub.vectors(ids[[5, 7]]), feats[[5, 7]])
    with pytest.raises(RMCError):
        sub.vectors(np.array([1]))


def _clusters(n, d, seed=0, centers=20):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, d)).astype(np.float32) * 3
    return (c[rng.integers(centers, size=n)] + rng.normal(size=(n, d)).astype(np.float32)).astype(np.float32)


def test_ivfpq_with_every_list_probed_and_every_candidate_reranked_is_exact():
    feats = _clusters(3000, 16)
    q = _clusters(12, 16, seed=1)
    exact = NeighbourIndex(feats).search(q, 20)
    pq = NeighbourIndex(feats, "ivfpq", nlist=8, nprobe=8, pq_m=4, rerank=3000)   # candidates: all rows
    assert pq.kind is IndexKind.IVFPQ and pq.index.code_size == 4                  # 4 bytes per vector, not 64
    d, r = pq.search(q, 20)
    assert np.array_equal(r, exact[1])
    np.testing.assert_allclose(d, exact[0], rtol=1e-6)     # exact distances from the stored vectors, not PQ codes
    few = NeighbourIndex(feats, "ivfpq", nlist=8, nprobe=1, pq_m=4, rerank=0)    # the approximation shows
    assert not np.array_equal(few.search(q, 20)[1], exact[1])


def test_float16_features_are_searched_as_stored():
    feats = _clusters(2000, 8).astype(np.float16)
    q = _clusters(10, 8, seed=2)
    rows = NeighbourIndex(feats).search(q, 15)[1]
    assert np.array_equal(rows, _brute(feats.astype(np.float32), q, 15))
    ivf = NeighbourIndex(feats, "ivf", nlist=8, nprobe=8)
    assert np.array_equal(ivf.search(q, 15)[1], rows)
    assert ivf.vectors(np.array([3])).dtype == np.float32


def test_restricted_ivf_searches_only_its_rows_without_copying_them():
    feats = _clusters(4000, 8)
    q = _clusters(10, 8, seed=3)
    rows = np.arange(0, 4000, 3)
    ivf = NeighbourIndex(feats, "ivf", nlist=16, nprobe=16)
    sub = ivf.restricted(rows)
    assert sub.size == len(rows) and sub._vectors is ivf._vectors and ivf.size == 4000
    assert np.array_equal(sub.search(q, 25)[1], NeighbourIndex(feats[rows], ids=rows).search(q, 25)[1])
    np.testing.assert_array_equal(sub.vectors(rows[[2, 5]]), feats[rows[[2, 5]]])
    with pytest.raises(RMCError, match="not in this index"):
        sub.vectors(np.array([1]))
    with pytest.raises(RMCError, match="restricted"):
        NeighbourIndex(feats).restricted(rows)


def test_index_config_auto_kind_lists_and_refusals():
    cfg = IndexConfig(flat_max_mb=1)
    rows = 2 ** 20 // (256 * 4)                       # exactly 1 MB of float32 at d = 256
    assert cfg.kind(rows, 256) is IndexKind.FLAT and cfg.kind(rows + 1, 256) is IndexKind.IVFPQ
    assert IndexConfig().kind(500_000, 1024) is IndexKind.FLAT          # the default budget: 2 GB of float32
    assert IndexConfig().kind(600_000, 1024) is IndexKind.IVFPQ
    assert IndexConfig(index="ivf").kind(10, 4) is IndexKind.IVF
    assert cfg.lists(5_100_000) == 4096 and cfg.lists(1_000_000) == 2048 and cfg.lists(1000) == 25
    assert cfg.build_settings(10, 4) == {} and cfg.search_settings(10, 4) == {}
    s = IndexConfig(index="ivfpq", pq_m=16).search_settings(100_000, 64)
    assert s == {"kind": "ivfpq", "nlist": 512, "train_rows": 32768, "seed": 0, "pq_m": 16, "pq_bits": 8,
                 "nprobe": 64, "rerank": 2048}
    with pytest.raises(RMCError, match="does not divide the feature dimension 100"):
        IndexConfig(index="ivfpq", pq_m=64).build_settings(10_000, 100)
    for bad in ({"index": "hnsw"}, {"nprobe": 0}, {"rerank": -1}, {"nlist": 1.5}, {"seed": -1}):
        with pytest.raises(RMCError, match="knn."):
            IndexConfig(**bad)
