"""Issue 15: nothing lost, nothing silently wrong. One test (or more) per class of fault: locks, verified stores,
the atomic step, validation before work, provenance, the inert model sidecar, disk faults. On the 8 x 8 digits."""

import errno
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from rmc.artifacts import dprime as store_mod
from rmc.artifacts.dprime import AugmentConfig, build_dprime_store, open_dprime_store, partial_path
from rmc.cli import main as cli
from rmc.errors import RMCError
from rmc.evaluation.records import RecordStream
from rmc.io import OutputLock, lock_path, sha256_file

AUG = ["--steps", "2", "--eps", "0.1", "--step-size", "0.03", "--chunk-size", "64", "--batch-size", "64",
       "--train-subset", "200", "--quiet"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RMC_CACHE_DIR", str(tmp_path / "cache"))   # verification records stay in the test


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """model, D', evaluation sets and features made by the CLI, as a user would."""
    root = tmp_path_factory.mktemp("ws")
    os.environ.setdefault("RMC_CACHE_DIR", str(root / "cache"))
    model = root / "m.safetensors"
    assert cli(["train", "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--quiet", "--out",
                str(model)]) == 0
    assert cli(["attack", "--model", str(model), "--n", "12", "--eps", "--pgd", "3:0.1", "--untargeted",
                "--out", str(root / "sets")]) == 0
    assert cli(["augment", "--model", str(model), "--out", str(root / "dprime"), *AUG]) == 0
    assert cli(["features", "--model", str(model), "--store", str(root / "dprime"), "--out", str(root / "feats"),
                "--quiet"]) == 0
    return root


def _eval_args(ws, out, store=None, model=None, extra=()):
    return ["evaluate", "--model", str(model or ws / "m.safetensors"), "--store", str(store or ws / "dprime"),
            "--evalsets", str(ws / "sets"), "--features", str(ws / "feats" / "dprime.npy"), "--sets", "clean",
            "--n", "6", "--no-attack-rows", "--set", "rmc.k=32", "--set", "rmc.max_epochs=1", "--out", str(out),
            *extra]


def _copy_store(ws, tmp_path) -> Path:
    dst = tmp_path / "dprime"
    shutil.copytree(ws / "dprime", dst)
    return dst


# ---------------------------------------------------------------- 1. locks, resume by index, stray state

def test_a_second_process_on_the_same_output_is_refused_naming_the_holder(ws, tmp_path, capsys):
    out = tmp_path / "res"
    with OutputLock(out, "rmc evaluate (the first one)"):
        assert cli(_eval_args(ws, out, extra=["--no-rmc"])) == 2
        line = _one_line_error(capsys)
        assert f"pid {os.getpid()}" in line and socket.gethostname() in line and "the first one" in line
        assert not out.exists()                        # refused before any work
    assert not lock_path(out).exists()                 # released
    assert cli(_eval_args(ws, out, extra=["--no-rmc"])) == 0


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_note(ws, tmp_path, capsys):
    out = tmp_path / "res"
    lock_path(out).write_text(json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname(),
                                          "command": "rmc evaluate (killed)", "started": "earlier"}))
    assert cli(_eval_args(ws, out, extra=["--no-rmc"])) == 0
    err = capsys.readouterr().err
    assert "taking over the lock" in err and "dead process" in err and "killed" in err
    assert not lock_path(out).exists()


def test_augment_twice_into_one_output_the_second_is_refused_and_leaves_nothing(ws, tmp_path, capsys):
    out = tmp_path / "d"
    with OutputLock(out, "rmc augment (first)"):
        assert cli(["augment", "--model", str(ws / "m.safetensors"), "--out", str(out), *AUG]) == 2
        assert "in use by another rmc process" in _one_line_error(capsys)
    assert not out.exists() and not partial_path(out).exists()


