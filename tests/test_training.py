"""Training (seeded determinism, validation), checkpoints, and the `rmc train` / `rmc attack` commands'
handling of bad input."""

import gzip
import json
import re
from pathlib import Path

import pytest
import torch

from rmc.cli import main as cli
from rmc.data import load_dataset
from rmc.data.base import ImageDataset
from rmc.errors import RMCError
from rmc.models import load_checkpoint, save_checkpoint
from rmc.training import TrainConfig, train_model

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_is_seeded(digits):
    train, test = digits
    cfg = TrainConfig(epochs=1, batch_size=64, seed=3, augment=True)
    state = torch.random.get_rng_state()
    m1, i1 = train_model(train, test, cfg, progress=False)
    assert torch.equal(state, torch.random.get_rng_state()), "training must not consume the global RNG"
    torch.manual_seed(123)   # ambient state must not matter
    m2, i2 = train_model(train, test, cfg, progress=False)
    m3, _ = train_model(train, test, TrainConfig(epochs=1, batch_size=64, seed=4, augment=True), progress=False)
    assert _same_weights(m1, m2) and i1.test_accuracy == i2.test_accuracy
    assert not _same_weights(m1, m3)


def test_adversarial_training_is_seeded_and_recorded(digits):
    train, test = digits
    cfg = TrainConfig(epochs=1, batch_size=64, seed=0, adversarial=True, adv_eps=0.1, adv_step_size=0.05,
                      adv_steps=2, train_subset=256)
    m1, info = train_model(train, test, cfg, progress=False)
    m2, _ = train_model(train, test, cfg, progress=False)
    assert _same_weights(m1, m2)
    assert info.adversarial and info.config["adv_steps"] == 2 and info.config["train_size"] == 256


def test_default_training_learns(digits):
    train, test = digits
    model, info = train_model(train, test, TrainConfig(epochs=3, batch_size=64), progress=False)
    assert info.test_accuracy > 0.85
    assert not model.training
    assert info.num_classes == 10 and info.input_shape == (1, 8, 8) and info.dataset == "digits"


@pytest.mark.parametrize("change, match", [
    ({"epochs": 0}, "epochs"),
    ({"lr": -1.0}, "learning rate"),
    ({"lr": float("nan")}, "learning rate"),
    ({"batch_size": 0}, "batch size"),
    ({"train_subset": 0}, "train subset"),
    ({"seed": -1}, "seed"),
    ({"device": "tpu9"}, "device"),
    ({"adversarial": True, "adv_eps": 8.0}, "8/255"),
    ({"adversarial": True, "adv_steps": 0}, "steps"),
])
def test_bad_config_raises(digits, change, match):
    train, test = digits
    with pytest.raises(RMCError, match=match):
        train_model(train, test, TrainConfig(**change), progress=False)


def test_bad_data_raises(digits):
    train, test = digits
    wide = ImageDataset(torch.zeros(4, 1, 9, 9, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), name="x")
    with pytest.raises(RMCError, match="test images"):
        train_model(train, wide, TrainConfig(epochs=1), progress=False)
    with pytest.raises(RMCError, match="ImageDataset"):
        train_model(train.float_images(), test, TrainConfig(epochs=1), progress=False)


@pytest.fixture(scope="module")
def saved(digits, tmp_path_factory):
    train, test = digits
    model, info = train_model(train, test, TrainConfig(epochs=1, batch_size=64), progress=False)
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_checkpoint(model, info, path)
    return model, path


def test_checkpoint_round_trip(saved, digits):
    model, path = saved
    loaded, info = load_checkpoint(path)
    x = digits[1].float_images()
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    meta = json.loads(path.with_suffix(".json").read_text())
    for key in ("arch", "num_classes", "input_shape", "mean", "std", "dataset", "adversarial", "test_accuracy",
                "seed", "config", "sha256"):
        assert key in meta
    assert meta["arch"] == "small_cnn" and meta["input_shape"] == [1, 8, 8] and meta["dataset"] == "digits"
    assert meta["config"]["epochs"] == 1 and len(meta["sha256"]) == 64 and info.sha256 == meta["sha256"]


