"""DENT (rmc.defense.dent): what it adapts, its episodic reset, its loss and AdaMod by hand, its settings, and DENT as a
column of `rmc run` (its defense-aware protocol checks run in test_batch_aware.py with the other batch defenses)."""

import json
import math
import shutil

import pytest
import torch

from rmc.cli import main as cli
from rmc.cli.config import load_config
from rmc.defense.dent import LOG_EPS, AdaMod, Dent, DentConfig, SampleNorm, entropy, entropy_diversity
from rmc.defense.registry import DEFENSES, BuildContext
from rmc.errors import RMCError
from rmc.interface import Adaptation, Defense


def _dent(model, **kw):
    return Dent(model, DentConfig(**kw))


def test_dent_is_a_batch_defense_built_from_the_registry(tiny_trained):
    d = DEFENSES["dent"].build(BuildContext(tiny_trained, "block3", DentConfig(steps=2)))
    assert isinstance(d, Defense) and d.adaptation is Adaptation.BATCH and d.cfg.steps == 2
    assert DEFENSES["dent"].label == "DENT" and DEFENSES["dent"].settings == "dent"


def test_only_batch_norm_scale_and_shift_change_one_row_per_input(tiny_trained, digits):
    d = _dent(tiny_trained)
    x = digits[1].float_images()[:6]
    before = {k: v.clone() for k, v in d.model.state_dict().items()}
    t = d.trial(x, keep=True)
    after = d.model.state_dict()
    changed = {k for k in before if before[k].shape != after[k].shape or not torch.equal(before[k], after[k])}
    norms = {f"{n}.{p}" for n, m in d.model.named_modules() if isinstance(m, SampleNorm) for p in ("weight", "bias")}
    assert changed == norms and len(norms) == 6                     # the small CNN's three batch norms
    for k in norms:
        assert after[k].shape == (6,) + before[k].shape             # per input
        assert not torch.allclose(after[k][0], after[k][1])         # each input its own
    assert set(t.adapted.weights) == norms
    for name, p in tiny_trained.named_parameters():                 # the caller's model is untouched
        assert not p.requires_grad or torch.equal(p, dict(tiny_trained.named_parameters())[name])


def test_episodic_every_batch_starts_from_the_static_weights(tiny_trained, digits):
    x = digits[1].float_images()
    a, b = x[:8], x[8:16]
    d = _dent(tiny_trained)
    d.trial(a)
    after_a = d.trial(b).logits
    fresh = _dent(tiny_trained).trial(b).logits
    assert torch.equal(after_a, fresh)                               # bit for bit: nothing carried over
    d.commit(d.trial(a))
    with torch.no_grad():                                            # committed: back to the static network
        assert torch.allclose(d.model(b), tiny_trained(b), atol=1e-5)
    assert d.state_dict() == {} and d.batches_done == 1


def test_sample_aware_predictions_do_not_depend_on_batch_mates_unless_test_batch_statistics(tiny_trained, digits):
    x = digits[1].float_images()
    mates1, mates2 = torch.cat([x[:1], x[10:14]]), torch.cat([x[:1], x[30:37]])
    alone = {}
    for stats in ("running", "batch"):
        d = _dent(tiny_trained, loss="entropy", stats=stats)
        alone[stats] = (d.trial(mates1).logits[0], d.trial(mates2).logits[0])
    assert torch.allclose(*alone["running"], atol=1e-4)              # its own parameters, its own loss term
    assert not torch.allclose(*alone["batch"], atol=1e-2)            # the batch's statistics couple them


def test_losses_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]))
    h = [-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)), -(2 * 0.1 * math.log(0.1) + 0.8 * math.log(0.8))]
    assert entropy(logits).item() == pytest.approx(sum(h) / 2, rel=1e-6)
    mean = [0.3, 0.175, 0.525]
    h_eps = [-(0.5 * math.log(0.5 + LOG_EPS) + 2 * 0.25 * math.log(0.25 + LOG_EPS)),
             -(2 * 0.1 * math.log(0.1 + LOG_EPS) + 0.8 * math.log(0.8 + LOG_EPS))]
    want = sum(h_eps) / 2 + sum(m * math.log(m + LOG_EPS) for m in mean)
    assert entropy_diversity(logits).item() == pytest.approx(want, rel=1e-6)


