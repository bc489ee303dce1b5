"""RMCClassifier: RMC as an nn.Module that attack libraries take as it is."""

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

from rmc.defense import RMCConfig, build_rmc
from rmc.defense.classifier import RMCClassifier
from rmc.defense.knn import NeighbourIndex
from rmc.errors import RMCError
from rmc.models import extract_features


@pytest.fixture(scope="module")
def broken(tiny_trained):
    """Last layer zeroed: the static model says class 0 to everything; RMC, fine-tuning on neighbours, recovers."""
    model = copy.deepcopy(tiny_trained)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    return model.eval()


def _clf(model, tiny_dprime, stateful=False, **kw):
    dprime, feats = tiny_dprime
    cfg = RMCConfig(**{"k": 64, "lr": 1e-2, "max_epochs": 4, "patience": 2, "batch_size": 32, "calib_k": 64,
                       "calib_flip": False, **kw})
    return RMCClassifier(build_rmc(model, dprime, NeighbourIndex(feats), cfg, "block3"), model, "block3",
                         stateful=stateful)


def _state(clf):
    return {k: v.clone() for k, v in clf.rmc.state_dict().items()}


def test_forward_runs_the_defense(broken, tiny_dprime, digits):
    test = digits[1]
    x, y = test.float_images()[:10], test.labels[:10]
    clf = _clf(broken, tiny_dprime, mode="episodic")
    with torch.no_grad():                     # attack libraries predict under no_grad: adaptation must still run
        logits = clf(x)
    assert logits.shape == (10, 10) and clf.inputs_seen == 10
    assert (broken(x).argmax(1) == y).float().mean() < 0.2
    assert (logits.argmax(1) == y).float().mean() >= 0.8      # the adapted networks classify, not the static one
    q = extract_features(broken, "block3", x[:1]).numpy()
    assert torch.allclose(logits[0], clf.rmc.trial(x[:1], q, "classifier").logits, atol=1e-6)


def test_stateless_is_a_deterministic_function_stateful_is_the_online_stream(tiny_trained, tiny_dprime, digits):
    x = digits[1].float_images()[:3]
    clf = _clf(tiny_trained, tiny_dprime)
    before = _state(clf)
    a, b = clf(x), clf(x)
    assert torch.equal(a, b)                                  # AutoAttack's randomness check would not fire
    assert all(torch.equal(v, before[k]) for k, v in clf.rmc.state_dict().items()) and clf.rmc.steps_done == 0

    online = _clf(tiny_trained, tiny_dprime, stateful=True)
    reference = _clf(tiny_trained, tiny_dprime).rmc
    got = online(x)
    q = extract_features(tiny_trained, "block3", x).numpy()
    want = [reference.step(x[i:i + 1], q[i:i + 1]).logits for i in range(3)]   # the same stream through RMC.step
    assert torch.allclose(got, torch.tensor(want), atol=1e-6)
    assert online.rmc.steps_done == 3 and all(torch.equal(v, reference.state_dict()[k])
                                              for k, v in online.rmc.state_dict().items())


def test_gradient_is_the_adapted_networks_and_forward_calls_backward(tiny_trained, tiny_dprime, digits):
    x = digits[1].float_images()[:1].requires_grad_(True)
    clf = _clf(tiny_trained, tiny_dprime)
    # AutoAttack's check_dynamic traces the forward pass for calls of `backward`/`grad` and warns "it seems to
    # be a dynamic defense" if there are any: RMC's fine-tuning makes them on every input.
    calls = {"backward": 0, "grad": 0, "_make_grads": 0}

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name in calls:
            calls[frame.f_code.co_name] += 1
    sys.settrace(tracer)
    try:
        out = clf(x)
    finally:
        sys.settrace(None)
    assert sum(calls.values()) > 0
    (g,) = torch.autograd.grad(out[0, 3], x)
    q = extract_features(tiny_trained, "block3", x.detach()).numpy()
    adapted = copy.deepcopy(tiny_trained)
    adapted.load_state_dict(clf.rmc.trial(x.detach(), q, "classifier", keep=True).adapted.weights)
    clf.rmc.reset()
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad(adapted.eval()(x2)[0, 3], x2)
    assert g.abs().sum() > 0 and torch.allclose(g, g2, atol=1e-6)


def test_train_mode_requests_leave_batchnorm_frozen(tiny_trained, tiny_dprime):
    clf = _clf(tiny_trained, tiny_dprime)
    clf.train()
    assert clf.training and not clf.rmc.model.training and not clf.static.training
    with pytest.raises(RMCError, match="N x C x H x W"):
        clf(torch.rand(1, 8, 8))


def test_torchattacks_pgd_runs_against_it(tiny_trained, tiny_dprime, digits):
    import torchattacks
    test = digits[1]
    x, y = test.float_images()[:3], test.labels[:3]
    clf = _clf(tiny_trained, tiny_dprime, lr=1e-4)      # a gentle adaptation: its cross-entropy gradient is not zero
    atk = torchattacks.PGD(clf, eps=0.2, alpha=0.1, steps=2, random_start=True)
    adv = atk(x, y)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 0.2 + 1e-6 and not torch.equal(adv, x)
    assert clf.inputs_seen == 3 * 2                          # one full RMC adaptation per input per PGD step
    assert clf.rmc.steps_done == 0                           # stateless: the attack left the defense as it was


def test_art_attack_runs_against_it(tiny_trained, tiny_dprime, digits):
    from art.attacks.evasion import FastGradientMethod
    from art.estimators.classification import PyTorchClassifier
    test = digits[1]
    x, y = test.float_images()[:3].numpy(), test.labels[:3].numpy()
    clf = _clf(tiny_trained, tiny_dprime, lr=1e-4)      # a gentle adaptation: its cross-entropy gradient is not zero
    est = PyTorchClassifier(clf, loss=nn.CrossEntropyLoss(), input_shape=(1, 8, 8), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="cpu")
    adv = FastGradientMethod(est, eps=0.2, batch_size=3).generate(x, y=y)
    assert adv.shape == x.shape and np.abs(adv - x).max() <= 0.2 + 1e-6 and np.abs(adv - x).max() > 0.1
    preds = est.predict(adv)
    assert preds.shape == (3, 10)
    assert np.allclose(preds, clf(torch.from_numpy(adv)).detach().numpy(), atol=1e-5)
