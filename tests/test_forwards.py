"""The forwards `build_rmc` chooses (rmc.defense.forwards) give the plain model's results: fast path, bf16, the
cached head."""

import copy

import numpy as np
import pytest
import torch
from torch.fx import GraphModule

from rmc.defense import build_rmc
from rmc.defense.config import RMCConfig, Scope
from rmc.defense.knn import NeighbourIndex
from rmc.defense.optim import native_bf16
from rmc.errors import RMCError
from rmc.models import extract_features
from rmc.models.split import CachedHead


@pytest.mark.parametrize("mode", ["episodic", "online"])
def test_head_scope_cached_inputs_give_the_uncached_result(tiny_trained, tiny_dprime, digits, mode):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:4]
    q = extract_features(tiny_trained, "block3", x).numpy()
    runs = {}
    for cached in (True, False):
        cfg = RMCConfig(k=64, lr=5e-3, max_epochs=3, patience=2, batch_size=16, scope=Scope.HEAD, mode=mode,
                        cache_head_inputs=cached, calib_k=48, calib_flip=False)
        r = build_rmc(tiny_trained, dprime, NeighbourIndex(feats), cfg, "block3")
        assert (isinstance(r.forward, CachedHead) and r.forward.vectors is not None) == cached
        runs[cached] = [r.step(x[i:i + 1], q[i:i + 1], key=i) for i in range(len(x))]
        runs[cached, "state"] = r.state_dict()
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a.prediction == b.prediction
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    for k, v in runs[False, "state"].items():
        torch.testing.assert_close(runs[True, "state"][k], v, rtol=1e-4, atol=1e-5)


def test_head_cache_refuses_features_of_another_model(tiny_trained, tiny_dprime):
    dprime, feats = tiny_dprime
    cfg = RMCConfig(k=32, scope="head")
    r = build_rmc(tiny_trained, dprime, NeighbourIndex(feats * 2.0), cfg, "block3")   # not this model's features
    assert isinstance(r.forward, CachedHead) and r.forward.vectors is None    # falls back to computing them


def test_fast_bf16_and_plain_forwards_agree(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:3]
    q = extract_features(tiny_trained, "block3", x).numpy()
    preds = {}
    kinds = {"fast": {}, "plain": {"fast_path": False}}
    if native_bf16("cpu"):   # elsewhere RMC refuses bf16 (tests/test_cpu.py)
        kinds["bf16"] = {"precision": "bf16"}
    for name, kw in kinds.items():
        cfg = RMCConfig(k=64, lr=1e-3, max_epochs=2, patience=1, batch_size=32, calib_k=32, **kw)
        r = build_rmc(tiny_trained, dprime, NeighbourIndex(feats), cfg, "block3")
        assert isinstance(r.forward.module, GraphModule) == (name != "plain")
        preds[name] = [r.step(x[i:i + 1], q[i:i + 1]) for i in range(len(x))]
    for a, b in zip(preds["fast"], preds["plain"], strict=True):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-3, atol=1e-3)
    if "bf16" in preds:
        assert [p.prediction for p in preds["bf16"]] == [p.prediction for p in preds["fast"]]
    with pytest.raises(RMCError):
        RMCConfig(precision="fp16")
    with pytest.raises(RMCError):
        RMCConfig(fast_path="yes")
    assert copy.deepcopy(RMCConfig(precision="bf16")).precision == "bf16"
