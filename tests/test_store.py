"""The augmented dataset D': layout, true labels, eps bounds, resumption and refusals, on the 8 x 8 digits."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rmc.artifacts import dprime as store_mod
from rmc.artifacts.dprime import (
    AugmentConfig,
    StoreWriter,
    build_dprime_store,
    chunk_tasks,
    copy_names,
    open_dprime_store,
    partial_path,
    quantize_within_eps,
    run_chunk,
)
from rmc.attacks import pgd
from rmc.cli import main as cli_main
from rmc.errors import RMCError
from rmc.models import ModelInfo, build_model, save_checkpoint

CFG = AugmentConfig(steps=(2, 3), eps=0.1, step_size=0.02, seed=0, chunk_size=48, batch_size=32, train_subset=120)
FILES = ["copy.npy", "images.npy", "labels.npy", "manifest.json", "progress.json", "source_index.npy"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, digits):
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    info = save_checkpoint(model, ModelInfo("small_cnn", 10, (1, 8, 8), mean=[0.5], std=[0.5], dataset="digits"),
                           path)
    return model, info, path


@pytest.fixture(scope="module")
def built(tmp_path_factory, model_file, digits):
    model, info, _ = model_file
    out = tmp_path_factory.mktemp("store") / "dprime"
    return build_dprime_store(model, info, digits[0], out, CFG, progress=False)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_layout_and_memmap(built):
    s = built
    assert sorted(p.name for p in s.path.iterdir()) == FILES
    assert not partial_path(s.path).exists()
    assert s.copy_names == ["clean", "pgd2", "pgd3"]
    assert len(s) == 360 and s.images.shape == (360, 1, 8, 8) and s.images.dtype == torch.uint8
    assert s.labels.dtype == torch.int64 and s.copy.dtype == torch.int16 and s.source_index.dtype == torch.int64
    assert s.copy.tolist() == [0] * 120 + [1] * 120 + [2] * 120
    assert s.manifest["counts"] == {"clean": 120, "pgd2": 120, "pgd3": 120}
    assert s.manifest["storage_dtype"] == "uint8" and s.manifest["attack"]["steps"] == [2, 3]
    # The images tensor shares memory with a numpy memmap of images.npy: nothing was read into RAM.
    mm = s.images_memmap
    assert isinstance(mm, np.memmap) and Path(mm.filename).name == "images.npy"
    assert s.images.data_ptr() == mm.ctypes.data
    assert len(s.fingerprint) == 64 and s.fingerprint == store_mod.fingerprint_of(json.loads(
        (s.path / "manifest.json").read_text()))
    assert s.dprime().fingerprint == s.fingerprint   # what record streams key on
    s.verify()
    assert s.copy_rows("pgd3") == slice(240, 360)


def test_true_labels_clean_copy_and_subset(built, digits):
    s, train = built, digits[0]
    src = s.source_index
    assert torch.equal(s.labels, train.labels[src])                       # true labels, every copy
    assert torch.equal(src[:120], src[120:240]) and torch.equal(src[:120], src[240:])
    assert torch.equal(src[:120], src[:120].sort().values) and len(set(src[:120].tolist())) == 120
    assert torch.equal(s.images[:120], train.images[src[:120]])           # copy 0 is the clean data


@pytest.mark.parametrize("label", ["predicted", "true"])
def test_pgd_copies_attack_the_configured_label_and_keep_the_true_one(label, model_file, digits, tmp_path):
    model, info, _ = model_file
    train, cfg = digits[0], dataclasses.replace(CFG, label=label)
    task = next(t for t in chunk_tasks(120, cfg) if t.steps > 0)
    x, y = train.images[:len(task)], train.labels[:len(task)]
    with torch.no_grad():
        pred = model(x.float() / 255).argmax(1)
    assert (pred != y).any()                   # the untrained model is often wrong: the settings differ there
    target = pred if label == "predicted" else y
    adv = pgd(model, x.float() / 255, target, cfg.eps, cfg.step_size, task.steps, random_start=True,
              generator=torch.Generator().manual_seed(task.seed), batch_size=cfg.batch_size)
    got = run_chunk(model, task, x, y, cfg)
    assert torch.equal(got, quantize_within_eps(adv, x, cfg.eps))
    flipped = "true" if label == "predicted" else "predicted"
    other = run_chunk(model, task, x, y, dataclasses.replace(cfg, label=flipped))
    assert not torch.equal(got, other)
    store = build_dprime_store(model, info, train, tmp_path / "d", dataclasses.replace(cfg, steps=(1,)), progress=False)
    assert store.manifest["attack"]["attack_labels"] == label and store.manifest["attack"]["stored_labels"] == "true"
    assert torch.equal(store.labels, train.labels[store.source_index])      # stored with the true label either way
    assert store_mod.config_from_manifest(store.manifest).label == label


def test_adversarial_copies_within_eps_and_effective(built, model_file):
    s = built
    clean = s.images[:120].int()
    for i in (1, 2):
        adv = s.images[i * 120:(i + 1) * 120].int()
        assert (adv - clean).abs().max() <= 25                               # floor(0.1 * 255) levels
        assert (adv != clean).float().mean() > 0.3                           # really perturbed
    model = model_file[0]
    with torch.no_grad():                      # PGD attacked the static model's predictions (augment.label)
        pred = model(s.float_images(s.copy_rows("clean"))).argmax(1)
        loss = [torch.nn.functional.cross_entropy(model(s.float_images(s.copy_rows(n))), pred).item()
                for n in s.copy_names]
    assert loss[1] > loss[0] and loss[2] > loss[0]                          # PGD raised the loss


def test_quantize_stays_in_eps():
    clean = torch.tensor([0, 10, 250, 128], dtype=torch.uint8)
    eps = 8 / 255
    adv = clean.float() / 255 + torch.tensor([-eps, eps, eps, 0.49 / 255])
    q = quantize_within_eps(adv.clamp(0, 1), clean, eps)
    assert q.tolist() == [0, 18, 255, 128]
    # Rounding 8.6 levels up to 9 would leave the ball: re-projected to 8.
    q2 = quantize_within_eps(torch.tensor([(10 + 8.6) / 255]), torch.tensor([10], dtype=torch.uint8), 8.6 / 255)
    assert q2.tolist() == [18]


def test_resume_after_kill_is_byte_identical(tmp_path, model_file, digits, built):
    model, info, _ = model_file
    out = tmp_path / "resumed"
    calls = []

    def kill_after_three(task):
        calls.append(task.index)
        if len(calls) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dprime_store(model, info, digits[0], out, CFG, progress=False, on_chunk=kill_after_three)
    assert not out.exists() and partial_path(out).exists()
    assert json.loads((partial_path(out) / "progress.json").read_text())["done"] == [0, 1, 2]
    with pytest.raises(RMCError, match="not finished.*3 of 9 chunks"):
        open_dprime_store(out)

    # Second kill: the chunk's images are written but the process dies before its progress record.
    real = StoreWriter.write_chunk

    def dies_before_progress(self, task, data):
        if task.copy == 2:
            self.images[task.row_start:task.row_start + len(task)] = data.numpy()
            raise KeyboardInterrupt
        real(self, task, data)

    StoreWriter.write_chunk = dies_before_progress
    try:
        with pytest.raises(KeyboardInterrupt):
            build_dprime_store(model, info, digits[0], out, CFG, progress=False)
    finally:
        StoreWriter.write_chunk = real
    done_before = json.loads((partial_path(out) / "progress.json").read_text())["done"]
    assert done_before == list(range(6))

    redone = []
    s = build_dprime_store(model, info, digits[0], out, CFG, progress=False, on_chunk=lambda t: redone.append(t.index))
    assert redone == [6, 7, 8]                                              # only the unfinished chunks
    assert _bytes(s.path) == _bytes(built.path)                            # identical to the uninterrupted run
    assert s.fingerprint == built.fingerprint


def test_fault_in_a_chunk_task_loses_only_that_chunk(tmp_path, model_file, digits, built):
    """In this process the PGD chunks run as tasks of the inline executor (the executor Ray replaces): a task that
    dies loses its own chunk only, and the rerun gives the same bytes."""
    model, info, _ = model_file
    calls = []

    def fault():   # called by each PGD task after its chunk is computed
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dprime_store(model, info, digits[0], tmp_path / "s", CFG, progress=False, fault=fault)
    assert json.loads((partial_path(tmp_path / "s") / "progress.json").read_text())["done"] == [0, 1, 2, 3]
    redone = []
    s = build_dprime_store(model, info, digits[0], tmp_path / "s", CFG, progress=False,
                           on_chunk=lambda t: redone.append(t.index))
    assert redone == [4, 5, 6, 7, 8] and _bytes(s.path) == _bytes(built.path)


def test_chunks_are_independent_and_deterministic(model_file, digits):
    model, _, _ = model_file
    train = digits[0]
    tasks = chunk_tasks(100, CFG)
    assert [(t.copy, t.start, t.stop) for t in tasks[:3]] == [(0, 0, 48), (0, 48, 96), (0, 96, 100)]
    assert len({t.seed for t in tasks}) == len(tasks)
    t = tasks[4]
    a = run_chunk(model, t, train.images[t.start:t.stop], train.labels[t.start:t.stop], CFG)
    b = run_chunk(model, t, train.images[t.start:t.stop], train.labels[t.start:t.stop], CFG)
    assert a.dtype == torch.uint8 and torch.equal(a, b)
    assert not model.training


def test_complete_store_rerun_is_a_no_op(built, model_file, digits):
    model, info, _ = model_file
    before = _bytes(built.path)
    s = build_dprime_store(model, info, digits[0], built.path, CFG, progress=False,
                        on_chunk=lambda t: pytest.fail("no chunk should run"))
    assert _bytes(s.path) == before


def test_different_settings_or_model_refused(built, model_file, digits, tmp_path):
    model, info, _ = model_file
    with pytest.raises(RMCError, match=r"attack\.steps: existing \[2, 3\], requested \[2, 4\].*new --out or delete"):
        build_dprime_store(model, info, digits[0], built.path, AugmentConfig(**{**CFG.__dict__, "steps": (2, 4)}),
                        progress=False)
    torch.manual_seed(1)
    other = build_model("small_cnn", 10, 1)
    other_info = save_checkpoint(other, ModelInfo("small_cnn", 10, (1, 8, 8), dataset="digits"),
                                 tmp_path / "other.safetensors")
    with pytest.raises(RMCError, match=r"model\.sha256"):
        build_dprime_store(other, other_info, digits[0], built.path, CFG, progress=False)
    # Same refusal for a partial store.
    out = tmp_path / "part"

    def stop(task):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dprime_store(model, info, digits[0], out, CFG, progress=False, on_chunk=stop)
    with pytest.raises(RMCError, match=r"seed: existing 0, requested 1"):
        build_dprime_store(model, info, digits[0], out, AugmentConfig(**{**CFG.__dict__, "seed": 1}), progress=False)


@pytest.mark.parametrize("change, message", [
    ({"steps": ()}, "no PGD copies"),
    ({"steps": (0,)}, "PGD steps"),
    ({"eps": 0.001}, "below one 8-bit level"),
    ({"eps": 2.0}, "larger than the whole"),
    ({"step_size": -1.0}, "step size"),
    ({"chunk_size": 0}, "chunk size"),
    ({"seed": -1}, "seed"),
    ({"label": "target"}, "augment.label must be one of predicted, true"),
])
def test_bad_config_refused(change, message, model_file, digits, tmp_path):
    model, info, _ = model_file
    with pytest.raises(RMCError, match=message):
        build_dprime_store(model, info, digits[0], tmp_path / "x", AugmentConfig(**{**CFG.__dict__, **change}),
                        progress=False)
    assert not (tmp_path / "x").exists() and not partial_path(tmp_path / "x").exists()


def test_model_and_data_mismatch_refused(model_file, digits, tmp_path):
    model, info, _ = model_file
    wrong_shape = ModelInfo(**{**info.__dict__, "input_shape": (1, 28, 28)})
    with pytest.raises(RMCError, match="takes C x H x W"):
        build_dprime_store(model, wrong_shape, digits[0], tmp_path / "x", CFG, progress=False)
    wrong_data = ModelInfo(**{**info.__dict__, "dataset": "fashion-mnist"})
    with pytest.raises(RMCError, match="trained on 'fashion-mnist'"):
        build_dprime_store(model, wrong_data, digits[0], tmp_path / "x", CFG, progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(RMCError, match="not an augmented dataset"):
        build_dprime_store(model, info, digits[0], tmp_path / "busy", CFG, progress=False)


def test_damaged_stores_give_clear_errors(built, tmp_path):
    import shutil
    with pytest.raises(RMCError, match="not found"):
        open_dprime_store(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RMCError, match="no manifest.json"):
        open_dprime_store(tmp_path / "empty")
    bad = tmp_path / "bad"
    shutil.copytree(built.path, bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(RMCError, match="not valid JSON"):
        open_dprime_store(bad)
    (bad / "manifest.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(RMCError, match="not an augmented-dataset manifest"):
        open_dprime_store(bad)
    shutil.copy(built.path / "manifest.json", bad / "manifest.json")
    (bad / "labels.npy").unlink()
    with pytest.raises(RMCError, match="missing labels.npy"):
        open_dprime_store(bad)
    shutil.copy(built.path / "labels.npy", bad / "labels.npy")
    (bad / "images.npy").write_bytes((built.path / "images.npy").read_bytes()[:500])
    with pytest.raises(RMCError, match="images.npy"):
        open_dprime_store(bad)
    shutil.copy(built.path / "images.npy", bad / "images.npy")
    s = open_dprime_store(bad)
    s.images[0, 0, 0, 0] = 7          # copy-on-write: changes the mapping in memory only
    s.images[0, 0, 0, 1] = 255 - int(s.images[0, 0, 0, 1])
    open_dprime_store(bad).verify()
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["content"]["images"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RMCError, match="does not match its manifest hash"):
        open_dprime_store(bad).verify()


def test_copy_names_for_repeated_steps():
    assert copy_names((10, 30, 100)) == ["clean", "pgd10", "pgd30", "pgd100"]
    assert copy_names((40, 40, 40, 40)) == ["clean", "pgd40_1", "pgd40_2", "pgd40_3", "pgd40_4"]


def test_cli_augment(model_file, tmp_path, built, capsys):
    _, _, path = model_file
    out = tmp_path / "cli"
    args = ["augment", "--model", str(path), "--dataset", "digits", "--steps", "2", "3", "--eps", "0.1",
            "--step-size", "0.02", "--chunk-size", "48", "--batch-size", "32", "--train-subset", "120",
            "--out", str(out), "--quiet"]
    assert cli_main(args) == 0
    assert _bytes(out) == _bytes(built.path)                    # the CLI and the library agree byte for byte
    assert "360 images" in capsys.readouterr().out
    bad = {"--eps": "-0.1", "--steps": "0", "--chunk-size": "0", "--train-subset": "0"}
    for flag, value in bad.items():
        i = args.index(flag)
        argv = args[:i + 1] + [value] + args[i + 2:] if flag != "--steps" else args[:i + 1] + [value] + args[i + 3:]
        argv[argv.index("--out") + 1] = str(tmp_path / "bad")
        assert cli_main(argv) == 2, flag
    assert cli_main(["augment", "--model", str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "b")]) == 2
    assert cli_main(args[:args.index("--out") + 1] + [str(built.path), "--seed", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "seed: existing 0, requested 3" in err
