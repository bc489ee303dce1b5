"""The speed paths compute what the plain paths compute: fast forward, exact neighbour search, cached head inputs."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rmc.defense.core import RMC, PhaseTimer, RMCConfig, Scope, configure_model, random_shift_flip
from rmc.errors import RMCError
from rmc.defense.fastpath import FoldedConvBN, fast_forward, split_at
from rmc.defense.knn import NeighbourIndex
from rmc.models import build_model, extract_features


def _grads(model, fwd, x, y, scope):
    m = configure_model(model, scope, "block3" if hasattr(model, "block3") else "layer4")
    for p in m.parameters():
        p.grad = None
    F.cross_entropy(fwd(x), y).backward()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch,shape", [("small_cnn", (6, 1, 28, 28)), ("resnet18", (2, 3, 16, 16))])
@pytest.mark.parametrize("scope", ["all", "bn", "head"])
def test_fast_forward_same_outputs_and_gradients(arch, shape, scope):
    torch.manual_seed(0)
    model = build_model(arch, 10, shape[1])
    with torch.no_grad():                       # non-trivial batch-norm statistics
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    x, y = torch.rand(*shape), torch.randint(0, 10, (shape[0],))
    fast = fast_forward(model, x)
    assert fast is not model and any(isinstance(m, FoldedConvBN) for m in fast.modules())
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    want = _grads(model, model, x, y, scope)
    got = _grads(model, fast, x, y, scope)
    assert want.keys() == got.keys() and want
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=2e-3, atol=1e-5, msg=n)


def test_fast_forward_shares_parameters_and_falls_back():
    model = build_model("small_cnn", 10, 1).eval()
    fast = fast_forward(model, torch.rand(2, 1, 28, 28))
    with torch.no_grad():
        model.fc.bias.add_(1.0)                 # a change of the model shows in the fast path at once
    x = torch.rand(2, 1, 28, 28)
    torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:                     # data-dependent control flow: torch.fx cannot trace it
                return self.fc(x)
            return -self.fc(x)
    m = Untraceable()
    with pytest.warns(UserWarning, match="fast path unavailable"):
        assert fast_forward(m, torch.rand(2, 4)) is m


def test_augmentation_is_the_documented_shift_and_flip():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    gen = torch.Generator().manual_seed(4)
    out = random_shift_flip(x, gen, pad=2)
    g = torch.Generator().manual_seed(4)
    dy, dx = torch.randint(0, 5, (2,), generator=g), torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = F.pad(x, (2, 2, 2, 2))
    for i in range(2):
        want = padded[i, :, dy[i]:dy[i] + 5, dx[i]:dx[i] + 5]
        assert torch.equal(out[i], want.flip(-1) if flip[i] else want)


# -- neighbour search -------------------------------------------------------------------------------------
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


# -- scopes -----------------------------------------------------------------------------------------------
def test_split_at_feature_layer():
    model = build_model("small_cnn", 10, 1).eval()
    sp = split_at(model, "block3")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        h = sp.backbone(x)
        torch.testing.assert_close(sp.head(h), model(x))
        assert sp.pooled_input
        torch.testing.assert_close(sp.head(sp.head_input(h.mean((2, 3)))), model(x), rtol=1e-5, atol=1e-6)
    assert not split_at(build_model("small_cnn", 10, 1), "block2").pooled_input
    assert split_at(build_model("resnet18", 10, 3), "layer4.0.conv1") is None   # a skip connection goes around it


@pytest.mark.parametrize("mode", ["episodic", "online"])
def test_head_scope_cached_inputs_give_the_uncached_result(tiny_trained, tiny_dprime, digits, mode):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:4]
    q = extract_features(tiny_trained, "block3", x).numpy()
    runs = {}
    for cached in (True, False):
        cfg = RMCConfig(k=64, lr=5e-3, max_epochs=3, patience=2, batch_size=16, scope=Scope.HEAD, mode=mode,
                        cache_head_inputs=cached, calib_k=48, calib_flip=False)
        r = RMC(tiny_trained, dprime, NeighbourIndex(feats), cfg, "block3")
        assert (r._head is not None and r._head.stored) == cached
        runs[cached] = [r.step(x[i:i + 1], q[i:i + 1], key=i) for i in range(len(x))]
        runs[cached, "state"] = r.state_dict()
    for a, b in zip(runs[True], runs[False]):
        assert a.prediction == b.prediction
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    for k, v in runs[False, "state"].items():
        torch.testing.assert_close(runs[True, "state"][k], v, rtol=1e-4, atol=1e-5)


def test_head_cache_refuses_features_of_another_model(tiny_trained, tiny_dprime):
    dprime, feats = tiny_dprime
    cfg = RMCConfig(k=32, scope="head")
    r = RMC(tiny_trained, dprime, NeighbourIndex(feats * 2.0), cfg, "block3")   # not this model's features
    assert r._head is not None and not r._head.stored                       # falls back to computing them


# -- options ----------------------------------------------------------------------------------------------
def test_bf16_and_plain_paths_agree_and_timer_accounts(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:3]
    q = extract_features(tiny_trained, "block3", x).numpy()
    preds = {}
    for name, kw in {"fast": {}, "plain": {"fast_path": False}, "bf16": {"precision": "bf16"}}.items():
        r = RMC(tiny_trained, dprime, NeighbourIndex(feats), RMCConfig(k=64, lr=1e-3, max_epochs=2, patience=1, batch_size=32,
                                                                     calib_k=32, **kw), "block3")
        r.timer = PhaseTimer()
        preds[name] = [r.step(x[i:i + 1], q[i:i + 1]) for i in range(len(x))]
        assert r.timer.steps == len(x) and r.timer.passes() > 0
        assert set(r.timer.seconds) >= {"search", "gather", "forward", "backward", "optimizer", "validation", "predict"}
    for a, b in zip(preds["fast"], preds["plain"]):
        np.testing.assert_allclose(a.logits, b.logits, rtol=1e-3, atol=1e-3)
    assert [p.prediction for p in preds["bf16"]] == [p.prediction for p in preds["fast"]]
    with pytest.raises(RMCError):
        RMCConfig(precision="fp16")
    with pytest.raises(RMCError):
        RMCConfig(fast_path="yes")
    assert copy.deepcopy(RMCConfig(precision="bf16")).precision == "bf16"
