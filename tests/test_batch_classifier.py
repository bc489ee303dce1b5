"""A batch defense as an nn.Module (rmc.defense.batch_classifier) and the row it makes possible: AutoAttack through
DENT (Chen et al.'s DENT-AA), an attack kind with a runner (rmc.attacks.kinds)."""

import pytest
import torch
from torch.func import functional_call
from torch.nn.functional import cross_entropy

from rmc.artifacts.evalsets import EvalSet
from rmc.attacks import autoattack as aa
from rmc.attacks.kinds import ATTACK_KINDS
from rmc.attacks.protocols import AttackRowsConfig
from rmc.defense.batch_classifier import BatchClassifier
from rmc.defense.config import RMCConfig
from rmc.defense.dent import Dent, DentConfig
from rmc.errors import RMCError
from rmc.evaluation import attack_rows as ev
from rmc.evaluation.common import BaseModel


def _input_grad(fn, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(cross_entropy(fn(x), y, reduction="sum"), x)[0]


def test_the_gradient_is_that_of_the_network_adapted_to_the_batch_given(tiny_trained, digits):
    x, y = digits[1].float_images()[:8], digits[1].labels[:8]
    dent = Dent(tiny_trained, DentConfig())
    clf = BatchClassifier(dent)
    got = _input_grad(clf, x, y)

    adapted = Dent(tiny_trained, DentConfig()).trial(x, keep=True).adapted.weights
    want = _input_grad(lambda z: functional_call(dent.model, adapted, (z,)), x, y)
    assert torch.allclose(got, want, atol=1e-6)

    static = _input_grad(tiny_trained, x, y)
    assert (got - static).abs().max() > 1e-3 * static.abs().max()      # not the static model's gradient
    # adapted to *this* batch: the same 8 inputs adapted among 8 others (the diversity term couples them) differ
    wider = Dent(tiny_trained, DentConfig()).trial(digits[1].float_images()[:16], keep=True).adapted.weights
    first8 = {k: v[:8] for k, v in wider.items()}
    other = _input_grad(lambda z: functional_call(dent.model, first8, (z,)), x, y)
    assert (got - other).abs().max() > 1e-4 * got.abs().max()


def test_each_call_adapts_from_the_static_weights_and_leaves_the_defense_as_it_was(tiny_trained, digits):
    x = digits[1].float_images()[:8]
    dent = Dent(tiny_trained, DentConfig())
    before = dent.snapshot().weights
    clf = BatchClassifier(dent)
    with torch.no_grad():                       # the adaptation needs autograd even under the caller's no_grad
        first, second = clf(x), clf(x)
    assert torch.equal(first, second) and clf.adaptations == 2
    assert all(torch.equal(before[k], v) for k, v in dent.snapshot().weights.items())
    assert torch.equal(first, Dent(tiny_trained, DentConfig()).trial(x).logits)   # the deployed prediction


def test_only_a_batch_defense_is_wrapped(tiny_trained, digits):
    with pytest.raises(RMCError, match="batch defense.*RMCClassifier"):
        BatchClassifier(tiny_trained)
    with pytest.raises(RMCError, match="empty batch"):
        BatchClassifier(Dent(tiny_trained, DentConfig()))(digits[1].float_images()[:0])


def _row(tiny_trained, tiny_dprime, digits, out, n=6, batch_size=4):
    dprime, feats = tiny_dprime
    x, y = digits[1].float_images()[:n], digits[1].labels[:n]
    clean = EvalSet("clean", x, y, None, torch.arange(n), {"kind": "clean", "dataset": "digits", "n": n, "seed": 0,
                                                           "source_model_sha256": "b" * 64})
    base = BaseModel("standard", tiny_trained, "b" * 64, "block3", feats)
    acfg = AttackRowsConfig(attacks=["autoattack-through"], protocols=["chen2022"], eps=0.3, transfer_pgd=False)
    return ev.evaluate_attacks(base, dprime, [clean], RMCConfig(), acfg, out, 10, progress=False,
                               log=lambda s: None, defenses=("dent",),
                               settings={"dent": DentConfig(steps=2, batch_size=batch_size)})


def test_autoattack_through_dent_is_a_row_in_the_defenses_batches_and_reused(tiny_trained, tiny_dprime, digits,
                                                                            tmp_path, monkeypatch):
    assert ATTACK_KINDS["autoattack-through"].runner == "rmc.attacks.autoattack:autoattack"
    calls = []
    real = aa.autoattack

    def spy(model, x, y, eps, n_classes, **kw):
        assert isinstance(model, BatchClassifier) and isinstance(model.defense, Dent)
        calls.append((len(x), kw["batch_size"]))
        return real(model, x, y, eps, n_classes, **kw)
    monkeypatch.setattr(aa, "autoattack", spy)
    rows = _row(tiny_trained, tiny_dprime, digits, tmp_path)
    assert calls == [(4, 4), (2, 4)]                       # the defense's own batches (DENT-AA: bs = its batch size)
    row = rows[0]
    assert row.kind == ev.THROUGH and row.label.startswith("AutoAttack through DENT") and "N=6" in row.label
    assert set(row.records) == {"dent"} and len(row.records["dent"]) == 6
    assert row.info["adaptations"] > 6 and row.info["attack_seconds"] > 0
    # eps 0.3 on 8x8 digits: AutoAttack through the adapting model breaks (nearly) everything the clean pass got right
    clean = Dent(tiny_trained, DentConfig(steps=2, batch_size=4))
    x, y = digits[1].float_images()[:6], digits[1].labels[:6]
    clean_right = sum(int((clean.trial(x[i:i + 4]).logits.argmax(1) == y[i:i + 4]).sum()) for i in (0, 4))
    robust = sum(r["pred"] == r["label"] for r in row.records["dent"])
    assert clean_right >= 4 and robust <= 1
    worst = rows[-1]
    assert worst.records["dent"] and sum(r["pred"] == r["label"] for r in worst.records["dent"]) <= robust
    table = ev.attack_table({"standard": rows})
    assert any(label.startswith("AutoAttack through DENT") for label in table.rows)

    def fails(*a, **k):
        raise AssertionError("a finished row is read back, not attacked again")
    monkeypatch.setattr(aa, "autoattack", fails)
    again = _row(tiny_trained, tiny_dprime, digits, tmp_path)[0]
    assert again.records == row.records and again.info["attack_seconds"] == row.info["attack_seconds"]


def test_a_runner_kind_does_not_run_against_rmc_as_rounds(tiny_trained, tiny_dprime, digits, tmp_path, monkeypatch):
    """RMC's AutoAttack-through-the-defense row is the rand row; the runner kind must not become PGD rounds."""
    from rmc.evaluation import attack_rows
    monkeypatch.setattr(attack_rows, "AwareStream", lambda *a, **k: pytest.fail("rounds started for a runner kind"))
    dprime, feats = tiny_dprime
    n = 3
    x, y = digits[1].float_images()[:n], digits[1].labels[:n]
    clean = EvalSet("clean", x, y, None, torch.arange(n), {"kind": "clean", "dataset": "digits", "n": n, "seed": 0,
                                                           "source_model_sha256": "b" * 64})
    base = BaseModel("standard", tiny_trained, "b" * 64, "block3", feats)
    acfg = AttackRowsConfig(attacks=["autoattack-through"], protocols=["chen2022"], eps=0.3, transfer_pgd=False)
    logs = []
    rows = ev.evaluate_attacks(base, dprime, [clean], RMCConfig(k=32, calib_k=16, max_epochs=1), acfg,
                               tmp_path, 10, progress=False, log=logs.append)
    assert [r.kind for r in rows] == [ev.WORST] and any("rand row" in s for s in logs)


def test_a_stopped_row_resumes_after_its_last_finished_batch(tiny_trained, tiny_dprime, digits, tmp_path,
                                                             monkeypatch):
    full = _row(tiny_trained, tiny_dprime, digits, tmp_path / "full")[0]
    real, calls = aa.autoattack, []

    def dies_on_the_second_batch(model, x, y, eps, n_classes, **kw):
        calls.append(len(x))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, x, y, eps, n_classes, **kw)
    monkeypatch.setattr(aa, "autoattack", dies_on_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _row(tiny_trained, tiny_dprime, digits, tmp_path / "b")
    assert list((tmp_path / "b").rglob("partial.safetensors"))
    calls.clear()
    monkeypatch.setattr(aa, "autoattack", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    resumed = _row(tiny_trained, tiny_dprime, digits, tmp_path / "b")[0]
    assert calls == [2]                                           # only the unfinished batch (of 2) is attacked
    preds = lambda row: [(r["index"], r["label"], r["pred"]) for r in row.records["dent"]]  # noqa: E731
    assert preds(resumed) == preds(full) and not list((tmp_path / "b").rglob("partial.safetensors"))
