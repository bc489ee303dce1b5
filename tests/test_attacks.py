"""Gradient attacks (rmc.attacks.gradient): budgets, effect, targeting, determinism, validation, and a
cross-check of our PGD against torchattacks' on Fashion-MNIST."""

from pathlib import Path

import pytest
import torch

from rmc.attacks import fgsm, pgd, random_targets
from rmc.data import load_dataset
from rmc.errors import RMCError
from rmc.training import TrainConfig, accuracy, predict, train_model

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def digits_model():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model, info = train_model(train, test, TrainConfig(epochs=4, batch_size=64, seed=0), progress=False)
    assert info.test_accuracy > 0.85
    return model, test.float_images(), test.labels


def test_pgd_stays_in_budget_and_range(digits_model):
    model, x, y = digits_model
    eps = 0.1
    adv = pgd(model, x, y, eps, 0.025, 10, generator=torch.Generator().manual_seed(0))
    assert adv.shape == x.shape and adv.dtype == torch.float32
    assert (adv - x).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    assert not torch.equal(adv, x)


def test_fgsm_stays_in_budget_and_range(digits_model):
    model, x, y = digits_model
    adv = fgsm(model, x, y, 0.05)
    delta = (adv - x).abs()
    assert delta.max() <= 0.05 + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    # FGSM moves every pixel by exactly eps unless clipped at 0 or 1.
    inside = (x > 0.05) & (x < 0.95)
    assert torch.allclose(delta[inside], torch.full_like(delta[inside], 0.05), atol=1e-6)


def test_attacks_lower_accuracy(digits_model):
    model, x, y = digits_model
    clean = accuracy(model, x, y)
    weak = accuracy(model, fgsm(model, x, y, 0.1), y)
    assert weak < clean - 0.2
    # 8 x 8 digits have coarse strokes: eps 0.2 is what PGD needs to break nearly everything.
    robust = accuracy(model, pgd(model, x, y, 0.2, 0.05, 10, generator=torch.Generator().manual_seed(0)), y)
    assert robust < 0.1 < 0.8 < clean
    # At equal eps, iterating makes the attack stronger than one FGSM step.
    assert accuracy(model, pgd(model, x, y, 0.1, 0.025, 10, generator=torch.Generator().manual_seed(0)), y) < weak


def test_targeted_pgd_reaches_targets(digits_model):
    model, x, y = digits_model
    targets = random_targets(y, 10, torch.Generator().manual_seed(3))
    assert (targets != y).all() and targets.min() >= 0 and targets.max() < 10
    adv = pgd(model, x, y, 0.3, 0.0375, 20, targets=targets, generator=torch.Generator().manual_seed(0))
    hit = (predict(model, adv) == targets).float().mean().item()
    assert hit > 0.85
    assert (adv - x).abs().max() <= 0.3 + 1e-6


def test_same_seed_same_output(digits_model):
    model, x, y = digits_model
    a = pgd(model, x, y, 0.1, 0.025, 3, generator=torch.Generator().manual_seed(5))
    b = pgd(model, x, y, 0.1, 0.025, 3, generator=torch.Generator().manual_seed(5))
    c = pgd(model, x, y, 0.1, 0.025, 3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    t1 = random_targets(y, 10, torch.Generator().manual_seed(1))
    assert torch.equal(t1, random_targets(y, 10, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("eps, step, steps, match", [
    (-0.1, 0.01, 10, "eps"),
    (1.5, 0.01, 10, "larger than"),
    (8.0, 0.01, 10, "8/255"),
    (float("nan"), 0.01, 10, "eps"),
    (0.1, 0.01, 0, "steps"),
    (0.1, 0.0, 10, "step size"),
    (0.1, 0.01, 2.5, "steps"),
])
def test_bad_settings_raise(digits_model, eps, step, steps, match):
    model, x, y = digits_model
    with pytest.raises(RMCError, match=match):
        pgd(model, x[:4], y[:4], eps, step, steps)


def test_bad_fgsm_eps_raises(digits_model):
    model, x, y = digits_model
    for eps in (-0.01, 1.01, 0):
        with pytest.raises(RMCError, match="eps"):
            fgsm(model, x[:4], y[:4], eps)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST (Debian package dataset-fashion-mnist) absent")
def test_pgd_matches_torchattacks_on_fashion_mnist():
    torchattacks = pytest.importorskip("torchattacks")
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    cfg = TrainConfig(epochs=1, batch_size=256, train_subset=20000, seed=0)
    model, info = train_model(train, test, cfg, progress=False)
    assert info.test_accuracy > 0.75
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:500]
    x, y = test.float_images()[idx], test.labels[idx]
    # eps 0.1 is the budget used elsewhere; 0.03 leaves robust accuracy mid-range, where a difference shows.
    for eps, step in ((0.1, 0.01), (0.03, 0.003)):
        ours = pgd(model, x, y, eps, step, 10, random_start=False)
        theirs = torchattacks.PGD(model, eps=eps, alpha=step, steps=10, random_start=False)(x, y)
        acc_ours, acc_theirs = accuracy(model, ours, y), accuracy(model, theirs, y)
        assert (theirs - x).abs().max() <= eps + 1e-6
        # Same algorithm: robust accuracies agree within one point (sum vs mean loss only changes rounding).
        assert abs(acc_ours - acc_theirs) <= 0.01, (eps, acc_ours, acc_theirs)
        assert acc_ours < info.test_accuracy - 0.2


@pytest.mark.parametrize("bad, needle", [(lambda x: x * 255, "divide by 255"), (lambda x: x.fill_(float("nan")), "NaN"),
                                         (lambda x: x[0], "N x C x H x W")])
def test_pgd_refuses_bad_images(bad, needle):
    from rmc.models import build_model
    model = build_model("small_cnn", 10, 1).eval()
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(RMCError, match=needle):
        pgd(model, bad(x.clone()), torch.zeros(2, dtype=torch.long), 0.1, 0.01, 2)