def test_resume_trusts_record_indices_not_line_counts(tmp_path, capsys):
    rs = RecordStream(tmp_path, "rmc", "fp")
    for i in range(4):
        rs.append({"index": i, "label": 1, "pred": 1})
    lines = (tmp_path / "rmc.jsonl").read_text().splitlines()
    # Interleaved writers: a record repeated and one skipped.
    (tmp_path / "rmc.jsonl").write_text("\n".join([lines[0], lines[1], lines[1], lines[3]]) + "\n")
    RecordStream(tmp_path, "rmc", "fp")   # a reader alone (finished_results) neither repairs nor says so
    again = RecordStream(tmp_path, "rmc", "fp")
    assert [r["index"] for r in again.records] == [0, 1]
    assert capsys.readouterr().err == ""
    again.rewrite()
    again.rewrite()
    assert len((tmp_path / "rmc.jsonl").read_text().splitlines()) == 2
    assert capsys.readouterr().err.count("recomputing from there") == 1


def test_stray_temporaries_of_a_killed_run_are_removed_and_named(ws, tmp_path, capsys):
    out = tmp_path / "res"
    (out / "results").mkdir(parents=True)
    stray = [out / ".results.json.abc123.tmp", out / "results" / "rmc.jsonl.tmp"]
    for f in stray:
        f.write_text("half")
    assert cli(_eval_args(ws, out, extra=["--no-rmc"])) == 0
    assert not any(f.exists() for f in stray)
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


# ---------------------------------------------------------------- 2. stores verified on open

def test_shuffled_labels_of_a_finished_store_are_refused_by_evaluate_features_visualize(ws, tmp_path, capsys):
    store = _copy_store(ws, tmp_path)
    labels = np.load(store / "labels.npy")
    np.save(store / "labels.npy", np.random.default_rng(0).permutation(labels))
    assert cli(_eval_args(ws, tmp_path / "res", store=store, extra=["--no-rmc"])) == 2
    assert "labels.npy does not match its manifest hash" in _one_line_error(capsys)
    assert cli(["features", "--model", str(ws / "m.safetensors"), "--store", str(store), "--out",
                str(tmp_path / "f")]) == 2
    assert "labels.npy" in _one_line_error(capsys)
    assert cli(["visualize", "--model", str(ws / "m.safetensors"), "--store", str(store), "--features",
                str(ws / "feats" / "dprime.npy"), "--evalsets", str(ws / "sets"), "--out",
                str(tmp_path / "n.png")]) == 2
    assert "labels.npy" in _one_line_error(capsys)


def test_zeroed_images_are_refused_and_verification_is_cheap_when_nothing_changed(ws, tmp_path, monkeypatch):
    store = _copy_store(ws, tmp_path)
    open_dprime_store(store)                              # first open: hashes everything, remembers it
    calls = []
    real = store_mod.matches_hash.__globals__["sha256_file"]
    monkeypatch.setitem(store_mod.matches_hash.__globals__, "sha256_file", lambda p: calls.append(Path(p).name)
                        or real(p))
    open_dprime_store(store)
    assert not [c for c in calls if c.endswith(".npy") and c[0].isdigit()]   # unchanged shards: no re-hash
    open_dprime_store(store, verify="full")
    assert "00000.npy" in calls                           # on demand: re-hashed
    mm = np.load(store / "shards" / "00001.npy", mmap_mode="r+")
    mm[:] = 0
    mm.flush()
    del mm
    with pytest.raises(RMCError, match="shards/00001.npy does not match its manifest hash"):
        open_dprime_store(store)


def _partial_build(ws, out, kill_after: int):
    from rmc.data import load_dataset
    from rmc.models import load_checkpoint
    model, info = load_checkpoint(ws / "m.safetensors")
    cfg = AugmentConfig(steps=(2,), eps=0.1, step_size=0.03, chunk_size=64, batch_size=64, train_subset=200)
    seen = []

    def stop(task):
        seen.append(task)
        if len(seen) == kill_after:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dprime_store(model, info, load_dataset("digits", "train"), out, cfg, progress=False, on_chunk=stop)
    return lambda: build_dprime_store(model, info, load_dataset("digits", "train"), out, cfg, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "labels", "progress"])
