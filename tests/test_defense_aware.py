"""Defense-aware attacks (FPA, GMSA-AVG, GMSA-MIN) on RMC, the AutoAttack wrapper, and the attack rows."""

import copy
import json
import math
from typing import ClassVar

import pytest
import torch
from model_set_recorder import Recorder

from rmc.artifacts.evalsets import EvalSet
from rmc.attacks import defense_aware as da
from rmc.attacks.autoattack import autoattack
from rmc.attacks.defense_aware import (
    AttackRowsConfig,
    ModelSet,
    attack_input,
    attack_stream,
    ensemble_loss,
    initial_candidates,
    pgd_best,
)
from rmc.cli.config import load_config
from rmc.defense import build_rmc
from rmc.defense.config import RMCConfig
from rmc.defense.knn import NeighbourIndex
from rmc.errors import RMCError
from rmc.evaluation import attack_rows as ev
from rmc.evaluation.driver import BaseModel
from rmc.models import extract_features


@pytest.fixture(scope="module")
def broken(tiny_trained):
    """The static model with its last layer zeroed: it predicts class 0 for everything and its loss has zero
    gradient with respect to the input, so PGD against it (the transfer attack) is only its random start. Its
    features are intact, so RMC, which fine-tunes all layers on correctly labelled neighbours, recovers."""
    model = copy.deepcopy(tiny_trained)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
    return model.eval()


def _rmc(model, dprime, feats, **kw):
    cfg = RMCConfig(**{"k": 128, "lr": 1e-2, "max_epochs": 10, "patience": 3, "batch_size": 32, "calib_k": 96,
                       "calib_flip": False, **kw})
    return build_rmc(model, dprime, NeighbourIndex(feats), cfg, "block3")


def _states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _score(model, dprime, feats, images, keys, **kw):
    """Predictions of a fresh RMC run over `images` in order."""
    r = _rmc(model, dprime, feats, **kw)
    q = extract_features(model, "block3", images).numpy()
    return torch.tensor([r.step(images[i:i + 1], q[i:i + 1], key=keys[i]).prediction for i in range(len(images))])


@pytest.mark.parametrize("mode", ["online", "episodic"])
def test_kept_trial_committed_after_other_trials_is_exactly_one_rmc_step(tiny_trained, tiny_dprime, digits, mode):
    # The attack tries several candidates, restoring RMC in between, then commits the chosen one: that must equal
    # RMC.step on the chosen input bit for bit.
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:3]
    q = extract_features(tiny_trained, "block3", x).numpy()
    a, b = _rmc(tiny_trained, dprime, feats, mode=mode), _rmc(tiny_trained, dprime, feats, mode=mode)
    for i in range(2):
        res = a.step(x[i:i + 1], q[i:i + 1], key=("s", i))
        start = b.snapshot()
        t = b.trial(x[i:i + 1], q[i:i + 1], ("s", i), keep=True)
        b.restore(start)
        other = b.trial(x[2:], q[2:], ("s", i), keep=True)          # another candidate, tried and undone
        assert not _states_equal(t.adapted.weights, other.adapted.weights)
        b.restore(start)
        assert t.logits.tolist() == res.logits
        calib = b.commit(t)
        assert calib == res.calib_epochs and b.steps_done == a.steps_done
        assert _states_equal(a.state_dict(), b.state_dict())
    assert mode == "episodic" or calib > 0


def test_state_snapshot_restore_is_exact(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:2]
    q = extract_features(tiny_trained, "block3", x).numpy()
    r = _rmc(tiny_trained, dprime, feats)
    r.step(x[:1], q[:1], key=0)                     # a drifted online state, not the static one
    before = {k: v.clone() for k, v in r.model.state_dict().items()}
    snap = r.snapshot()
    r.step(x[1:], q[1:], key=1)
    assert not _states_equal(before, r.model.state_dict()) and r.steps_done == 2
    r.restore(snap)
    assert _states_equal(before, r.model.state_dict()) and r.steps_done == 1
    snap.weights[next(iter(snap.weights))].add_(1.0)   # the snapshot is a copy, not a view of the live weights
    assert _states_equal(before, r.model.state_dict())


@pytest.mark.parametrize("protocol", ["chen2022", "strong"])
def test_attack_input_leaves_rmc_as_if_it_had_seen_only_the_chosen_candidate(broken, tiny_dprime, digits, protocol):
    """Every round is undone exactly: after the attack, the attacker's RMC is in the state one step on the chosen
    candidate from the saved state gives, under the verdict's key: the scored RMC's key for `strong` (its RMC is the
    scored one), a key of the attacker's own for `chen2022` (its own copy of RMC, its own randomness)."""
    dprime, feats = tiny_dprime
    test = digits[1]
    x, y = test.float_images()[:4], test.labels[:4]
    acfg = AttackRowsConfig(rounds=3, steps=5, eps=0.5)
    attacked, replay = _rmc(broken, dprime, feats), _rmc(broken, dprime, feats)
    rounds_run = []
    for i in range(len(x)):
        res = attack_input(attacked, broken, "block3", x[i:i + 1], int(y[i]), "gmsa-min", acfg, key=i,
                           protocol=protocol)
        rounds_run.append(len(res.rounds))
        q = extract_features(broken, "block3", res.x_adv).numpy()
        assert (res.verdict_key == i) == (protocol == "strong") and res.attacker_rmc == acfg.lane(protocol).attacker_rmc
        step = replay.step(res.x_adv, q, key=res.verdict_key)
        assert step.logits == res.logits and step.prediction == res.prediction
        assert _states_equal(attacked.state_dict(), replay.state_dict())
        assert attacked.steps_done == replay.steps_done == i + 1
        assert (res.x_adv - x[i:i + 1]).abs().max() <= 0.5 + 1e-6 and 0 <= res.x_adv.min() <= res.x_adv.max() <= 1
        main = [r for r in res.rounds if r.lane == protocol]
        assert len(main) == 3 or main[-1].margin < 0       # stops early only on success
    assert max(rounds_run) > 1     # several rounds were tried and undone before RMC's real step: the check bites