def test_adamod_two_steps_by_hand():
    b1, b2, b3, lr, eps = 0.9, 0.99, 0.6, 0.1, 1e-8
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdaMod([p], lr, (b1, b2), b3, eps)
    grads = [torch.tensor([0.5, -1.0]), torch.tensor([-0.2, -3.0])]
    want, m, v, s = torch.tensor([1.0, -2.0]), torch.zeros(2), torch.zeros(2), torch.zeros(2)
    for t, g in enumerate(grads, 1):
        p.grad = g.clone()
        opt.step()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        eta = lr / ((v / (1 - b2 ** t)).sqrt() + eps)
        s = b3 * s + (1 - b3) * eta
        want = want - torch.minimum(eta, s) * m / (1 - b1 ** t)
        assert torch.allclose(p.detach(), want, atol=1e-7)
    # step 1 in words: the bound is (1 - b3) of Adam's step size, so the move is 0.4 lr sign(g)
    q = torch.nn.Parameter(torch.tensor([0.0]))
    o = AdaMod([q], lr, (b1, b2), b3, eps)
    q.grad = torch.tensor([7.0])
    o.step()
    assert q.item() == pytest.approx(-(1 - b3) * lr, rel=1e-6)


def test_adamod_without_its_bound_is_adam():
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), None
    b = torch.nn.Parameter(a.detach().clone())
    mod, adam = AdaMod([a], 0.01, (0.9, 0.999), beta3=0.0), torch.optim.Adam([b], 0.01)
    for _ in range(5):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        mod.step()
        adam.step()
    assert torch.allclose(a, b, atol=1e-6)


def test_the_released_settings_lower_the_loss_on_a_batch(tiny_trained, digits):
    d = _dent(tiny_trained)
    assert (d.cfg.steps, d.cfg.lr, d.cfg.batch_size, d.cfg.beta1, d.cfg.beta3) == (6, 6e-3, 128, 0.99, 0.6)
    assert (d.cfg.loss, d.cfg.stats, d.cfg.weight_decay) == ("entropy-diversity", "running", 0.0)
    t = d.trial(digits[1].float_images()[:32])
    assert len(t.adapt_losses) == 6 and t.adapt_losses[-1] < t.adapt_losses[0]
    assert entropy_diversity(t.logits).item() < t.adapt_losses[0]


def test_bad_input_and_settings_are_refused_in_one_line(tiny_trained):
    d = _dent(tiny_trained)
    for bad, match in [(torch.rand(2, 1, 8, 8) * 3, "expected \\[0, 1\\]"), (torch.rand(1, 8, 8), "N x C x H x W"),
                       (torch.zeros(0, 1, 8, 8), "empty batch")]:
        with pytest.raises(RMCError, match=match) as e:
            d.trial(bad)
        assert "\n" not in str(e.value)
    for kw, match in [({"steps": 0}, "dent.steps"), ({"lr": -1}, "dent.lr"), ({"beta3": 1.0}, "dent.beta3"),
                      ({"loss": "ce"}, "dent.loss"), ({"stats": "online"}, "dent.stats"),
                      ({"weight_decay": -1}, "dent.weight_decay")]:
        with pytest.raises(RMCError, match=match):
            DentConfig(**kw)
    with pytest.raises(RMCError, match="has none"):
        Dent(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)), DentConfig())
    with pytest.raises(RMCError, match="dent.batch_size"):
        load_config(overrides=[("dent.batch_size", 0)])


