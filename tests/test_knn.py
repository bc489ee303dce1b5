"""Neighbour search (rmc.defense.knn): exact FAISS search equals brute force, IVF and sub-indexes."""

import numpy as np
import pytest

from rmc.defense.knn import NeighbourIndex
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