@pytest.fixture(scope="module")
def transfer_case(broken, tiny_dprime, digits):
    """16 test digits, the transfer PGD set against the broken static model, and RMC's accuracy on it."""
    dprime, feats = tiny_dprime
    test = digits[1]
    x, y = test.float_images()[:16], test.labels[:16]
    acfg = AttackRowsConfig(rounds=3, steps=10, eps=0.3)
    keys = list(range(len(x)))
    transfer = initial_candidates(broken, x, y, acfg)
    assert (broken(x).argmax(1) == y).float().mean() < 0.2                          # the static model is broken
    assert (_score(broken, dprime, feats, x, keys, mode="episodic") == y).float().mean() >= 0.9   # RMC recovers
    transfer_acc = (_score(broken, dprime, feats, transfer, keys, mode="episodic") == y).float().mean().item()
    return x, y, keys, acfg, transfer_acc


# strong: on this model chen2022's cross-entropy stalls (the static model's gradient is zero; the adapted models
# are confident enough for it to underflow), which is the gradient masking the margin loss is there for.
@pytest.mark.parametrize("kind, protocol", [("fpa", "strong"), ("gmsa-avg", "strong"), ("gmsa-min", "strong")])
def test_defense_aware_attacks_beat_the_transfer_attack(broken, tiny_dprime, transfer_case, kind, protocol):
    """Transfer PGD against the broken static model has no gradient to follow, so RMC (which recovers) stays
    accurate on it; the defense-aware attacks follow the adapted models' gradients and must do much better."""
    dprime, feats = tiny_dprime
    x, y, keys, acfg, transfer_acc = transfer_case
    res = attack_stream(_rmc(broken, dprime, feats, mode="episodic"), broken, "block3", x, y, kind, acfg, keys,
                        protocol=protocol)
    rescored = _score(broken, dprime, feats, res.images, keys, mode="episodic")
    assert rescored.tolist() == res.predictions          # the fresh run confirms the attack's verdicts
    attack_acc = (rescored == y).float().mean().item()
    assert transfer_acc >= 0.8 and attack_acc <= transfer_acc - 0.5, (transfer_acc, attack_acc)
    assert (res.images - x).abs().max() <= 0.3 + 1e-6


def test_cross_entropy_gradient_vanishes_on_an_overconfident_adapted_model_margin_does_not(broken, tiny_dprime, digits):
    # Why the default loss is the margin: fine-tuning on neighbours that all share a label makes the adapted
    # network so confident that the cross-entropy's input gradient underflows to zero, and PGD stalls.
    dprime, feats = tiny_dprime
    x = digits[1].float_images()[:1]
    y = digits[1].labels[:1]
    r = _rmc(broken, dprime, feats, mode="episodic")
    t = r.trial(x, extract_features(broken, "block3", x).numpy(), 0, keep=True)
    assert int(t.logits.argmax()) == int(y)
    model = ModelSet(r.model, [t.adapted.weights])
    grads = {}
    for loss in ("ce", "margin"):
        xg = x.clone().requires_grad_(True)
        (grads[loss],) = torch.autograd.grad(ensemble_loss("fpa", loss)(model(xg), y).sum(), xg)
    assert grads["ce"].abs().max() == 0 and grads["margin"].abs().max() > 0