def test_defenses_from_the_config_and_the_cli():
    from rmc.cli import build_parser
    assert load_config().defenses == ["rmc"]
    assert load_config(overrides=[("defenses", ["dent", "rmc"])]).defenses == ["rmc", "dent"]   # registry order
    args = build_parser().parse_args(["run", "--defenses", "rmc", "dent", "--out", "x"])
    assert args.defenses == ["rmc", "dent"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--defenses", "webnn", "--out", "x"])
    for bad, match in [(["tent"], "unknown defense 'tent'"), (["deepnn"], "always evaluated"), ([], "one or more"),
                       (["rmc", "rmc"], "repeats")]:
        with pytest.raises(RMCError, match=match):
            load_config(overrides=[("defenses", bad)])


def test_defenses_in_a_config_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("defenses: [rmc, dent]\ndent:\n  steps: 2\n")
    cfg = load_config(path)
    assert cfg.defenses == ["rmc", "dent"] and cfg.dent.steps == 2 and cfg.settings("dent") is cfg.dent


@pytest.mark.slow
def test_rmc_run_with_dent_has_a_dent_column_everywhere_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--set", "data.dataset=digits", "--set", "train.epochs=3",
            "--set", "augment.train_subset=300", "--set", "augment.steps=[3]", "--set", "attack.n=8",
            "--set", "attack.pgd=[[5, 0.15]]", "--set", "rmc.k=32", "--set", "rmc.calib_k=32",
            "--set", "rmc.max_epochs=2", "--set", "visualize.inputs=2", "--defenses", "rmc", "dent",
            "--attacks", "fpa", "--set", "attack_rows.steps=3", "--set", "attack_rows.rounds=2",
            "--set", "batch_rows.steps=3", "--set", "batch_rows.restarts=1", "--set", "batch_rows.rounds=2",
            "--set", "dent.batch_size=4"]
    assert cli(args) == 0
    meta = json.loads((out / "results.json").read_text())
    rows = meta["table"]["rows"]
    assert rows["DENT"]["clean"]["accuracy"]["n"] == 8 and "DENT" in rows and "RMC" in rows
    attack = meta["table"]["appendix"][0]
    verdict, agree = "attack's verdict", "verdict = score"
    assert attack["columns"] == ["None", "RMC", "DENT", f"RMC: {verdict}", f"RMC: {agree}", f"DENT: {verdict}",
                                 f"DENT: {agree}"]
    dent_rows = [label for label in attack["rows"] if "against DENT" in label]
    assert len(dent_rows) == 2                                                                   # both protocols
    for r in dent_rows:
        assert set(attack["rows"][r]) == {"DENT", f"DENT: {verdict}", f"DENT: {agree}"}
        assert attack["rows"][r][f"DENT: {agree}"]["accuracy"]["hits"] == 8      # deterministic: the scored verdict
    worst = next(v for k, v in attack["rows"].items() if k.startswith("worst case"))
    assert set(worst) == {"None", "RMC", "DENT"}
    clean = json.loads(next(out.glob("results/*/standard/clean/dent.json")).read_text())
    assert [r["index"] for r in clean["records"]] == list(range(8)) and {r["batch"] for r in clean["records"]} == {0, 1}
    assert "DENT" in (out / "results.md").read_text() and "DENT" in (out / "report.html").read_text()
    assert "Against a batch defense (DENT)" in (out / "results.md").read_text()   # its protocol, stated
    from rmc.evaluation.figure_data import curve_data
    from rmc.evaluation.run_records import RunRecords
    run = RunRecords(out)
    assert {s.defense for s in curve_data(run)} >= {"rmc", "dent"} and not run.incomplete() and not run.missing
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("dent.json")} | \
        {p: p.stat().st_mtime_ns for p in out.rglob("attack.jsonl")}
    assert cli(args) == 0                                   # a second run reuses DENT's records and attack rows
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    # Every record on disk: the table (DENT's column included) is read back without rebuilding D'.
    table_only = [*args, "--no-attack-rows"]
    assert cli(table_only) == 0
    before = json.loads((out / "results.json").read_text())["table"]["rows"]
    for kind in ("dprime", "features"):
        shutil.rmtree(out / kind)
    capsys.readouterr()
    assert cli(table_only) == 0
    assert "without rebuilding D'" in capsys.readouterr().out
    assert json.loads((out / "results.json").read_text())["table"]["rows"] == before and "DENT" in before