def test_a_damaged_partial_store_is_rebuilt_never_trusted(ws, tmp_path, damage, capsys):
    out = tmp_path / "d"
    resume = _partial_build(ws, out, kill_after=5)
    part = partial_path(out)
    if damage == "truncate":
        size = (part / "shards" / "00001.npy").stat().st_size
        os.truncate(part / "shards" / "00001.npy", size - 64 * 3)
    elif damage == "overwrite":
        mm = np.load(part / "shards" / "00000.npy", mmap_mode="r+")
        mm[10:20] = 0
        mm.flush()
        del mm
    elif damage == "labels":
        np.save(part / "labels.npy", np.zeros(400, dtype=np.int64))
    else:
        (part / "progress.json").write_text("{broken")
    store = resume()
    ref = ws / "dprime"
    files = ["labels.npy", "copy.npy", "source_index.npy"] + [f"shards/{i:05d}.npy" for i in range(8)]
    for f in files:
        assert sha256_file(store.path / f) == sha256_file(ref / f), f   # byte-identical to an undamaged build
    err = capsys.readouterr().err
    assert {"truncate": "rebuilding", "overwrite": "rebuilding", "labels": "rewriting",
            "progress": "rebuilding every chunk"}[damage] in err


# ---------------------------------------------------------------- 3. the atomic step

@pytest.fixture(scope="module")
def rmc_and_input(tiny_trained, tiny_dprime, digits):
    from rmc.defense import RMC, RMCConfig
    from rmc.defense.knn import NeighbourIndex
    from rmc.models import extract_features
    dprime, feats = tiny_dprime
    rmc = RMC(tiny_trained, dprime, NeighbourIndex(feats), RMCConfig(k=32, max_epochs=2, lr=1e-3, calib_k=32),
              "block3")
    x = digits[1].float_images()[:1]
    return rmc, x, extract_features(tiny_trained, "block3", x).numpy()


def _state(rmc):
    return {k: v.clone() for k, v in rmc.state_dict().items()}, rmc.steps_done


def _same(a, b):
    return a[1] == b[1] and a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


@pytest.mark.parametrize("bad, message", [
    (lambda x: x.repeat(1, 3, 1, 1), "C x H x W"),                 # wrong channel count
    (lambda x: x.clone().fill_(float("nan")), "NaN"),
    (lambda x: x * 2, r"\[0, 1\]"),
    (lambda x: (x * 255).to(torch.uint8), "uint8"),
    (lambda x: (x * 255), "divide by 255"),
    (lambda x: x.repeat(2, 1, 1, 1), "exactly one image"),
    (lambda x: x[:0], "empty batch"),
    (lambda x: x[0], "1 x C x H x W"),
    (lambda x: x.double().long(), "dtype"),
    (lambda x: x.numpy(), "torch.Tensor"),
])
def test_step_refuses_bad_input_before_touching_state(rmc_and_input, bad, message):
    rmc, x, f = rmc_and_input
    before = _state(rmc)
    with pytest.raises(RMCError, match=message):
        rmc.step(bad(x), f)
    assert _same(before, _state(rmc))


def test_step_refuses_bad_features_and_rows(rmc_and_input):
    rmc, x, f = rmc_and_input
    before = _state(rmc)
    for feats, rows, message in [(f[:, :3], None, "features of one input"), (np.full_like(f, np.nan), None, "NaN"),
                                 (np.repeat(f, 2, 0), None, "features of one input"), (None, None, "features"),
                                 (None, np.arange(5), "32 integer"), (None, np.full(32, 10 ** 6), "must lie in")]:
        with pytest.raises(RMCError, match=message):
            rmc.step(x, feats, rows=rows)
    assert _same(before, _state(rmc))


def test_a_step_failing_midway_leaves_the_state_as_it_was(rmc_and_input, monkeypatch):
    rmc, x, f = rmc_and_input
    rmc.step(x, f)                                      # some online history first
    before = _state(rmc)

    def broken(gen):
        raise RuntimeError("out of memory (simulated)")
    monkeypatch.setattr(rmc, "calibrate", broken)     # fails after the adaptation changed the weights
    with pytest.raises(RuntimeError, match="simulated"):
        rmc.step(x, f)
    assert _same(before, _state(rmc))
    monkeypatch.undo()
    fresh = rmc.clone()
    assert rmc.step(x, f).logits == fresh.step(x, f).logits   # the next prediction is as if nothing happened