def test_ensemble_losses_and_functional_models(tiny_trained):
    logits = torch.tensor([[[4.0, 0.0], [0.0, 4.0]]])     # 1 input, 2 models: one right, one wrong (label 0)
    y = torch.tensor([0])
    ce = torch.nn.functional.cross_entropy(logits[0], torch.tensor([0, 0]), reduction="none")
    assert torch.allclose(ensemble_loss("gmsa-avg", "ce")(logits, y), ce.mean())
    assert torch.allclose(ensemble_loss("gmsa-min", "ce")(logits, y), ce.min())   # min: the model hardest to fool
    assert torch.allclose(ensemble_loss("fpa", "ce")(logits[:, :1], y), ce[:1])
    margins = torch.tensor([-4.0, 4.0])                   # best other logit minus the true one, per model
    assert torch.allclose(ensemble_loss("gmsa-avg", "margin")(logits, y), margins.mean())
    assert torch.allclose(ensemble_loss("gmsa-min", "margin")(logits, y), margins.min())
    other = copy.deepcopy(tiny_trained)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    states = [tiny_trained.state_dict(), other.state_dict()]
    x = torch.rand(3, 1, 8, 8)
    out = ModelSet(copy.deepcopy(tiny_trained), states)(x)
    assert out.shape == (3, 2, 10)
    assert torch.allclose(out[:, 0], tiny_trained(x), atol=1e-6) and torch.allclose(out[:, 1], other(x), atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    ({"attacks": ["cw"]}, "unknown defense-aware attack"), ({"attacks": ["fpa", "fpa"]}, "repeats"),
    ({"rounds": 0}, "attack_rows.rounds"), ({"steps": 2.5}, "attack_rows.steps"), ({"eps": 8}, "larger than"),
    ({"eps": -0.1}, "attack_rows.eps"), ({"step_size": 0}, "attack_rows.step_size"), ({"n": 0}, "attack_rows.n"),
    ({"seed": -1}, "attack_rows.seed"), ({"protocols": ["madry"]}, "unknown attack protocol"),
    ({"protocols": []}, "protocols is empty"), ({"strong_restarts": 0}, "attack_rows.strong_restarts"),
    ({"rand_n": -1}, "attack_rows.rand_n"), ({"rand_eot": 0}, "attack_rows.rand_eot"),
    ({"strong_fallback": "yes"}, "strong_fallback")])
def test_bad_attack_settings_are_refused_in_one_line(bad, match):
    with pytest.raises(RMCError, match=match) as e:
        AttackRowsConfig(**bad)
    assert "\n" not in str(e.value)


def test_bad_settings_from_config_and_calls(tiny_trained, tiny_dprime):
    with pytest.raises(RMCError, match="unknown defense-aware attack 'bpda'"):
        load_config(overrides=[("attack_rows.attacks", ["bpda"])])
    with pytest.raises(RMCError, match=r"unknown config key .*attack_rows\.round;"):
        load_config(overrides=[("attack_rows.round", 3)])
    assert load_config(overrides=[("attack_rows.attacks", "fpa")]).attack_rows.attacks == ["fpa"]
    dprime, feats = tiny_dprime
    r = _rmc(tiny_trained, dprime, feats)
    with pytest.raises(RMCError, match="unknown defense-aware attack 'gmsa'"):
        attack_input(r, tiny_trained, "block3", torch.rand(1, 1, 8, 8), 0, "gmsa", AttackRowsConfig(), key=0)
    with pytest.raises(RMCError, match="one input"):
        attack_input(r, tiny_trained, "block3", torch.rand(2, 1, 8, 8), 0, "fpa", AttackRowsConfig(), key=0)
    with pytest.raises(RMCError, match="larger than"):
        autoattack(tiny_trained, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), eps=3, n_classes=10)


def test_autoattack_stays_within_eps_and_breaks_the_static_model(tiny_trained, digits):
    test = digits[1]
    x, y = test.float_images()[:8], test.labels[:8]
    adv = autoattack(tiny_trained, x, y, eps=0.3, n_classes=10, seed=0)
    assert adv.shape == x.shape and (adv - x).abs().max() <= 0.3 + 1e-6 and 0 <= adv.min() <= adv.max() <= 1
    with torch.no_grad():
        assert (tiny_trained(x).argmax(1) == y).float().mean() >= 0.75
        assert (tiny_trained(adv).argmax(1) == y).float().mean() <= 0.125


# -- the attack rows of the report ---------------------------------------------------------------------------
def _base_and_sets(model, feats, digits, n):
    test = digits[1]
    x, y = test.float_images()[:n], test.labels[:n]
    clean = EvalSet("clean", x, y, None, torch.arange(n), {"kind": "clean", "dataset": "digits", "n": n, "seed": 0,
                                                           "source_model_sha256": "b" * 64})
    return BaseModel("standard", model, "b" * 64, "block3", feats), [clean]


