"""Defense-aware attacks on batch-transductive defenses (rmc.attacks.batch_aware) and their evaluation
(rmc.evaluation.batch_defense): the same protocol checks as RMC's where they apply, on every batch defense in
FACTORIES (a miniature one here; DENT's module adds its own)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from model_set_recorder import Recorder

from rmc.attacks import batch_aware as ba
from rmc.attacks.batch_aware import BatchRowsConfig, attack_batch, batch_order, error, margin_loss, true_margin
from rmc.attacks.defense_aware import AttackRowsConfig
from rmc.defense.dent import Dent, DentConfig
from rmc.errors import RMCError
from rmc.evaluation.batch_defense import run_batches
from rmc.interface import Adaptation, Defense


class BatchStats:
    """A batch-transductive defense in miniature (test-time batch-norm statistics, Schneider et al. 2020): the
    static model, every batch norm normalising with the statistics of the test batch."""
    adaptation = Adaptation.BATCH

    def __init__(self, model):
        self.model = copy.deepcopy(model).eval()
        self.static = self.state_dict_copy()

    def state_dict_copy(self):
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def reset(self):
        self.model.load_state_dict(self.static)

    def snapshot(self):
        return self.state_dict_copy()

    def restore(self, snap):
        self.model.load_state_dict(snap)

    def trial(self, x, features=None, key=None, rows=None, keep=False):
        self.reset()
        norms = [m for m in self.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        with torch.no_grad():
            for m in norms:
                m.train()
                m.momentum = 1.0          # the running statistics become the batch's
            self.model(x)
            for m in norms:
                m.eval()
            logits = self.model(x)
        return SimpleNamespace(logits=logits, adapted=SimpleNamespace(weights=self.snapshot()) if keep else None,
                               adapt_epochs=1)

    def commit(self, trial):
        self.reset()
        return 0

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


FACTORIES = {"batch-stats": lambda model: BatchStats(model), "dent": lambda model: Dent(model, DentConfig())}


@pytest.fixture(params=sorted(FACTORIES))
def make(request):
    return FACTORIES[request.param]


def _batch(digits, n=8, start=0):
    return digits[1].float_images()[start:start + n], digits[1].labels[start:start + n]


def test_the_miniature_is_a_defense(tiny_trained):
    assert isinstance(BatchStats(tiny_trained), Defense)


def test_batch_order_cuts_consecutive_batches_and_reorder_sorts_labels_within_two_batch_windows():
    y = torch.tensor([3, 1, 2, 1, 0, 3, 2, 0, 1, 5])
    plain = batch_order(y, 3, reorder=False)
    assert [b.tolist() for b in plain] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    mixed = batch_order(y, 2, reorder=True)   # windows of 4: [0..3], [4..7], [8, 9]
    flat = np.concatenate(mixed)
    assert sorted(flat.tolist()) == list(range(10)) and [len(b) for b in mixed] == [2, 2, 2, 2, 2]
    assert flat.tolist() == [1, 3, 2, 0, 4, 7, 6, 5, 8, 9]     # stable: the two 1s keep their order
    assert batch_order(y[:0], 4, reorder=True) == []


def test_losses_by_hand():
    logits = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]]])        # 1 input x 2 models x 3 classes, label 0
    y = torch.tensor([0])
    # untargeted margin per model: best other - true = 1 - 3 = -2 and 2 - 0 = 2
    assert margin_loss("gmsa-avg")(logits, y).item() == pytest.approx(0.0)
    assert margin_loss("gmsa-min")(logits, y).item() == pytest.approx(-2.0)
    # towards class 2: logit 2 - true = -3 and 1
    assert margin_loss("gmsa-min", torch.tensor([2]))(logits, y).item() == pytest.approx(-3.0)
    p = logits.softmax(2)[0]
    wrong = [float(p[0, 1:].max()), float(p[1, 1:].max())]   # largest wrong-class probability per model
    assert error("gmsa-min", logits, y).item() == pytest.approx(min(wrong))
    assert error("gmsa-avg", logits, y).item() == pytest.approx(sum(wrong) / 2)
    assert true_margin(logits[:, 1], y).item() == pytest.approx(-2.0)


@pytest.mark.parametrize("kind", ["fpa", "gmsa-avg", "gmsa-min"])
def test_round_one_attacks_the_static_model_and_gmsa_keeps_it_in_the_set(tiny_trained, digits, make, monkeypatch,
                                                                         kind):
    rec = Recorder()
    monkeypatch.setattr(ba, "ModelSet", rec.cls)
    x, y = _batch(digits)
    acfg = AttackRowsConfig(eps=0.05, strong_fallback=False)
    attack_batch(make(tiny_trained), tiny_trained, x, y, kind, "chen2022", acfg,
                 BatchRowsConfig(rounds=3, steps=2, restarts=1, targeted=False), 10)
    with torch.no_grad():
        static = tiny_trained(x)
        outs = [s(x) for s in rec.sets]
    assert [len(s.models) for s in rec.sets] == ([1, 1, 1] if kind == "fpa" else [1, 2, 3])
    assert torch.allclose(outs[0][:, 0], static, atol=1e-5)                          # round 1: the static model
    for out in outs[1:]:
        assert torch.allclose(out[:, 0], static, atol=1e-5) == (kind != "fpa")       # F0 stays in the GMSA set
        assert not torch.allclose(out[:, -1], static, atol=1e-3)                     # the adapted model joined


@pytest.mark.parametrize("protocol, restarts, factor", [("chen2022", 2, 1), ("strong", 4, 2)])
def test_gmsa_min_iterations_grow_with_the_number_of_models(tiny_trained, digits, make, monkeypatch, protocol,
                                                            restarts, factor):
    rec = Recorder()
    monkeypatch.setattr(ba, "ModelSet", rec.cls)
    x, y = _batch(digits)
    acfg = AttackRowsConfig(eps=0.05, strong_steps_factor=2, strong_restarts=2, strong_fallback=False)
    res = attack_batch(make(tiny_trained), tiny_trained, x, y, "gmsa-min", protocol, acfg,
                       BatchRowsConfig(rounds=3, steps=3, restarts=2, targeted=False), 10)
    assert [r.iterations for r in res.rounds] == [3 * factor * r for r in (1, 2, 3)]
    # per round: the clean batch's error, then per run PGD (start, iterations, last iterate) and the run's error
    assert [s.calls for s in rec.sets] == [1 + restarts * (3 * factor * r + 3) for r in (1, 2, 3)]


def test_targeted_runs_go_towards_every_other_class(tiny_trained, digits, make, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(ba, "ModelSet", rec.cls)
    x, y = _batch(digits)
    attack_batch(make(tiny_trained), tiny_trained, x, y, "fpa", "chen2022", AttackRowsConfig(eps=0.05),
                 BatchRowsConfig(rounds=1, steps=2, restarts=1, targeted=True), 10)
    assert rec.sets[0].calls == 1 + (1 + 9) * (2 + 3)      # 1 untargeted + 9 targeted runs


def test_every_trial_starts_from_the_saved_state_and_the_verdict_is_the_defenses_own(tiny_trained, digits, make):
    d = make(tiny_trained)
    start = d.snapshot()
    seen, real = [], d.trial

    def spying(xb, *a, **k):
        seen.append(d.snapshot())
        return real(xb, *a, **k)
    d.trial = spying
    x, y = _batch(digits)
    res = attack_batch(d, tiny_trained, x, y, "gmsa-avg", "strong", AttackRowsConfig(eps=0.2),
                       BatchRowsConfig(rounds=2, steps=3, restarts=1, targeted=False), 10)
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a) if isinstance(a, dict) else \
        all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)  # noqa: E731
    assert len(seen) >= 1 + 2 + 1 + 2 + 1 and all(same(s, start) for s in seen)   # clean, rounds, composed, fallback
    assert same(d.snapshot(), start)                     # committed: back where it started
    fresh = make(tiny_trained).trial(res.x_adv).logits.argmax(1).tolist()
    assert res.predictions == fresh
    assert (res.x_adv - x).abs().max() <= 0.2 + 1e-6 and 0 <= res.x_adv.min() <= res.x_adv.max() <= 1


def test_chen2022_keeps_the_clean_batch_unless_a_round_lowers_the_batch_accuracy(tiny_trained, digits, make):
    x, y = _batch(digits)
    brows = BatchRowsConfig(rounds=3, steps=3, restarts=1, targeted=False)
    calm = attack_batch(make(tiny_trained), tiny_trained, x, y, "fpa", "chen2022", AttackRowsConfig(eps=1e-4), brows,
                        10)
    assert torch.equal(calm.x_adv, x) and set(calm.chosen_round) == {0}
    res = attack_batch(make(tiny_trained), tiny_trained, x, y, "fpa", "chen2022", AttackRowsConfig(eps=0.3), brows, 10)
    accs = [r.accuracy for r in res.rounds]
    clean = float((make(tiny_trained).trial(x).logits.argmax(1) == y).float().mean())
    got = float(np.mean([p == int(t) for p, t in zip(res.predictions, y, strict=True)]))
    assert min(accs) < clean and got == min(accs)          # the lowest batch accuracy over the rounds
    first = accs.index(min(accs)) + 1
    assert set(res.chosen_round) == {first} and torch.equal(res.x_adv, res.rounds[first - 1].candidate)


def test_strong_is_never_weaker_than_chen2022_on_a_batch(tiny_trained, digits, make):
    brows = BatchRowsConfig(rounds=2, steps=3, restarts=1, targeted=False)
    acfg = AttackRowsConfig(eps=0.15)
    for start in (0, 8, 16):
        x, y = _batch(digits, 8, start)
        acc = {}
        for protocol in ("chen2022", "strong"):
            res = attack_batch(make(tiny_trained), tiny_trained, x, y, "fpa", protocol, acfg, brows, 10)
            acc[protocol] = float(np.mean([p == int(t) for p, t in zip(res.predictions, y, strict=True)]))
        assert acc["strong"] <= acc["chen2022"], (start, acc)


def test_run_batches_keeps_input_order_and_batches_of_the_defense(tiny_trained, digits, make):
    x, y = _batch(digits, 10)
    recs = run_batches(make(tiny_trained), x, y, None, 4, reorder=True)
    assert [r["index"] for r in recs] == list(range(10))
    order = batch_order(y, 4, True)
    for b, pos in enumerate(order):
        assert {recs[i]["batch"] for i in pos.tolist()} == {b}
        want = make(tiny_trained).trial(x[pos]).logits.argmax(1).tolist()
        assert [recs[i]["pred"] for i in pos.tolist()] == want


@pytest.mark.parametrize("bad, match", [({"rounds": 0}, "batch_rows.rounds"), ({"steps": 1.5}, "batch_rows.steps"),
                                        ({"restarts": -1}, "batch_rows.restarts"),
                                        ({"targeted": "yes"}, "batch_rows.targeted")])
def test_bad_batch_row_settings_are_refused_in_one_line(bad, match):
    with pytest.raises(RMCError, match=match) as e:
        BatchRowsConfig(**bad)
    assert "\n" not in str(e.value)


def test_a_damaged_or_foreign_records_file_is_refused_in_one_line(tmp_path):
    from rmc.evaluation.batch_defense import finished
    path = tmp_path / "dent.json"
    assert finished(path, "fp", 2) is None                                           # not there: compute
    path.write_text('{"fingerprint": "fp", "records": [{"index": 0, "label": 1, "pred": "x"}]}')
    with pytest.raises(RMCError, match=r"records\[0\]\.pred") as e:
        finished(path, "fp", 1)
    assert "\n" not in str(e.value)
    path.write_text('{"fingerprint": "other", "records": []}')
    with pytest.raises(RMCError, match="other settings"):
        finished(path, "fp", 0)
    path.write_text('{"fingerprint": "fp", "records": [{"index": 0, "label": 1, "pred": 1}]}')
    assert finished(path, "fp", 2) is None and finished(path, "fp", 1) == [{"index": 0, "label": 1, "pred": 1}]
