"""The RMC core on problems small enough that the right answer is known."""

import copy
import math

import pytest
import torch
from torch import nn

from rmc.defense import build_rmc
from rmc.defense.config import Mode, RMCConfig, Scope
from rmc.defense.core import fine_tune, split_neighbours
from rmc.defense.knn import NeighbourIndex
from rmc.defense.scope import collect_params, configure_model
from rmc.errors import RMCError
from rmc.models import extract_features


def test_split_takes_validation_from_the_closest_20_percent():
    gen = torch.Generator().manual_seed(0)
    train, val = split_neighbours(100, 0.2, 0.25, gen)
    assert len(val) == 5 and len(train) == 95
    assert val.max() < 20                                     # validation only among the 20 closest
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))   # a partition
    assert set(range(20, 100)) <= set(train.tolist())         # all farther neighbours train
    other = split_neighbours(100, 0.2, 0.25, torch.Generator().manual_seed(1))[1]
    draws = {tuple(split_neighbours(100, 0.2, 0.25, torch.Generator().manual_seed(s))[1].tolist()) for s in range(10)}
    assert len(draws) > 1 and other.max() < 20               # random, yet always from the closest part


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _fit(y_val_flip: bool, patience=3, max_epochs=30):
    torch.manual_seed(0)
    model = _Linear()
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    yv = 1 - y[:16] if y_val_flip else y[:16]
    cfg = RMCConfig(k=64, lr=0.05, batch_size=16, max_epochs=max_epochs, patience=patience)
    return fine_tune(model, list(model.parameters()), x, y, x[:16], yv, cfg, torch.Generator().manual_seed(0))


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    # Validation labels are the opposite of the training labels: training makes validation loss rise from
    # the first epoch on, so the best epoch is 1 and training stops after exactly 1 + patience epochs.
    res = _fit(y_val_flip=True, patience=3)
    assert res.epochs == 4 and res.stopped_early


def test_no_early_stop_while_validation_improves():
    res = _fit(y_val_flip=False, patience=3, max_epochs=12)
    assert res.epochs == 12 and not res.stopped_early


def test_validation_skipped_only_where_it_cannot_change_the_result():
    def fit(patience, max_epochs, restore_best=False):
        torch.manual_seed(0)
        model = _Linear()
        x = torch.randn(64, 2)
        y = (x[:, 0] > 0).long()
        seen = []

        def forward(inp):
            seen.append(len(inp))
            return model(inp)
        cfg = RMCConfig(k=64, lr=0.05, batch_size=16, max_epochs=max_epochs, patience=patience,
                        restore_best=restore_best)
        res = fine_tune(forward, list(model.parameters()), x, y, x[:10], y[:10], cfg, torch.Generator().manual_seed(0))
        return res, seen.count(10), model.fc.weight.detach().clone()

    skipped, n_val, w_skipped = fit(patience=5, max_epochs=3)        # cannot stop before the last epoch
    assert n_val == 0 and skipped.epochs == 3 and math.isnan(skipped.best_val_loss)
    checked, n_val, w_checked = fit(patience=2, max_epochs=3)        # could stop; validation keeps improving here
    assert n_val == 3 and checked.epochs == 3 and checked.best_val_loss < 1
    assert torch.equal(w_skipped, w_checked)                         # validation has no side effect on training
    kept, n_val, _ = fit(patience=5, max_epochs=3, restore_best=True)  # picks the weights: validated
    assert n_val == 3 and kept.best_val_loss == checked.best_val_loss


def _rmc(model, dprime, feats, **kw):
    cfg = RMCConfig(**{"k": 64, "lr": 1e-3, "max_epochs": 3, "patience": 2, "batch_size": 32, **kw})
    return build_rmc(model, dprime, NeighbourIndex(feats), cfg, "block3")


