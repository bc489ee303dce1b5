"""The Defense interface and the registries (defenses, attack kinds, data sets): what satisfies the interface, that
the tables, figures, config and CLI read the registries, and that a new entry is all a new defense needs there."""

import numpy as np
import pytest
import torch

from rmc.attacks.kinds import ATTACK_KINDS, PROTOCOLS
from rmc.attacks.protocols import check_kind
from rmc.cli.config import load_config
from rmc.data import DATASETS, class_names, load_dataset
from rmc.defense import build_rmc
from rmc.defense.baselines import NeighbourVote, StaticModel
from rmc.defense.config import RMCConfig
from rmc.defense.knn import NeighbourIndex, vote
from rmc.defense.registry import DEFENSES, RMC, STATIC, BuildContext, DefenseSpec, baselines, check_defenses
from rmc.errors import RMCError
from rmc.evaluation.attack_rows import AttackRow, attack_table, worst_case
from rmc.evaluation.figures import DEFENSE_COLORS
from rmc.evaluation.report import Table, row_label
from rmc.interface import Adaptation, Defense, Registry
from rmc.models import extract_features


def test_a_registry_keeps_order_refuses_duplicates_and_names_the_choices_in_one_line():
    class E:
        def __init__(self, name, label):
            self.name, self.label = name, label
    r = Registry("widget", [E("a", "A"), E("b", "B")])
    assert r.names() == ("a", "b") and r.labels() == {"a": "A", "b": "B"} and r.label("zz") == "zz"
    with pytest.raises(RMCError, match="unknown widget 'c'; choose from a, b") as e:
        r["c"]
    assert "\n" not in str(e.value)
    with pytest.raises(RMCError, match="registered already"):
        r.register(E("a", "again"))


def test_rmc_and_the_baselines_are_defenses(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    index = NeighbourIndex(feats)
    for mode, adaptation in (("online", Adaptation.ONLINE), ("episodic", Adaptation.EPISODIC)):
        r = build_rmc(tiny_trained, dprime, index, RMCConfig(k=32, max_epochs=1, mode=mode), "block3")
        assert isinstance(r, Defense) and r.adaptation is adaptation
    x = digits[1].float_images()[:12]
    q = extract_features(tiny_trained, "block3", x).numpy()
    static = StaticModel(tiny_trained)
    assert isinstance(static, Defense) and static.adaptation is Adaptation.STATIC
    with torch.no_grad():
        assert torch.equal(static.trial(x).logits, tiny_trained(x))
    labels = dprime.labels.numpy()
    webnn = NeighbourVote(tiny_trained, index, labels, 32, 10)
    rows = index.search(q, 32)[1]
    assert webnn.trial(x, q).logits.argmax(1).numpy().tolist() == vote(labels[rows], 10).tolist()
    assert torch.equal(webnn.trial(None, rows=rows).logits, webnn.trial(x, q).logits)   # shared search, same votes
    snap = webnn.snapshot()
    webnn.restore(snap)
    assert webnn.commit(webnn.trial(x, q)) == 0 and webnn.state_dict() == {}


def test_the_registry_builds_the_baselines_the_driver_computes(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    clean_rows = np.flatnonzero(dprime.copy.numpy() == 0)
    ctx = BuildContext(tiny_trained, "block3", None, dprime, NeighbourIndex(feats),
                       NeighbourIndex(feats[clean_rows], ids=clean_rows), 16, 10)
    x = digits[1].float_images()[:10]
    q = extract_features(tiny_trained, "block3", x).numpy()
    labels = dprime.labels.numpy()
    preds = {n: DEFENSES[n].build(ctx).trial(x, q).logits.argmax(1).tolist() for n in baselines()}
    assert baselines() == [STATIC, "deepnn", "webnn"]
    assert preds["deepnn"] == vote(labels[ctx.clean_index.search(q, 16)[1]], 10).tolist()
    assert preds["webnn"] == vote(labels[ctx.index.search(q, 16)[1]], 10).tolist()
    with pytest.raises(RMCError, match="searches D'"):
        DEFENSES[RMC].build(BuildContext(tiny_trained, "block3", RMCConfig()))


@pytest.fixture
def toy(monkeypatch):
    """A new defense registered for one test: what every reader of the registry must then show."""
    spec = DefenseSpec("toy", "Toy", "tab:olive", Adaptation.BATCH, "rmc.defense.registry:build_static",
                       settings=None)
    monkeypatch.setitem(DEFENSES._entries, "toy", spec)
    monkeypatch.setitem(DEFENSE_COLORS, "toy", spec.colour)
    return spec


def test_a_registered_defense_reaches_the_config_the_tables_and_the_columns(toy):
    assert check_defenses(["toy", RMC]) == [RMC, "toy"]
    assert load_config(overrides=[("defenses", ["toy"])]).defenses == ["toy"]
    assert row_label("standard", "toy") == "Toy" and row_label("adversarial", "toy") == "Adv. trained + Toy"
    rec = lambda preds: [{"index": i, "label": 1, "pred": p} for i, p in enumerate(preds)]  # noqa: E731
    t = Table.from_results({"standard": {"clean": {STATIC: rec([1, 0]), RMC: rec([1, 1]), "toy": rec([0, 0])}}})
    assert list(t.rows) == ["None", "RMC", "Toy"]
    rows = [AttackRow("a", "a", "transfer", {STATIC: rec([1, 1]), RMC: rec([1, 0]), "toy": rec([0, 1])})]
    w = worst_case(rows, None, 2)
    assert set(w.records) == {STATIC, RMC, "toy"} and [r["pred"] for r in w.records["toy"]] == [0, 1]
    assert attack_table({"standard": rows + [w]}).columns == ["None", "RMC", "Toy"]


def test_attack_kinds_and_protocols_come_from_their_registries():
    assert ATTACK_KINDS.names() == ("fpa", "gmsa-avg", "gmsa-min", "autoattack-through")
    assert PROTOCOLS.names() == ("chen2022", "strong")
    assert [k.name for k in ATTACK_KINDS if k.runner] == ["autoattack-through"]     # not rounds of PGD
    assert [k.name for k in ATTACK_KINDS if k.last_model_only] == ["fpa"]
    assert [k.name for k in ATTACK_KINDS if k.iterations_per_model] == ["gmsa-min"]
    assert check_kind("fpa") == "fpa"
    with pytest.raises(RMCError, match="unknown defense-aware attack 'bpda'"):
        check_kind("bpda")
    from rmc.cli import build_parser
    args = build_parser().parse_args(["run", "--out", "x", "--attacks", *ATTACK_KINDS.names(), "--protocols",
                                      *PROTOCOLS.names()])
    assert args.attacks == list(ATTACK_KINDS.names())


def test_data_sets_say_their_class_names_and_whether_flips_keep_the_class():
    assert class_names("fashion-mnist")[0] == "T-shirt/top" and class_names("cifar10")[0] == "airplane"
    assert class_names("imagefolder") == [] and class_names("not-registered") == []
    assert {d.name for d in DATASETS if not d.flips} == {"digits", "mnist"}
    assert len(load_dataset("digits", "test")) == 297
    with pytest.raises(RMCError, match="unknown dataset 'svhn'; choose from fashion-mnist"):
        load_config(overrides=[("data.dataset", "svhn")])