def _copy(path: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    w = dest / path.name
    w.write_bytes(path.read_bytes())
    w.with_suffix(".json").write_text(path.with_suffix(".json").read_text())
    return w


def _edit_meta(weights: Path, **changes):
    meta_file = weights.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    meta.update(changes)
    meta_file.write_text(json.dumps(meta))


def test_corrupt_or_mismatched_checkpoint_raises(saved, tmp_path):
    _, path = saved
    w = _copy(path, tmp_path / "flip")
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(RMCError, match="does not match its metadata"):
        load_checkpoint(w)
    w = _copy(path, tmp_path / "garbage")
    w.write_bytes(b"not a safetensors file")
    _edit_meta(w, sha256="")
    with pytest.raises(RMCError, match="not a valid safetensors"):
        load_checkpoint(w)
    w = _copy(path, tmp_path / "classes")
    _edit_meta(w, num_classes=5)
    with pytest.raises(RMCError, match="do not fit architecture"):
        load_checkpoint(w)
    w = _copy(path, tmp_path / "nometa")
    w.with_suffix(".json").unlink()
    with pytest.raises(RMCError, match="not found"):
        load_checkpoint(w)


# ---- the commands -----------------------------------------------------------------------------------------

def _err(capsys, argv) -> str:
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "m.safetensors"
    assert cli(["train", "--dataset", "digits", "--epochs", "2", "--batch-size", "64", "--quiet",
                "--out", str(out)]) == 0
    return out


def test_train_and_attack_commands(cli_model, tmp_path, capsys):
    assert cli_model.exists() and cli_model.with_suffix(".json").exists()
    out = tmp_path / "sets"
    assert cli(["attack", "--model", str(cli_model), "--n", "40", "--eps", "0.1", "--pgd", "3:0.1",
                "10:8/255:1/255", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    index = json.loads((out / "index.json").read_text())
    names = [e["name"] for e in index["sets"]]
    assert names == ["clean", "fgsm-eps0.1", "pgd3-eps0.1", "pgd10-eps0.0313725-step0.00392157",
                     "fgsm-eps0.1-targeted", "pgd3-eps0.1-targeted", "pgd10-eps0.0313725-step0.00392157-targeted"]
    for name in names:
        assert name in text
    assert cli(["attack", "--model", str(cli_model), "--n", "10", "--eps", "--pgd", "2:0.1", "--targeted",
                "--out", str(tmp_path / "t")]) == 0
    names = [e["name"] for e in json.loads((tmp_path / "t" / "index.json").read_text())["sets"]]
    assert names == ["clean", "pgd2-eps0.1-targeted"]


@pytest.mark.parametrize("args, match", [
    (["--epochs", "0"], "epochs"),
    (["--lr", "nan"], "learning rate"),
    (["--adversarial", "--adv-eps", "8"], "divide by 255|8/255"),
    (["--adversarial", "--adv-eps", "-0.1"], "eps"),
    (["--adversarial", "--adv-eps", "abc"], "not a number"),
    (["--batch-size", "-1"], "batch size"),
    (["--dataset", "nope"], "unknown dataset"),
    (["--arch", "nope"], "unknown architecture"),
])
def test_train_command_rejects_bad_input(tmp_path, capsys, args, match):
    err = _err(capsys, ["train", "--dataset", "digits", "--quiet", "--out", str(tmp_path / "m.safetensors"), *args])
    assert re.search(match, err), err
    assert not (tmp_path / "m.safetensors").exists()


def test_train_command_rejects_bad_paths(tmp_path, capsys):
    assert "must end in .safetensors" in _err(capsys, ["train", "--dataset", "digits", "--out", str(tmp_path / "m.pt")])
    assert "does not exist" in _err(capsys, ["train", "--data-dir", str(tmp_path / "none"),
                                             "--out", str(tmp_path / "m.safetensors")])
    # A data directory with a truncated images file.
    bad = tmp_path / "bad"
    bad.mkdir()
    with gzip.open(bad / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 3, 0, 0, 0, 10, 0, 0, 0, 28, 0, 0, 0, 28]) + b"\0" * 100)
    with gzip.open(bad / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + b"\0" * 10)
    err = _err(capsys, ["train", "--data-dir", str(bad), "--out", str(tmp_path / "m.safetensors")])
    assert "truncated" in err


@pytest.mark.parametrize("args, match", [
    (["--eps", "8"], "8/255"),
    (["--eps", "nan"], "eps"),
    (["--eps", "-0.1"], "eps"),
    (["--pgd", "10"], "steps:eps"),
    (["--pgd", "0:0.1"], "steps"),
    (["--pgd", "x:0.1"], "not an integer"),
    (["--pgd", "10:2"], "larger than"),
    (["--pgd", "10:0.1:0"], "step size"),
    (["--n", "0"], "number of test inputs"),
    (["--n", "100000"], "lower --n"),
    (["--seed", "-1"], "seed"),
])
def test_attack_command_rejects_bad_input(cli_model, tmp_path, capsys, args, match):
    _err_ = _err(capsys, ["attack", "--model", str(cli_model), "--out", str(tmp_path / "s"), *args])
    assert match in _err_, _err_
    assert not (tmp_path / "s" / "index.json").exists()


def test_attack_command_rejects_bad_model(cli_model, tmp_path, capsys):
    assert "not found" in _err(capsys, ["attack", "--model", str(tmp_path / "no.safetensors"),
                                        "--out", str(tmp_path / "s")])
    w = _copy(cli_model, tmp_path / "corrupt")
    w.write_bytes(w.read_bytes()[:-10])
    assert "does not match its metadata" in _err(capsys, ["attack", "--model", str(w), "--out", str(tmp_path / "s")])


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST absent")
def test_attack_command_rejects_wrong_image_shape(cli_model, tmp_path, capsys):
    # The digits model expects 1 x 8 x 8 images; Fashion-MNIST has 1 x 28 x 28.
    err = _err(capsys, ["attack", "--model", str(cli_model), "--dataset", "fashion-mnist", "--n", "10",
                        "--out", str(tmp_path / "s")])
    assert "(1, 28, 28)" in err and "(1, 8, 8)" in err