def test_configure_model_freezes_batchnorm_statistics(tiny_trained):
    model = configure_model(copy.deepcopy(tiny_trained), Scope.BN)
    assert not model.training
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    before = bn.running_mean.clone()
    model(torch.rand(8, 1, 8, 8))
    assert torch.equal(before, bn.running_mean)
    assert all(p.requires_grad == any(p is q for q in collect_params(model, "bn")) for p in model.parameters())


def test_episodic_leaves_static_weights_untouched_online_drifts(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    static = {k: v.clone() for k, v in tiny_trained.state_dict().items()}
    test = digits[1]
    x = test.float_images()[:3]
    q = extract_features(tiny_trained, "block3", x).numpy()

    epi = _rmc(tiny_trained, dprime, feats, mode=Mode.EPISODIC)
    epi.step(x[:1], q[:1])
    assert any(not torch.equal(v, static[k]) for k, v in epi.model.state_dict().items())   # it did adapt ...
    epi.reset()
    assert all(torch.equal(v, static[k]) for k, v in epi.model.state_dict().items())
    a = [epi.step(x[i:i + 1], q[i:i + 1], key=i).logits for i in range(3)]
    b = [_rmc(tiny_trained, dprime, feats, mode=Mode.EPISODIC).step(x[i:i + 1], q[i:i + 1], key=i).logits
         for i in range(3)]
    assert a == b                     # ... but every input starts from the static weights, whatever came before

    onl = _rmc(tiny_trained, dprime, feats, mode=Mode.ONLINE)
    c = [onl.step(x[i:i + 1], q[i:i + 1], key=i).logits for i in range(3)]
    assert c[0] != a[0] or c[1:] != a[1:]    # online carries weights (and calibrates): results differ
    assert any(not torch.equal(v, static[k]) for k, v in onl.model.state_dict().items())
    assert all(torch.equal(v, static[k]) for k, v in tiny_trained.state_dict().items())   # caller's model intact


def test_same_seed_same_predictions_other_seed_differs(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:4]
    q = extract_features(tiny_trained, "block3", x).numpy()
    run = lambda seed: [_rmc(tiny_trained, dprime, feats, seed=seed).step(x[i:i + 1], q[i:i + 1]).logits  # noqa: E731
                        for i in range(1)] + [r.logits for r in _stream(tiny_trained, dprime, feats, x, q, seed)]
    assert run(0) == run(0)
    assert run(0) != run(1)


def _stream(model, dprime, feats, x, q, seed):
    r = _rmc(model, dprime, feats, seed=seed)
    return [r.step(x[i:i + 1], q[i:i + 1]) for i in range(len(x))]


@pytest.mark.parametrize("k,n_close,n_val", [(256, 51, 13), (1024, 204, 51), (2048, 409, 103)])
def test_split_sizes_are_the_originals(k, n_close, n_val):
    # The original takes int(0.2 K) closest and sklearn's train_test_split(test_size=0.25) rounds the test part up.
    train, val = split_neighbours(k, 0.2, 0.25, torch.Generator().manual_seed(0))
    assert len(val) == n_val and val.max() < n_close and len(train) == k - n_val
    assert set(range(n_close, k)) <= set(train.tolist()) and not set(range(n_close)) <= set(train.tolist())


def _optimizer_state(r):
    return {k: v for k, v in r.state_dict().items() if k.startswith("__optimizer__.")}


def test_stream_optimizer_is_online_state_saved_restored_and_reset(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:3]
    q = extract_features(tiny_trained, "block3", x).numpy()
    r = _rmc(tiny_trained, dprime, feats)                       # stream: the original's one Adam for the run
    assert _optimizer_state(r) == {}
    r.step(x[:1], q[:1], key=0)
    moments = _optimizer_state(r)
    assert moments and any(k.endswith(".exp_avg_sq") for k in moments)
    steps = [v for k, v in moments.items() if k.endswith(".step")]
    assert all(float(s) == float(steps[0]) > 3 for s in steps)   # adaptation and calibration share its steps
    saved = r.state_dict()
    first = r.step(x[1:2], q[1:2], key=1).logits
    assert float(next(v for k, v in _optimizer_state(r).items() if k.endswith(".step"))) > float(steps[0])
    fresh = _rmc(tiny_trained, dprime, feats)                   # resume: a new RMC given the saved state
    fresh.load_state_dict(saved)
    assert fresh.step(x[1:2], q[1:2], key=1).logits == first
    assert all(torch.equal(v, r.state_dict()[k]) for k, v in fresh.state_dict().items())
    without = _rmc(tiny_trained, dprime, feats)                 # the weights alone are not the online state
    without.load_state_dict({k: v for k, v in saved.items() if not k.startswith("__optimizer__.")})
    assert without.step(x[1:2], q[1:2], key=1).logits != first
    r.reset()
    assert _optimizer_state(r) == {}                            # the static state has a fresh optimizer


def test_per_input_optimizer_keeps_no_state(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:2]
    q = extract_features(tiny_trained, "block3", x).numpy()
    a, b = _rmc(tiny_trained, dprime, feats, optimizer="per-input"), _rmc(tiny_trained, dprime, feats)
    pa, pb = [[r.step(x[i:i + 1], q[i:i + 1], key=i).logits for i in range(2)] for r in (a, b)]
    assert a.optimizer is None and _optimizer_state(a) == {}
    assert pa[0] == pb[0] and pa[1] != pb[1]     # first adaptation identical (fresh Adam either way), then not


def test_state_save_restore_is_exact(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:3]
    q = extract_features(tiny_trained, "block3", x).numpy()
    r = _rmc(tiny_trained, dprime, feats)
    r.step(x[:1], q[:1], key=0)
    saved = r.state_dict()
    first = r.step(x[1:2], q[1:2], key=1).logits
    r.load_state_dict(saved)
    assert r.step(x[1:2], q[1:2], key=1).logits == first


@pytest.mark.parametrize("bad", [{"k": 0}, {"lr": -1.0}, {"patience": 1.5}, {"mode": "sometimes"},
                                 {"scope": "weights"}, {"closest_fraction": 1.2}, {"val_fraction": 0},
                                 {"batch_size": "128"}, {"optimizer": "sgd"}])
def test_bad_config_values_are_refused(bad):
    with pytest.raises(RMCError) as e:
        RMCConfig(**bad)
    assert "\n" not in str(e.value)


def test_k_larger_than_dprime_is_refused(tiny_trained, tiny_dprime):
    dprime, feats = tiny_dprime
    with pytest.raises(RMCError, match="exceeds"):
        _rmc(tiny_trained, dprime, feats, k=len(dprime) + 1)


def test_rmc_recovers_from_a_corrupted_static_model(digits, tiny_dprime, tiny_trained):
    """Adaptation must matter: a static model whose last layer was scrambled predicts badly; RMC, fine-tuning on
    correctly labelled neighbours, recovers most of the accuracy on test digits."""
    dprime, feats = tiny_dprime
    test = digits[1]
    x, y = test.float_images()[:20], test.labels[:20]
    q = extract_features(tiny_trained, "block3", x).numpy()
    broken = copy.deepcopy(tiny_trained)
    with torch.no_grad():
        broken.fc.weight.copy_(broken.fc.weight[torch.randperm(10, generator=torch.Generator().manual_seed(0))])
    static_acc = (broken(x).argmax(1) == y).float().mean().item()
    r = _rmc(broken, dprime, feats, mode=Mode.EPISODIC, scope=Scope.ALL, lr=1e-2, max_epochs=10, patience=3, k=128)
    preds = torch.tensor([r.step(x[i:i + 1], q[i:i + 1], key=i).prediction for i in range(len(x))])
    rmc_acc = (preds == y).float().mean().item()
    assert static_acc < 0.5 and rmc_acc >= 0.8, (static_acc, rmc_acc)