def test_attack_rows_resume_after_interruption_and_fill_the_table(broken, tiny_dprime, digits, tmp_path, monkeypatch):
    dprime, feats = tiny_dprime
    base, sets = _base_and_sets(broken, feats, digits, 5)
    cfg = _rmc(broken, dprime, feats).cfg                       # online
    acfg = AttackRowsConfig(attacks=["fpa"], protocols=["chen2022", "strong"], rounds=2, steps=5, eps=0.5)
    full = ev.evaluate_attacks(base, dprime, sets, cfg, acfg, tmp_path / "a", 10, progress=False, log=lambda s: None)

    from rmc.evaluation import aware_stream
    calls = {"n": 0}
    real = aware_stream.attack_input

    def dies_after_three(*a, **k):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(aware_stream, "attack_input", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate_attacks(base, dprime, sets, cfg, acfg, tmp_path / "b", 10, progress=False, log=lambda s: None)
    stream = tmp_path / "b" / "standard" / "fpa-chen2022-r2-pgd5-eps0.5" / "attack.jsonl"
    strong = tmp_path / "b" / "standard" / "fpa-strong-r2-pgd5-eps0.5-x2-rs2-fb" / "attack.jsonl"
    # the rows take turns input by input: a stopped run has the same first inputs in every row
    assert len(stream.read_text().splitlines()) == 2 and len(strong.read_text().splitlines()) == 1
    monkeypatch.setattr(aware_stream, "attack_input", real)
    resumed = ev.evaluate_attacks(base, dprime, sets, cfg, acfg, tmp_path / "b", 10, progress=False, log=lambda s: None)

    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    for a, b in zip(full, resumed, strict=True):
        assert a.label == b.label and a.kind == b.kind
        assert {d: strip(r) for d, r in a.records.items()} == {d: strip(r) for d, r in b.records.items()}
    assert [r.kind for r in full] == ["transfer", "defense-aware", "defense-aware", "worst case"]
    fpa = full[1]
    assert "[chen2022]" in fpa.label and "[strong]" in full[2].label and "N=5" in fpa.label
    for row in full[1:3]:
        assert set(row.records) == {"rmc"}                                  # a defense-aware row: RMC only
    assert full[2].info["agree"] == 5 and full[2].info["attacker"] == "scored-stream"   # strong: a replay
    assert (tmp_path / "a" / "standard" / "rounds.png").stat().st_size > 1000
    attack_log = [json.loads(line) for line in stream.read_text().splitlines()]
    assert [r["index"] for r in attack_log] == list(range(5)) and all(r["rounds"] in (1, 2) for r in attack_log)

    # chen2022's row is two RMC streams over the chosen inputs: the attacker's own (its verdicts, attack.jsonl) and the
    # scored pass (rmc.jsonl), each reproduced by a fresh RMC stepping the chosen inputs under its keys.
    from rmc.artifacts.evalsets import load_eval_sets
    name = ev.set_names(acfg)[ev.aware_key("fpa", "chen2022")]
    chosen = load_eval_sets(tmp_path / "a" / "standard" / "attack-sets", [name], model_sha256="b" * 64)[0].images
    lane = acfg.lane("chen2022")
    scored_keys = [(name, i) for i in range(5)]
    own_keys = [da.attacker_key(lane, k, "verdict") for k in scored_keys]
    assert not set(own_keys) & set(scored_keys)
    folder = tmp_path / "a" / "standard" / name
    attack_preds = [json.loads(line)["pred"] for line in (folder / "attack.jsonl").read_text().splitlines()]
    score_preds = [json.loads(line)["pred"] for line in (folder / "rmc.jsonl").read_text().splitlines()]
    own, scored = _rmc(broken, dprime, feats), _rmc(broken, dprime, feats)
    q = extract_features(broken, "block3", chosen).numpy()
    assert [own.step(chosen[i:i + 1], q[i:i + 1], key=own_keys[i]).prediction for i in range(5)] == attack_preds
    assert [scored.step(chosen[i:i + 1], q[i:i + 1], key=scored_keys[i]).prediction for i in range(5)] == score_preds
    pairs = list(zip(attack_preds, score_preds, strict=True))
    assert not _states_equal(own.state_dict(), scored.state_dict())     # two online states, each along its stream
    agreement = json.loads((folder / ev.AGREEMENT_FILE).read_text())
    assert [(r["attack_pred"], r["score_pred"]) for r in agreement["inputs"]] == pairs
    assert agreement["agree"] == fpa.info["agree"] == sum(a == b for a, b in pairs)
    assert agreement["attacker"] == "own-copy" and "attacker's own RMC copy and keys" in fpa.label
    assert "exact state and keys" in full[2].label and "best-loss iterate" in full[0].label

    worst = full[-1].records["rmc"]
    for row in full[:-1]:
        for w, r in zip(worst, row.records["rmc"], strict=True):
            assert not (r["pred"] != r["label"] and w["pred"] == w["label"])   # worst case is never better
    table = ev.attack_table({"standard": full})
    text = table.markdown()
    assert "[transfer]" in text and "[defense-aware]" in text and "[worst case]" in text
    assert "dynamic defense" in text and "RobustBench" in text
    assert table.columns == ["None", "RMC", "RMC: attack's verdict", "RMC: verdict = score"]
    assert table.rows[f"{fpa.label} [defense-aware]"].keys() == {"RMC", "RMC: attack's verdict", "RMC: verdict = score"}
    assert table.rows[f"{full[0].label} [transfer]"].keys() == {"None", "RMC"}
    cell = table.rows[f"{fpa.label} [defense-aware]"]["RMC: verdict = score"].accuracy
    assert (cell.hits, cell.n) == (fpa.info["agree"], 5)


def test_worst_case_counts_an_input_only_if_every_row_gets_it_right():
    rec = lambda preds: [{"index": i, "label": 1, "pred": p} for i, p in enumerate(preds)]  # noqa: E731
    rows = [ev.AttackRow("a", "a", "transfer", {"rmc": rec([1, 1, 0]), "undefended": rec([0, 1, 1])}),
            ev.AttackRow("b", "b", "defense-aware", {"rmc": rec([1, 2, 1])})]
    w = ev.worst_case(rows, {"rmc": rec([1, 1, 1, 1]), "undefended": rec([1, 1, 3, 1])}, 3)
    assert [r["pred"] for r in w.records["rmc"]] == [1, 2, 0]
    assert [r["pred"] for r in w.records["undefended"]] == [0, 1, 3]
    assert w.kind == "worst case" and "clean" in w.label


def test_cli_flags_set_the_attack_rows_section():
    from rmc.cli import build_parser
    from rmc.cli.commands.evaluate import attack_overrides
    parser = build_parser()
    common = ["run", "--out", "x"]
    args = parser.parse_args(common + ["--attacks", "fpa", "autoattack", "--rounds", "3", "--attack-eps", "8/255",
                                       "--attack-n", "7"])
    a = load_config(overrides=attack_overrides(args)).attack_rows
    assert (a.attacks, a.autoattack, a.transfer_pgd, a.rounds, a.n) == (["fpa"], True, True, 3, 7)
    assert a.eps == pytest.approx(8 / 255)
    args = parser.parse_args(common + ["--protocols", "strong", "--rand-n", "4", "--rand-eot", "3"])
    a = load_config(overrides=attack_overrides(args)).attack_rows
    assert (a.protocols, a.rand_n, a.rand_eot) == (["strong"], 4, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(common + ["--protocols", "madry"])
    a = load_config(overrides=attack_overrides(parser.parse_args(common + ["--attacks", "none"]))).attack_rows
    assert a.attacks == [] and not a.autoattack and a.transfer_pgd
    a = load_config(overrides=attack_overrides(parser.parse_args(common + ["--no-attack-rows"]))).attack_rows
    assert not ev.wants_attack_rows(a)
    with pytest.raises(RMCError, match="--attacks none"):
        attack_overrides(parser.parse_args(common + ["--attacks", "none", "fpa"]))
    with pytest.raises(RMCError, match="--attack-eps"):
        attack_overrides(parser.parse_args(common + ["--attack-eps", "eight"]))
    with pytest.raises(SystemExit):
        parser.parse_args(common + ["--attacks", "bpda"])


# -- each protocol choice, by behaviour ---------------------------------------------------------------------------
def _drifted_online(model, dprime, feats, digits):
    """An online RMC that has processed two inputs: its weights are no longer the static ones."""
    r = _rmc(model, dprime, feats)
    x = digits[1].float_images()[-2:]
    q = extract_features(model, "block3", x).numpy()
    for i in range(2):
        r.step(x[i:i + 1], q[i:i + 1], key=("drift", i))
    return r


def _robust_input(model, digits):
    """A test digit the model gets right by a wide margin (at a tiny eps no round fools RMC: every round runs)."""
    x, y = digits[1].float_images()[:20], digits[1].labels[:20]
    with torch.no_grad():
        logits = model(x)
    others = logits.masked_fill(torch.nn.functional.one_hot(y, 10).bool(), -1e9)
    m = logits.gather(1, y[:, None])[:, 0] - others.max(1).values
    i = int(m.argmax())
    return x[i:i + 1], int(y[i])


@pytest.mark.parametrize("protocol, restarts, factor", [("chen2022", 1, 1), ("strong", 2, 2)])
def test_gmsa_min_iterations_grow_with_the_number_of_models(tiny_trained, tiny_dprime, digits, monkeypatch,
                                                            protocol, restarts, factor):
    dprime, feats = tiny_dprime
    rec = Recorder()
    monkeypatch.setattr(da, "ModelSet", rec.cls)
    x, y = _robust_input(tiny_trained, digits)
    acfg = AttackRowsConfig(rounds=3, steps=4, eps=1e-3, strong_fallback=False)
    res = attack_input(_rmc(tiny_trained, dprime, feats), tiny_trained, "block3", x, y, "gmsa-min", acfg, key=0,
                       protocol=protocol)
    assert len(res.rounds) == 3 and all(r.margin > 0 for r in res.rounds)
    # round r attacks r models with steps x r iterations (+ the clean input and the last iterate, per restart)
    assert [len(s.models) for s in rec.sets] == [1, 2, 3]
    assert [s.calls for s in rec.sets] == [restarts * (4 * factor * r + 2) for r in (1, 2, 3)]


@pytest.mark.parametrize("kind", ["fpa", "gmsa-avg", "gmsa-min"])
def test_round_one_targets_the_online_model_and_gmsa_keeps_it_in_the_set(tiny_trained, tiny_dprime, digits,
                                                                         monkeypatch, kind):
    dprime, feats = tiny_dprime
    r = _drifted_online(tiny_trained, dprime, feats, digits)
    online = copy.deepcopy(r.model).eval()
    probe = digits[1].float_images()[20:28]
    with torch.no_grad():
        assert not torch.allclose(online(probe), tiny_trained(probe), atol=1e-3)   # it has drifted
    rec = Recorder()
    monkeypatch.setattr(da, "ModelSet", rec.cls)
    x, y = _robust_input(tiny_trained, digits)
    attack_input(r, tiny_trained, "block3", x, y, kind, AttackRowsConfig(rounds=3, steps=2, eps=1e-3), key=5)
    with torch.no_grad():
        outs = [s(probe) for s in rec.sets]
        want = online(probe)
    assert torch.allclose(outs[0][:, 0], want, atol=1e-5)                # round 1: the current online model
    for out in outs[1:]:
        first_is_online = torch.allclose(out[:, 0], want, atol=1e-5)
        assert first_is_online == (kind != "fpa")    # GMSA: the model before adaptation stays; FPA: the last adapted
        assert not torch.allclose(out[:, -1], want, atol=1e-3)


def test_episodic_round_one_targets_the_static_model(tiny_trained, tiny_dprime, digits, monkeypatch):
    dprime, feats = tiny_dprime
    r = _rmc(tiny_trained, dprime, feats, mode="episodic")
    x, y = _robust_input(tiny_trained, digits)
    r.step(x, extract_features(tiny_trained, "block3", x).numpy(), key=0)   # leaves adapted weights in the module
    rec = Recorder()
    monkeypatch.setattr(da, "ModelSet", rec.cls)
    attack_input(r, tiny_trained, "block3", x, y, "gmsa-avg", AttackRowsConfig(rounds=2, steps=2, eps=1e-3), key=1)
    probe = digits[1].float_images()[20:28]
    with torch.no_grad():
        assert torch.allclose(rec.sets[0](probe)[:, 0], tiny_trained(probe), atol=1e-5)


def test_pgd_returns_the_best_iterate_with_the_clean_input_among_them():
    # One pixel, loss -(x - 0.5)^2: maximal at the clean input 0.5. Sign steps of 0.3 from a random start
    # overshoot and oscillate around it, so the last iterate is worse than the best one.
    def model(x):
        return torch.stack([(x.flatten(1) - 0.5).pow(2).sum(1), torch.zeros(len(x))], 1)
    loss = ensemble_loss("fpa", "margin")
    lifted = lambda x: model(x)[:, None]  # noqa: E731   (N x 1 model x classes)
    x, y = torch.full((1, 1, 1, 1), 0.5), torch.tensor([0])
    best, best_loss = pgd_best(lifted, x, y, 0.45, 0.3, 5, loss, torch.Generator().manual_seed(0))
    assert torch.equal(best, x) and best_loss.item() == 0.0
    # away from the optimum the best iterate is the highest-loss point visited, not the last one
    seen = []
    recorder = lambda z: (seen.append(z.detach().clone()), lifted(z))[1]  # noqa: E731
    x2 = torch.full((1, 1, 1, 1), 0.1)
    best, best_loss = pgd_best(recorder, x2, y, 0.45, 0.3, 6, loss, torch.Generator().manual_seed(1))
    losses = [loss(lifted(z), y).item() for z in seen]
    assert best_loss.item() == pytest.approx(max(losses)) and any(torch.equal(best, z) for z in seen)
    assert losses[-1] < max(losses)       # the last iterate is not the best: returning it would be weaker
    assert (best - x2).abs().max() <= 0.45 + 1e-6


def test_chen2022_gives_rmc_the_clean_input_when_nothing_fools_it_strong_the_lowest_margin(tiny_trained, tiny_dprime,
                                                                                          digits):
    dprime, feats = tiny_dprime
    x, y = _robust_input(tiny_trained, digits)
    acfg = AttackRowsConfig(rounds=2, steps=3, eps=1e-3, strong_fallback=False)
    chen = attack_input(_rmc(tiny_trained, dprime, feats), tiny_trained, "block3", x, y, "fpa", acfg, key=3)
    strong = attack_input(_rmc(tiny_trained, dprime, feats), tiny_trained, "block3", x, y, "fpa", acfg, key=3,
                          protocol="strong")
    assert all(r.margin > 0 for r in chen.rounds + strong.rounds)      # nothing fooled RMC
    assert torch.equal(chen.x_adv, x) and chen.chosen_round == 0
    ref = _rmc(tiny_trained, dprime, feats).step(x, extract_features(tiny_trained, "block3", x).numpy(),
                                                 key=chen.verdict_key)
    assert chen.logits == ref.logits and chen.verdict_key != 3   # the attacker's RMC, its own key, saw the clean input
    assert not torch.equal(strong.x_adv, x) and strong.chosen_round >= 1
    m = min(strong.rounds, key=lambda r: r.margin)
    assert strong.chosen_round == m.round


def test_strong_is_never_weaker_than_chen2022_on_any_input(tiny_trained, tiny_dprime, digits):
    """Episodic RMC, the same scored keys: every input chen2022 gets past the scored RMC, strong does too."""
    dprime, feats = tiny_dprime
    x, y = digits[1].float_images()[16:24], digits[1].labels[16:24]
    keys = [("row", i) for i in range(len(x))]
    acfg = AttackRowsConfig(rounds=2, steps=5, eps=0.25)
    wrong = {}
    for protocol in ("chen2022", "strong"):
        res = attack_stream(_rmc(tiny_trained, dprime, feats, mode="episodic"), tiny_trained, "block3", x, y, "fpa",
                            acfg, keys, protocol=protocol)
        rescored = _score(tiny_trained, dprime, feats, res.images, keys, mode="episodic")
        if protocol == "strong":                  # its RMC is the scored one: the score replays its verdicts
            assert rescored.tolist() == res.predictions
        wrong[protocol] = rescored != y
    assert wrong["chen2022"].any()                                       # the comparison is not vacuous
    assert not (wrong["chen2022"] & ~wrong["strong"]).any(), (wrong["chen2022"], wrong["strong"])


def test_rounds_figure_counts_an_input_fooled_from_its_first_fooling_round(tmp_path):
    from rmc.evaluation.rounds_figure import accuracy_by_round, save_rounds_figure
    recs = [{"label": 1, "round_preds": [1, 1, 2]}, {"label": 1, "round_preds": [3]},
            {"label": 1, "round_preds": [1, 1, 1, 1]}, {"label": 2, "round_preds": [2, 0]}]
    assert accuracy_by_round(recs, 4) == [0.75, 0.5, 0.25, 0.25]
    with pytest.raises(RMCError, match="no attack records"):
        accuracy_by_round([], 4)
    path = save_rounds_figure({"standard": {"FPA [chen2022]": (recs, [{"label": 1, "pred": 1}])}}, 4,
                              tmp_path / "f" / "rounds.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_autoattack_rand_draws_a_new_key_per_call_and_stays_in_the_ball(tiny_trained, digits):
    from rmc.attacks.autoattack import NewKeyEachCall, autoattack_rand

    class Keyed(torch.nn.Module):
        """A randomised defense in miniature: the key picks a small random shift of the logits."""
        def __init__(self):
            super().__init__()
            self.net, self.key, self.keys = tiny_trained, None, []

        def forward(self, x):
            self.keys.append(self.key)
            g = torch.Generator().manual_seed(hash(self.key) % 2**31)
            return self.net(x) + 0.1 * torch.randn(10, generator=g)
    d = Keyed()
    x, y = digits[1].float_images()[:3], digits[1].labels[:3]
    with torch.no_grad():
        assert (tiny_trained(x).argmax(1) == y).all()      # APGD only attacks inputs classified correctly
    adv = autoattack_rand(d, x, y, eps=0.2, eot_iter=2, steps=3)
    assert (adv - x).abs().max() <= 0.2 + 1e-6 and 0 <= adv.min() <= adv.max() <= 1
    assert len(d.keys) > 6 and len(set(d.keys)) == len(d.keys)        # every call a fresh key (EOT sees randomness)
    with pytest.raises(RMCError, match="no `key`"):
        NewKeyEachCall(tiny_trained)


def test_rounds_figure_from_results_folders_uses_the_re_scored_inputs(tmp_path):
    from rmc.evaluation.rounds_figure import load_panel, main
    row = tmp_path / "standard" / "gmsa-min-chen2022-r3-pgd40-eps0.1"
    row.mkdir(parents=True)
    attack = [{"index": 0, "label": 1, "pred": 1, "protocol": "chen2022", "round_preds": [1, 1, 1]},
              {"index": 1, "label": 1, "pred": 2, "protocol": "chen2022", "round_preds": [2]},
              {"index": 2, "label": 1, "pred": 2, "protocol": "chen2022", "round_preds": [1, 2]}]   # not re-scored yet
    (row / "attack.jsonl").write_text("".join(json.dumps(r) + "\n" for r in attack))
    (row / "rmc.jsonl").write_text("".join(json.dumps({"index": i, "label": 1, "pred": p}) + "\n"
                                           for i, p in enumerate((1, 2))))
    curves, rounds = load_panel(tmp_path / "standard")
    assert rounds == 3 and list(curves) == ["GMSA-MIN [chen2022]"] and len(curves["GMSA-MIN [chen2022]"][0]) == 2
    assert main([str(tmp_path / "out.png"), f"standard={tmp_path / 'standard'}"]) == 0
    assert (tmp_path / "out.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RMCError, match="no finished defense-aware rows"):
        load_panel(tmp_path)
    with pytest.raises(RMCError, match="usage"):
        main(["out.png", "no-equals-sign"])


class _KeyRecorder:
    """Wraps an RMC's `trial` to record the key of every trial the attack runs."""

    def __init__(self, rmc):
        self.keys, real = [], rmc.trial

        def trial(x, features=None, key=None, rows=None, keep=False):
            self.keys.append(key)
            return real(x, features, key, rows, keep)
        rmc.trial = trial


@pytest.mark.parametrize("protocol", ["chen2022", "strong"])
def test_chen2022_attacker_never_draws_the_scored_rmcs_keys_strong_only_those(tiny_trained, tiny_dprime, digits,
                                                                             protocol):
    """Chen et al.'s attacker runs RMC under its own randomness: none of its trials (rounds, verdict) uses the key
    the scored RMC gives the input, and each of its rounds draws a fresh one. `strong` knows the scored RMC: every
    trial uses exactly that key."""
    dprime, feats = tiny_dprime
    x, y = _robust_input(tiny_trained, digits)
    r = _rmc(tiny_trained, dprime, feats)
    rec = _KeyRecorder(r)
    res = attack_input(r, tiny_trained, "block3", x, y, "gmsa-avg",
                       AttackRowsConfig(rounds=3, steps=2, eps=1e-3, strong_fallback=False), key=("row", 7),
                       protocol=protocol)
    assert len(res.rounds) == 3
    if protocol == "strong":   # its trials are the scored RMC's verdicts: it commits the chosen round's own trial
        assert rec.keys == [("row", 7)] * 3 and res.verdict_key == ("row", 7)
    else:                      # 3 rounds, then a fresh trial of the chosen input (Chen et al.'s get_pred): its verdict
        assert len(rec.keys) == 4 and ("row", 7) not in rec.keys and len(set(rec.keys)) == 4
        assert res.verdict_key == rec.keys[-1]


@pytest.mark.parametrize("protocol, loss", [("chen2022", "ce"), ("strong", "margin")])
def test_each_protocol_ascends_its_loss(tiny_trained, tiny_dprime, digits, monkeypatch, protocol, loss):
    """The loss each protocol's PGD ascends, on logits whose values are known: chen2022 the cross-entropy
    (log(1 + e^-1 + e^-2) = 0.4076 for logits (2, 1, 0), label 0), strong the margin (1 - 2 = -1)."""
    dprime, feats = tiny_dprime
    used = []
    real = da.pgd_best

    def spy(model, x, y, eps, step_size, steps, loss_fn, gen):
        used.append(loss_fn)
        return real(model, x, y, eps, step_size, steps, loss_fn, gen)
    monkeypatch.setattr(da, "pgd_best", spy)
    x, y = _robust_input(tiny_trained, digits)
    attack_input(_rmc(tiny_trained, dprime, feats), tiny_trained, "block3", x, y, "fpa",
                 AttackRowsConfig(rounds=1, steps=1, eps=1e-3, strong_fallback=False), key=0, protocol=protocol)
    logits = torch.tensor([[[2.0, 1.0, 0.0]]])          # 1 input x 1 model x 3 classes
    want = {"ce": math.log(1 + math.exp(-1) + math.exp(-2)), "margin": -1.0}[loss]
    assert used and all(f(logits, torch.tensor([0])).item() == pytest.approx(want, abs=1e-6) for f in used)


class _Inputs(ModelSet):
    """ModelSet that records the images it is evaluated on (the PGD iterates, in order)."""
    seen: ClassVar[list[torch.Tensor]] = []

    def forward(self, x):
        _Inputs.seen.append(x.detach().clone())
        return super().forward(x)


@pytest.mark.parametrize("protocol", ["chen2022", "strong"])
def test_pgd_starts_at_random_in_the_ball_and_steps_eps_over_8(tiny_trained, tiny_dprime, digits, monkeypatch,
                                                               protocol):
    """Chen et al.'s PGD: a uniform random start in the eps-ball, then sign steps of 1/255 at eps 8/255 (eps/8)."""
    dprime, feats = tiny_dprime
    monkeypatch.setattr(da, "ModelSet", _Inputs)
    _Inputs.seen = []
    x, y = _robust_input(tiny_trained, digits)
    eps = 0.4
    attack_input(_rmc(tiny_trained, dprime, feats), tiny_trained, "block3", x, y, "fpa",
                 AttackRowsConfig(rounds=1, steps=3, eps=eps, strong_fallback=False, strong_restarts=1), key=0,
                 protocol=protocol)
    clean, start, *steps = _Inputs.seen[:5]
    assert torch.equal(clean, x)                                        # the clean input's loss is the first best
    off = (start - x).abs()
    inside = (x > eps) & (x < 1 - eps)                                  # pixels the [0, 1] clip cannot touch
    assert off.max() <= eps + 1e-6 and inside.sum() >= 5
    assert (off[inside] > 0).all() and off[inside].max() > eps / 2     # a random start, uniform in the ball
    moves = [(b - a).abs().max().item() for a, b in zip([start] + steps[:-1], steps, strict=True)]
    assert moves == pytest.approx([eps / 8] * len(moves), abs=1e-6)


@pytest.mark.parametrize("kind", ["fpa", "gmsa-avg"])
def test_fpa_and_gmsa_avg_run_the_same_iterations_every_round(tiny_trained, tiny_dprime, digits, monkeypatch, kind):
    """Only GMSA-MIN multiplies its iterations by the number of models (Chen et al.); FPA attacks one model and
    GMSA-AVG a growing set with steps iterations every round."""
    dprime, feats = tiny_dprime
    rec = Recorder()
    monkeypatch.setattr(da, "ModelSet", rec.cls)
    x, y = _robust_input(tiny_trained, digits)
    acfg = AttackRowsConfig(rounds=3, steps=4, eps=1e-3)
    res = attack_input(_rmc(tiny_trained, dprime, feats), tiny_trained, "block3", x, y, kind, acfg, key=0)
    assert len(res.rounds) == 3 and [r.iterations for r in res.rounds] == [4, 4, 4]
    assert [len(s.models) for s in rec.sets] == ([1, 1, 1] if kind == "fpa" else [1, 2, 3])
    assert [s.calls for s in rec.sets] == [4 + 2] * 3          # the clean input, 4 iterates, the last one


def test_transfer_pgd_keeps_each_inputs_best_loss_iterate(tiny_trained, digits):
    """The transfer row's PGD returns per input the highest cross-entropy seen (Chen et al.'s elementwise_best):
    never below the last iterate (plain PGD from the same random start), above it where PGD overshoots."""
    from rmc.attacks.gradient import cross_entropy, pgd
    from rmc.seeding import generator
    x, y = digits[1].float_images()[:16], digits[1].labels[:16]
    acfg = AttackRowsConfig(steps=4, eps=0.3, step_size=0.3)           # steps as large as eps: PGD oscillates
    best = initial_candidates(tiny_trained, x, y, acfg)
    last = pgd(tiny_trained, x, y, 0.3, 0.3, 4, generator=generator(acfg.seed, "transfer-pgd"))
    with torch.no_grad():
        lb, ll = cross_entropy(tiny_trained(best), y), cross_entropy(tiny_trained(last), y)
    assert (lb >= ll - 1e-5).all() and (lb > ll + 1e-3).any()
    assert (best - x).abs().max() <= 0.3 + 1e-6 and 0 <= best.min() <= best.max() <= 1
