"""RMC's per-input loop as the original runs it, on runs small enough to check by hand: the last weights kept, early
stopping's strict improvement, calibration's sample (with replacement, ceil(12.5%) held out) and its optimizer (the
stream's one Adam), and the paper preset's RMC and D' settings. studies/mutations.py checks that each test here
fails when its choice is changed."""

import math

import pytest
import torch
from torch import nn

from rmc.cli.config import load_config
from rmc.defense import build_rmc, core
from rmc.defense.config import RMCConfig
from rmc.defense.core import fine_tune
from rmc.defense.dprime import DPrime
from rmc.defense.knn import NeighbourIndex
from rmc.models import extract_features


def _problem(val_flip: bool):
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    x = torch.randn(64, 2)
    y = (x[:, 0] > 0).long()
    return model, x, y, x[:16], (1 - y[:16]) if val_flip else y[:16]


def test_fine_tuning_keeps_the_last_weights_not_the_best():
    # Validation labels opposite to the training labels: validation loss is best after epoch 1 and rises after,
    # so training stops after 1 + patience = 4 epochs. The original (Keras' EarlyStopping without
    # restore_best_weights) keeps the weights of epoch 4: those of the same 4 epochs run without validation.
    model, x, y, xv, yv = _problem(val_flip=True)
    cfg = RMCConfig(k=64, lr=0.05, batch_size=16, max_epochs=30, patience=3)
    res = fine_tune(model, list(model.parameters()), x, y, xv, yv, cfg, torch.Generator().manual_seed(0))
    assert res.epochs == 4 and res.stopped_early
    torch.manual_seed(0)
    last = nn.Linear(2, 2)                                   # the same initial weights as `model` (seed 0)
    fine_tune(last, list(last.parameters()), x, y, xv, yv,
              RMCConfig(k=64, lr=0.05, batch_size=16, max_epochs=4, patience=4, restore_best=False),
              torch.Generator().manual_seed(0))
    assert torch.equal(model.weight, last.weight) and torch.equal(model.bias, last.bias)


def test_early_stopping_counts_an_equal_validation_loss_as_no_improvement():
    # Only the weight trains and every validation input is zero, so the validation logits are the (frozen) bias and
    # the validation loss is the same every epoch: the best is epoch 1, epochs 2 and 3 do not improve on it
    # (`<`, not `<=`), and patience 2 stops training after epoch 3.
    model, x, y, _, _ = _problem(val_flip=False)
    xv, yv = torch.zeros(8, 2), torch.zeros(8, dtype=torch.long)
    cfg = RMCConfig(k=64, lr=0.05, batch_size=16, max_epochs=10, patience=2)
    res = fine_tune(model, [model.weight], x, y, xv, yv, cfg, torch.Generator().manual_seed(0))
    assert res.epochs == 3 and res.stopped_early


@pytest.fixture(scope="module")
def small_dprime(digits, tiny_trained):
    """40 training digits as a D' (one clean copy) with their block3 features."""
    train = digits[0]
    images = train.images[:40]
    dprime = DPrime(images, train.labels[:40], torch.zeros(40, dtype=torch.long), ["clean"])
    return dprime, extract_features(tiny_trained, "block3", images).numpy()


def _online(model, small_dprime, **kw):
    dprime, feats = small_dprime
    cfg = RMCConfig(**{"k": 32, "lr": 1e-3, "batch_size": 16, "max_epochs": 3, "patience": 2, "calib_k": 100,
                       "calib_flip": False, **kw})
    return build_rmc(model, dprime, NeighbourIndex(feats), cfg, "block3")


def test_calibration_draws_k_rows_of_dprime_with_replacement_and_holds_out_ceil_one_eighth(tiny_trained, small_dprime,
                                                                                           digits, monkeypatch):
    # calib_k = 100 draws from a D' of 40 rows: with replacement (the original's np.random.randint) that is 100
    # rows, repeats included; ceil(12.5) = 13 of them hold out (sklearn's test_size rounds up), 87 train.
    r = _online(tiny_trained, small_dprime)
    gathered, sizes = [], []
    real_gather, real_fit = r._gather, core.fine_tune

    def gather(rows):
        gathered.append(rows)
        return real_gather(rows)

    def fit(forward, params, x_train, y_train, x_val, y_val, *a, **k):
        sizes.append((len(x_train), len(x_val)))
        return real_fit(forward, params, x_train, y_train, x_val, y_val, *a, **k)
    r._gather = gather
    monkeypatch.setattr(core, "fine_tune", fit)
    x = digits[1].float_images()[:1]
    r.calibrate(torch.Generator().manual_seed(0))
    rows = gathered[-1]
    assert len(rows) == 100 and 0 <= rows.min() and rows.max() < 40 and len(set(rows.tolist())) < 40
    assert sizes[-1] == (87, 13)
    r.step(x, extract_features(tiny_trained, "block3", x).numpy(), key=0)   # the step's calibration: the same sizes
    assert sizes[-1] == (87, 13) and len(gathered[-1]) == 100


def test_calibration_continues_the_streams_adam(tiny_trained, small_dprime, digits):
    # One Adam for the stream (the original): after one online step its step count is every batch of the adaptation
    # and of the calibration. Adaptation: int(0.2 x 32) = 6 closest, ceil(6 / 4) = 2 validate, 30 train = 2 batches
    # of 16 per epoch; calibration: 87 train = 6 batches of 16 per epoch.
    r = _online(tiny_trained, small_dprime)
    x = digits[1].float_images()[:1]
    res = r.step(x, extract_features(tiny_trained, "block3", x).numpy(), key=0)
    assert res.calib_epochs > 0
    steps = {float(s["step"]) for s in r.optimizer.state.values()}
    assert steps == {2.0 * res.adapt_epochs + 6.0 * res.calib_epochs}


def test_paper_preset_runs_the_originals_rmc_and_dprime():
    # The original's settings (SPEC section 1; its model.py and prepare/*.py): K 2048, the closest 20% split 75/25,
    # Adam lr 1e-5 (Keras' epsilon 1e-7) over batches of 128 for up to 100 epochs with patience 5, the last weights,
    # one Adam for the stream, calibration on K of D' with 12.5% held out; D' = three PGD copies (10, 30, 100 steps,
    # eps 16/255 there, 0.1 here, step 0.01) attacking the static model's prediction.
    paper = load_config(preset="paper")
    r, a = paper.rmc, paper.augment
    assert (r.k, r.lr, r.batch_size, r.max_epochs, r.patience) == (2048, 1e-5, 128, 100, 5)
    assert (r.closest_fraction, r.val_fraction, r.calib_holdout, r.calib_k) == (0.2, 0.25, 0.125, None)
    assert (r.restore_best, r.optimizer.value, r.mode.value, r.scope.value, r.adam_eps) == (
        False, "stream", "online", "all", 1e-7)
    assert (a.steps, a.eps, a.step_size, a.random_start, a.label) == ((10, 30, 100), 0.1, 0.01, True, "predicted")
    assert math.isclose(paper.attack.pgd_step_size, 0.1 / 16)