def test_classifier_checks_the_whole_batch_first_and_an_empty_batch_is_empty(rmc_and_input, tiny_trained):
    from rmc.defense.classifier import RMCClassifier
    rmc, x, _ = rmc_and_input
    clf = RMCClassifier(rmc.clone(), tiny_trained, "block3", stateful=True)
    before = _state(clf.rmc)
    batch = torch.cat([x, x.clone().fill_(float("nan"))])
    with pytest.raises(RMCError, match="NaN"):
        clf(batch)                                       # the good first input was not classified either
    assert _same(before, _state(clf.rmc)) and clf.inputs_seen == 0
    empty = clf(x[:0])
    assert empty.shape == (0, 10)
    with pytest.raises(RMCError, match="uint8"):
        clf((x * 255).to(torch.uint8))


# ---------------------------------------------------------------- 4. values checked before work

@pytest.mark.parametrize("n, message", [("-5", "--n"), ("0", "--n")])
def test_evaluate_n_checked_before_work(ws, tmp_path, capsys, n, message):
    args = _eval_args(ws, tmp_path / "res", extra=["--no-rmc"])
    args[args.index("--n") + 1] = n
    assert cli(args) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("setting, message", [
    ("rmc.k=5000", "exceeds |D'|"), ("attack.n=-3", "attack.n"), ("attack.n=0", "attack.n"),
    ("attack.n=100000", "test set"), ("model.layer=nope", "no layer"), ("visualize.inputs=0", "visualize.inputs"),
    ("attack.pgd=[[0, 0.1]]", "attack.pgd"), ("attack.fgsm_eps=[2]", "fgsm_eps"),
])
def test_run_checks_values_before_training_or_writing_config(tmp_path, capsys, setting, message):
    out = tmp_path / "run"
    assert cli(["run", "--out", str(out), "--set", "data.dataset=digits", "--set", "augment.train_subset=300",
                "--set", "augment.steps=[3]", "--set", setting]) == 2
    assert message in _one_line_error(capsys)
    assert not out.exists()                               # no config.yaml: the corrected command is not refused


def test_a_training_subset_larger_than_the_data_means_at_most(ws):
    from rmc.cli.config import load_config, validate_before_work
    cfg = load_config(None, "default", [("data.dataset", "digits"), ("rmc.k", 64)])
    assert cfg.augment.train_subset == 10000              # the default preset's value, on 1,437 images
    validate_before_work(cfg)                              # fine: "at most 10,000"
    assert len(store_mod.select_subset(torch.zeros(1437, dtype=torch.int64), cfg.augment)) == 1437


def test_an_image_folder_with_an_empty_class_is_refused(tmp_path):
    from PIL import Image

    from rmc.data.imagefolder import load_imagefolder
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(RMCError, match="b has no .png"):
        load_imagefolder("train", tmp_path, 8)


# ---------------------------------------------------------------- 5. provenance in one place

def _model_claiming(ws, tmp_path, **changes) -> Path:
    dst = tmp_path / "other.safetensors"
    shutil.copy(ws / "m.safetensors", dst)
    meta = json.loads((ws / "m.json").read_text())
    meta.update(changes)
    dst.with_suffix(".json").write_text(json.dumps(meta))
    return dst


def test_a_model_of_another_data_set_is_refused_by_evaluate_as_by_augment(ws, tmp_path, capsys):
    model = _model_claiming(ws, tmp_path, dataset="mnist")
    assert cli(_eval_args(ws, tmp_path / "res", model=model, extra=["--no-rmc"])) == 2
    assert "trained on 'mnist'" in _one_line_error(capsys)
    assert cli(["features", "--model", str(model), "--store", str(ws / "dprime"), "--out", str(tmp_path / "f")]) == 2
    assert "trained on 'mnist'" in _one_line_error(capsys)
    assert cli(["augment", "--model", str(model), "--dataset", "digits", "--out", str(tmp_path / "d"), *AUG]) == 2
    assert "trained on 'mnist'" in _one_line_error(capsys)
    assert cli(["attack", "--model", str(model), "--dataset", "digits", "--n", "4", "--out",
                str(tmp_path / "s")]) == 2
    assert "trained on 'mnist'" in _one_line_error(capsys)


# ---------------------------------------------------------------- 6. the sidecar is inert

