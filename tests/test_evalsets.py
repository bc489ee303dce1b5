"""Evaluation sets made against the static model: contents, naming, round trip, and damaged directories."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rmc.artifacts.evalsets import AttackSpec, list_eval_sets, load_eval_sets, make_eval_sets, save_eval_sets
from rmc.data import load_dataset
from rmc.errors import RMCError
from rmc.io import sha256_file
from rmc.training import TrainConfig, predict, train_model

SPECS = [AttackSpec("clean"), AttackSpec("fgsm", 0.1), AttackSpec("pgd", 0.1, 5),
         AttackSpec("pgd", 0.2, 10, targeted=True)]


@pytest.fixture(scope="module")
def made():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    model, info = train_model(train, test, TrainConfig(epochs=3, batch_size=64), progress=False)
    info.sha256 = "f" * 64   # stands in for the saved weights' hash
    sets = make_eval_sets(model, info, test, 60, SPECS, seed=1)
    return model, info, test, sets


@pytest.fixture
def saved(made, tmp_path):
    save_eval_sets(tmp_path / "sets", made[3])
    return tmp_path / "sets"


def test_names():
    assert [s.name for s in SPECS] == ["clean", "fgsm-eps0.1", "pgd5-eps0.1", "pgd10-eps0.2-targeted"]
    assert AttackSpec("pgd", 0.1, 10).resolved().step_size == pytest.approx(0.025)
    assert AttackSpec("pgd", 0.1, 10, 0.01).name == "pgd10-eps0.1-step0.01"
    assert AttackSpec("pgd", 0.1, 10, random_start=False).name == "pgd10-eps0.1-norand"
    assert AttackSpec.parse_pgd("40:8/255:1/255").step_size == pytest.approx(1 / 255)
    with pytest.raises(RMCError, match="steps:eps"):
        AttackSpec.parse_pgd("40")
    with pytest.raises(RMCError, match="unknown attack"):
        AttackSpec("cw", 0.1).resolved()


def test_contents(made):
    model, info, test, sets = made
    clean, fgsm_set, pgd_set, targeted = sets
    perm = torch.randperm(len(test), generator=torch.Generator().manual_seed(1))[:60]
    for s in sets:
        assert torch.equal(s.indices, perm) and torch.equal(s.labels, test.labels[perm])
        assert s.images.dtype == torch.float32 and s.images.shape == (60, 1, 8, 8)
        assert s.images.min() >= 0 and s.images.max() <= 1
        assert s.attack["source_model_sha256"] == info.sha256 and s.attack["seed"] == 1
    assert torch.equal(clean.images, test.float_images()[perm])
    assert (fgsm_set.images - clean.images).abs().max() <= 0.1 + 1e-6
    assert (targeted.images - clean.images).abs().max() <= 0.2 + 1e-6
    assert pgd_set.attack == {**pgd_set.attack, "kind": "pgd", "eps": 0.1, "steps": 5, "step_size": 0.05,
                              "targeted": False, "random_start": True}
    assert clean.targets is None and pgd_set.targets is None
    assert (targeted.targets != targeted.labels).all()
    def acc(s) -> float:
        return (predict(model, s.images) == s.labels).float().mean().item()

    assert acc(pgd_set) < acc(clean) - 0.3
    assert (predict(model, targeted.images) == targeted.targets).float().mean().item() > 0.5


def test_seeded(made):
    model, info, test, sets = made
    again = make_eval_sets(model, info, test, 60, SPECS, seed=1)
    for a, b in zip(sets, again, strict=True):
        assert torch.equal(a.images, b.images)
    # A set does not depend on which other sets are made beside it.
    alone = make_eval_sets(model, info, test, 60, [SPECS[2]], seed=1)[0]
    assert torch.equal(alone.images, sets[2].images)
    other = make_eval_sets(model, info, test, 60, SPECS[:1], seed=2)
    assert not torch.equal(other[0].indices, sets[0].indices)


def test_round_trip(made, saved):
    sets = made[3]
    assert list_eval_sets(saved) == [s.name for s in sets]
    loaded = load_eval_sets(saved)
    for a, b in zip(sets, loaded, strict=True):
        assert a.name == b.name and a.attack == b.attack
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.indices, b.indices)
        assert (a.targets is None and b.targets is None) or torch.equal(a.targets, b.targets)
    only = load_eval_sets(saved, ["pgd10-eps0.2-targeted"], model_sha256="f" * 64)
    assert [s.name for s in only] == ["pgd10-eps0.2-targeted"]


def test_bad_requests(made, saved, tmp_path):
    model, info, test, _ = made
    with pytest.raises(RMCError, match="no evaluation set"):
        load_eval_sets(saved, ["pgd100-eps0.1"])
    with pytest.raises(RMCError, match="another model"):
        load_eval_sets(saved, model_sha256="0" * 64)
    with pytest.raises(RMCError, match="not found"):
        load_eval_sets(tmp_path / "absent")
    with pytest.raises(RMCError, match="lower --n"):
        make_eval_sets(model, info, test, 10_000, SPECS[:1])
    with pytest.raises(RMCError, match="repeats"):
        make_eval_sets(model, info, test, 5, [AttackSpec("fgsm", 0.1), AttackSpec("fgsm", 0.1)])
    with pytest.raises(RMCError, match="eps"):
        make_eval_sets(model, info, test, 5, [AttackSpec("fgsm", 1.5)])
    # Sets from other test inputs may not join a directory.
    other = make_eval_sets(model, info, test, 30, [AttackSpec("fgsm", 0.3)], seed=1)
    with pytest.raises(RMCError, match="new --out"):
        save_eval_sets(saved, other)


def _first_file(d):
    entry = json.loads((d / "index.json").read_text())["sets"][1]
    return d / entry["file"]


def test_corrupt_file(saved):
    f = _first_file(saved)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RMCError, match="corrupt"):
        load_eval_sets(saved)


def test_missing_file_and_bad_index(saved):
    _first_file(saved).unlink()
    with pytest.raises(RMCError, match="missing"):
        load_eval_sets(saved)
    (saved / "index.json").write_text("{ not json")
    with pytest.raises(RMCError, match="not valid JSON"):
        load_eval_sets(saved)
    (saved / "index.json").write_text(json.dumps({"sets": []}))
    with pytest.raises(RMCError, match="not an rmc evaluation-set index"):
        load_eval_sets(saved)
    (saved / "index.json").unlink()
    with pytest.raises(RMCError, match="not found"):
        load_eval_sets(saved)


def _rewrite(d, change):
    """Change the tensors of the second set, keeping the index's hash in step (a consistent but bad file)."""
    f = _first_file(d)
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f))
    index = json.loads((d / "index.json").read_text())
    index["sets"][1]["sha256"] = sha256_file(f)
    (d / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("change, match", [
    (lambda t: t.update(images=t["images"] * 255), "divide by 255"),
    (lambda t: t["images"].view(-1).__setitem__(0, float("nan")), "NaN"),
    (lambda t: t.update(images=t["images"][:, 0]), "N x C x H x W"),
    (lambda t: t.update(labels=t["labels"].roll(1)), "same test inputs"),
    (lambda t: t.pop("labels"), "lacks"),
])
def test_inconsistent_file(saved, change, match):
    _rewrite(saved, change)
    with pytest.raises(RMCError, match=match):
        load_eval_sets(saved)
