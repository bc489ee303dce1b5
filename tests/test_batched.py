"""Batched episodic RMC gives what one-at-a-time episodic RMC gives."""

import numpy as np
import pytest

from rmc.defense import RMCConfig, build_rmc
from rmc.defense.batched import BatchedEpisodic
from rmc.defense.knn import NeighbourIndex
from rmc.errors import RMCError
from rmc.models import extract_features


def _setup(tiny_trained, tiny_dprime, digits, n=5, **kw):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:n]
    q = extract_features(tiny_trained, "block3", x).numpy()
    cfg = RMCConfig(**{"k": 64, "lr": 1e-3, "max_epochs": 3, "patience": 2, "batch_size": 24, "mode": "episodic", **kw})
    return build_rmc(tiny_trained, dprime, NeighbourIndex(feats), cfg, "block3"), x, q


@pytest.mark.parametrize("backend", ["threads", "vmap"])
@pytest.mark.parametrize("extra", [{}, {"lr": 0.05, "patience": 1, "max_epochs": 5, "restore_best": True},
                                   {"scope": "bn"}, {"scope": "head"}])
def test_batched_equals_one_at_a_time(tiny_trained, tiny_dprime, digits, backend, extra):
    rmc, x, q = _setup(tiny_trained, tiny_dprime, digits, **extra)
    keys = [("s", i) for i in range(len(x))]
    one = [rmc.step(x[i:i + 1], q[i:i + 1], key=keys[i]) for i in range(len(x))]
    got = BatchedEpisodic(rmc, backend=backend, workers=2).run(x, q, keys)
    for a, b in zip(one, got, strict=True):
        assert np.array_equal(a.neighbours, b.neighbours)
        assert a.adapt_epochs == b.adapt_epochs
        assert a.prediction == b.prediction
        # threads: the same code on the same data, bit for bit; vmap: another summation order
        tol = (0, 0) if backend == "threads" else (1e-4, 2e-3)
        np.testing.assert_allclose(a.logits, b.logits, rtol=tol[0], atol=tol[1])
    if extra.get("patience") == 1:   # the early-stopping case did stop some inputs early (else it tests nothing)
        assert min(r.adapt_epochs for r in one) < 5


def test_batched_leaves_the_rmc_usable_and_checks_arguments(tiny_trained, tiny_dprime, digits):
    rmc, x, q = _setup(tiny_trained, tiny_dprime, digits, n=2)
    before = rmc.step(x[:1], q[:1], key=0).logits
    BatchedEpisodic(rmc, backend="vmap").run(x, q)
    assert rmc.step(x[:1], q[:1], key=0).logits == before
    with pytest.raises(RMCError):
        BatchedEpisodic(rmc, backend="gpu")
    with pytest.raises(RMCError):
        BatchedEpisodic(rmc).run(x, q, keys=[0])