def test_a_sidecar_naming_a_factory_runs_no_code_unless_the_user_names_it(ws, tmp_path, capsys, monkeypatch):
    import importlib
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    model = _model_claiming(ws, tmp_path, arch="subprocess:Popen")
    assert cli(_eval_args(ws, tmp_path / "res", model=model, extra=["--no-rmc"])) == 2
    assert "--arch subprocess:Popen" in _one_line_error(capsys)
    assert "subprocess" not in imported
    # A factory the user names is built (here rmc's own SmallCNN, through the factory path).
    from rmc.models import load_checkpoint
    trusted = _model_claiming(ws, tmp_path, arch="rmc.models.small_cnn:SmallCNN", mean=None, std=None)
    with pytest.raises(RMCError, match="name it yourself"):
        load_checkpoint(trusted)
    try:
        load_checkpoint(trusted, trust_arch="rmc.models.small_cnn:SmallCNN")
    except RMCError as e:                                 # built; the weights may not fit the default normalisation
        assert "do not fit" in str(e)
    assert "rmc.models.small_cnn" in imported


# ---------------------------------------------------------------- 7. disk faults

def test_augment_on_a_disk_too_small_is_refused_before_work_naming_the_space(ws, tmp_path, capsys, monkeypatch):
    import shutil as sh
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage._replace(free=1000))
    assert cli(["augment", "--model", str(ws / "m.safetensors"), "--out", str(tmp_path / "d"), *AUG]) == 2
    line = _one_line_error(capsys)
    assert "not enough disk space" in line and "needs" in line and str(tmp_path / "d") in line
    assert not (tmp_path / "d").exists() and not partial_path(tmp_path / "d").exists()


def test_disk_full_while_writing_results_is_one_line_naming_the_file(ws, tmp_path, capsys, monkeypatch):
    import rmc.io as io
    real = io.Path.write_text

    def full(self, *a, **kw):
        if self.name.endswith(".tmp") and "results" in self.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **kw)
    monkeypatch.setattr(io.Path, "write_text", full)
    assert cli(_eval_args(ws, tmp_path / "res", extra=["--no-rmc"])) == 2
    line = _one_line_error(capsys)
    assert "disk is full" in line and "results" in line
    assert not [p for p in (tmp_path / "res").rglob("*.tmp")]   # nothing half-written left


@pytest.mark.parametrize("command", ["features", "evaluate", "augment", "attack"])
def test_an_out_that_is_a_file_is_refused_before_work(ws, tmp_path, capsys, command, monkeypatch):
    import rmc.artifacts.features as feats
    monkeypatch.setattr(feats, "compute_features", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "a-file"
    out.write_text("mine")
    args = {"features": ["features", "--model", str(ws / "m.safetensors"), "--store", str(ws / "dprime")],
            "evaluate": _eval_args(ws, out)[:-2],
            "augment": ["augment", "--model", str(ws / "m.safetensors"), *AUG],
            "attack": ["attack", "--model", str(ws / "m.safetensors"), "--n", "4"]}[command]
    assert cli(args + ["--out", str(out)]) == 2
    assert "is a file" in _one_line_error(capsys)
    assert out.read_text() == "mine"


def test_an_unwritable_out_is_refused_before_work(ws, tmp_path, capsys, monkeypatch):
    real = os.open

    def denied(path, *a, **kw):
        if str(path).endswith(".rmc-lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *a, **kw)
    monkeypatch.setattr(os, "open", denied)
    assert cli(_eval_args(ws, tmp_path / "res", extra=["--no-rmc"])) == 2
    assert "choose a writable --out" in _one_line_error(capsys)


def test_disk_full_inside_safetensors_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    import rmc.io as io

    def full(*a, **kw):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    monkeypatch.setattr(io, "save_file", full)
    with pytest.raises(RMCError, match=r"disk is full writing .*state.safetensors"):
        io.save_tensors(tmp_path / "state.safetensors", {"w": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def test_two_spellings_of_one_output_share_one_lock(ws, tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with OutputLock(tmp_path / "real" / "res", "rmc evaluate (first)"):
        assert cli(_eval_args(ws, tmp_path / "link" / "res", extra=["--no-rmc"])) == 2
        assert "in use by another rmc process" in _one_line_error(capsys)
