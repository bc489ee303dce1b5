"""`rmc import-model`: pretrained weights from a state dict (.pt / .pth with the usual wrappers, safetensors) or
Keras' ResNet152V2 .h5 become an rmc checkpoint with provenance and the source's logits; whatever needs
unpickling or does not fit is refused in one line. `rmc run` then uses imported weights instead of training."""

import json
import sys

import numpy as np
import pytest
import torch
from reference_nets import (
    KERAS_BLOCKS,
    close,
    keras_weights,
    random_state,
    reference_keras_v2,
    reference_v1,
    torchvision_layout,
    write_keras_h5,
)
from safetensors.torch import save_file

from rmc.cli import main as cli
from rmc.errors import RMCError
from rmc.io import sha256_file
from rmc.models import build_model, load_checkpoint
from rmc.models.importing import Preprocessing, import_weights


@pytest.fixture(scope="module")
def resnet50_state():
    """A torchvision-layout ResNet-50 state dict with 10 classes (random weights)."""
    return random_state(torchvision_layout(50, 10), torch.Generator().manual_seed(7))


def _import(tmp_path, source, *extra):
    out = tmp_path / "imported.safetensors"
    code = cli(["import-model", str(source), "--out", str(out), *extra])
    return code, out


def _save(obj, path):
    if str(path).endswith(".safetensors"):
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("name,wrap", [
    ("plain.pth", lambda sd: sd),
    ("wrapped.pt", lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 90,
                               "best_acc1": torch.tensor(76.1)}),
    ("nested.pt", lambda sd: {"model": {"model_state_dict": sd}, "args": {"lr": 0.1}}),
    ("weights.safetensors", lambda sd: {k: v.contiguous() for k, v in sd.items()}),
])
def test_torchvision_resnet50_imports_with_provenance_and_the_sources_logits(tmp_path, resnet50_state, name, wrap):
    source = _save(wrap(resnet50_state), tmp_path / name)
    code, out = _import(tmp_path, source, "--arch", "resnet50", "--input-size", "64", "--dataset", "imagefolder")
    assert code == 0
    model, info = load_checkpoint(out)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        close(model(x), reference_v1(resnet50_state, x, 50)[0])
    assert info.num_classes == 10 and info.input_shape == (3, 64, 64) and info.dataset == "imagefolder"
    assert info.mean == pytest.approx([0.485, 0.456, 0.406]) and info.std == pytest.approx([0.229, 0.224, 0.225])
    src = info.imported
    assert src["source_sha256"] == sha256_file(source) and src["source_name"] == name
    assert src["format"] == ("safetensors" if name.endswith(".safetensors") else "torch")
    assert src["num_classes"] == "weights" and src["ignored_keys"] == [] and not src["preprocessing"]["stated"]


def test_stated_preprocessing_is_used_and_recorded(tmp_path, resnet50_state):
    source = _save(resnet50_state, tmp_path / "w.pt")
    code, out = _import(tmp_path, source, "--arch", "resnet50", "--input-size", "32", "--mean", "0.5", "0.4", "0.3",
                        "--std", "0.2", "0.25", "0.3", "--num-classes", "10")
    assert code == 0
    model, info = load_checkpoint(out)
    assert info.mean == pytest.approx([0.5, 0.4, 0.3]) and info.std == pytest.approx([0.2, 0.25, 0.3])
    assert info.imported["preprocessing"]["stated"] and info.imported["num_classes"] == "given"
    assert model.normalize.mean.flatten().tolist() == pytest.approx([0.5, 0.4, 0.3])


@pytest.mark.slow
def test_keras_resnet152v2_h5_and_the_v2_state_dict_import_with_kerass_logits(tmp_path, capsys):
    w = keras_weights(KERAS_BLOCKS, 10, np.random.default_rng(11))
    write_keras_h5(tmp_path / "resnet152v2.h5", w)
    code, out = _import(tmp_path, tmp_path / "resnet152v2.h5", "--arch", "resnet152v2", "--input-size", "64")
    assert code == 0, capsys.readouterr().err
    model, info = load_checkpoint(out)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    keras_logits = reference_keras_v2(w, x, KERAS_BLOCKS)[0]
    with torch.no_grad():
        close(model(x), keras_logits)
    assert info.imported["format"] == "keras-h5" and info.mean == [0.5, 0.5, 0.5] and info.std == [0.5, 0.5, 0.5]
    # The v2 network's PyTorch state dict imports the same way.
    source = _save(model.state_dict(), tmp_path / "v2.pt")
    again, _ = load_checkpoint(_import(tmp_path, source, "--arch", "resnet152v2", "--input-size", "64")[1])
    with torch.no_grad():
        close(again(x), keras_logits)


def _refused(capsys, code, *parts):
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    for part in parts:
        assert part in err, err
    return err


def test_a_pickled_whole_model_is_refused_in_one_line_naming_the_fix(tmp_path, capsys):
    torch.save(build_model("small_cnn", 10, 1), tmp_path / "whole.pt")
    code, out = _import(tmp_path, tmp_path / "whole.pt", "--arch", "small_cnn", "--input-size", "8",
                        "--channels", "1")
    _refused(capsys, code, "pickled", "rmc never unpickles", "state_dict()", "SmallCNN")
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_keys_that_do_not_fit_are_refused_unless_only_unexpected_ones_are_dropped(tmp_path, capsys, resnet50_state):
    missing = {k: v for k, v in resnet50_state.items() if k != "layer2.1.bn2.running_var"}
    code, _ = _import(tmp_path, _save(missing, tmp_path / "m.pt"), "--arch", "resnet50", "--input-size", "32")
    _refused(capsys, code, "lacks 1 entries", "layer2.1.bn2.running_var")

    extra = {**resnet50_state, "aux_head.weight": torch.zeros(3, 3)}
    code, _ = _import(tmp_path, _save(extra, tmp_path / "x.pt"), "--arch", "resnet50", "--input-size", "32")
    _refused(capsys, code, "aux_head.weight", "--ignore-unexpected")
    code, out = _import(tmp_path, tmp_path / "x.pt", "--arch", "resnet50", "--input-size", "32",
                        "--ignore-unexpected")
    assert code == 0 and load_checkpoint(out)[1].imported["ignored_keys"] == ["aux_head.weight"]

    code, _ = _import(tmp_path, tmp_path / "m.pt", "--arch", "resnet101", "--input-size", "32")
    _refused(capsys, code, "lacks", "resnet101", "check --arch")
    code, _ = _import(tmp_path, _save(resnet50_state, tmp_path / "w.pt"), "--arch", "resnet50", "--input-size", "32",
                      "--channels", "1", "--mean", "0.5", "--std", "0.5")
    _refused(capsys, code, "conv1.weight (64, 3, 7, 7) vs (64, 1, 7, 7)")
    code, _ = _import(tmp_path, tmp_path / "w.pt", "--arch", "resnet50", "--input-size", "32", "--num-classes", "5")
    _refused(capsys, code, "fc.weight (10, 2048) vs (5, 2048)")


@pytest.mark.parametrize("content,message", [
    (b"not a torch file at all", "not a readable PyTorch file"),
    ({"epoch": 3, "lr": 0.1}, "not a state dict"),
    ({}, "not a state dict"),
])
def test_files_that_are_not_state_dicts_are_refused(tmp_path, capsys, content, message):
    path = tmp_path / "w.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    code, _ = _import(tmp_path, path, "--arch", "small_cnn", "--input-size", "8", "--channels", "1")
    _refused(capsys, code, message)


def test_formats_and_architectures_that_cannot_be_read_are_refused(tmp_path, capsys, monkeypatch, resnet50_state):
    (tmp_path / "w.onnx").write_bytes(b"x")
    code, _ = _import(tmp_path, tmp_path / "w.onnx", "--arch", "resnet50", "--input-size", "32")
    _refused(capsys, code, "cannot tell the format", ".safetensors")
    write_keras_h5(tmp_path / "k.h5", keras_weights((2, 2, 2, 2), 4, np.random.default_rng(0)))
    code, _ = _import(tmp_path, tmp_path / "k.h5", "--arch", "resnet50", "--input-size", "32")
    _refused(capsys, code, "Keras .h5 weights are read for ['resnet152v2'] only")
    source = _save(resnet50_state, tmp_path / "w.pt")
    monkeypatch.setitem(sys.modules, "timm", None)   # timm not installed: `import timm` fails
    code, _ = _import(tmp_path, source, "--arch", "timm:resnet50", "--input-size", "32")
    _refused(capsys, code, "needs timm", "pip install timm")
    code, _ = _import(tmp_path, source, "--arch", "timm:hf-hub:org/model", "--input-size", "32")
    _refused(capsys, code, "no hub names")
    grey = _save(random_state(torchvision_layout(50, 10) | {"conv1.weight": (64, 1, 7, 7)}, torch.Generator()),
                 tmp_path / "grey.pt")
    code, _ = _import(tmp_path, grey, "--arch", "resnet50", "--input-size", "32", "--channels", "1")
    _refused(capsys, code, "normalises 3 channels by default", "one value per channel")
    code, _ = _import(tmp_path, grey, "--arch", "resnet50", "--input-size", "32", "--channels", "1", "--mean", "0.5",
                      "--std", "0.3")
    assert code == 0
    small = _save(build_model("small_cnn", 10, 1).state_dict(), tmp_path / "small.pt")
    code, _ = _import(tmp_path, small, "--arch", "small_cnn", "--channels", "1", "--input-size", "1")
    _refused(capsys, code, "cannot run on 1 x 1 x 1 images", "--input-size")


def test_normalisation_kept_in_a_state_dict_is_filled_from_the_stated_values_or_must_agree(tmp_path, capsys):
    """small_cnn keeps its statistics in its state dict: a file without them takes the stated ones; a file with
    them keeps its own, and a different --mean is refused rather than silently ignored."""
    model = build_model("small_cnn", 10, 1, mean=(0.3,), std=(0.2,)).eval()
    bare = {k: v for k, v in model.state_dict().items() if not k.startswith("normalize.")}
    code, out = _import(tmp_path, _save(bare, tmp_path / "bare.pt"), "--arch", "small_cnn", "--input-size", "8",
                        "--channels", "1", "--mean", "0.3", "--std", "0.2")
    assert code == 0
    imported, info = load_checkpoint(out)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(imported(x), model(x))
    assert info.mean == pytest.approx([0.3]) and info.std == pytest.approx([0.2])

    full = _save(model.state_dict(), tmp_path / "full.pt")
    code, out = _import(tmp_path, full, "--arch", "small_cnn", "--input-size", "8", "--channels", "1")
    assert code == 0 and load_checkpoint(out)[1].mean == pytest.approx([0.3])
    code, _ = _import(tmp_path, full, "--arch", "small_cnn", "--input-size", "8", "--channels", "1",
                      "--mean", "0.5", "--std", "0.5")
    _refused(capsys, code, "carries its own normalisation", "normalize.mean")


def test_a_factory_architecture_imports_and_is_built_again_only_when_trusted(tmp_path, capsys, tiny_trained):
    source = _save(tiny_trained.state_dict(), tmp_path / "w.pt")
    factory = "rmc.models.small_cnn:SmallCNN"
    code, _ = _import(tmp_path, source, "--arch", factory, "--input-size", "8", "--channels", "1",
                      "--mean", "0.5", "--std", "0.5")
    _refused(capsys, code, "puts its own normalisation inside its model")
    code, out = _import(tmp_path, source, "--arch", factory, "--input-size", "8", "--channels", "1")
    assert code == 0
    with pytest.raises(RMCError, match="code outside rmc"):
        load_checkpoint(out)
    model, info = load_checkpoint(out, trust_arch=factory)
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), tiny_trained(x))
    assert info.mean == [0.5] and info.imported["architecture"] == factory


def test_import_weights_checks_the_stated_preprocessing(tmp_path, resnet50_state):
    source = _save(resnet50_state, tmp_path / "w.pt")
    for pre, match in [(Preprocessing(0), "--input-size"), (Preprocessing(32, 3, [0.5, 0.5, 0.5], None), "together"),
                       (Preprocessing(32, 3, [0.5], [0.5]), "one value per channel"),
                       (Preprocessing(32, 3, [0.5] * 3, [0.5, 0.0, 0.5]), "> 0")]:
        with pytest.raises(RMCError, match=match):
            import_weights(source, "resnet50", pre)


# ---------------------------------------------------------------- rmc run with imported weights

RUN_TINY = ["--set", "data.dataset=digits", "--set", "augment.train_subset=200", "--set", "augment.steps=[2]",
            "--set", "attack.n=4", "--set", "attack.pgd=[[3, 0.15]]", "--set", "attack.targeted=false",
            "--set", "rmc.k=16", "--set", "rmc.calib_k=16", "--set", "rmc.max_epochs=1", "--set", "visualize.inputs=2",
            "--no-attack-rows"]


def test_rmc_run_with_imported_weights_skips_training_and_runs_every_other_stage(tmp_path, capsys, tiny_trained,
                                                                                 digits):
    source = _save(tiny_trained.state_dict(), tmp_path / "digits_cnn.pt")
    imported = tmp_path / "digits_cnn.safetensors"
    assert cli(["import-model", str(source), "--arch", "small_cnn", "--input-size", "8", "--channels", "1",
                "--dataset", "digits", "--out", str(imported)]) == 0
    model, info = load_checkpoint(imported)
    test = digits[1].float_images()
    with torch.no_grad():
        assert torch.equal(model(test), tiny_trained(test))

    run = tmp_path / "run"
    assert cli(["run", "--out", str(run), *RUN_TINY, "--weights", f"standard={imported}"]) == 0
    out = capsys.readouterr().out
    assert "not trained here" in out and "RMC" in out
    meta = json.loads((run / "results.json").read_text())
    assert [s["stage"] for s in meta["stages"]] == ["import standard", "attack standard", "augment standard",
                                                    "features standard", "evaluate standard", "visualize"]
    assert (run / "report.html").exists() and (run / "neighbours.png").exists()
    assert not (run / "models").exists()                                   # nothing trained, nothing copied
    assert meta["stage_dirs"]["standard"]["model"] == str(imported)
    assert meta["models"]["standard"]["sha256"] == info.sha256 == meta["stores"]["standard"]["model_sha256"]
    assert meta["models"]["standard"]["imported"]["source_sha256"] == sha256_file(source)
    assert meta["config"]["model"]["weights"] == {"standard": str(imported)}
    assert meta["table"]["rows"]["RMC"]["clean"]["accuracy"]["n"] == 4


def test_rmc_run_refuses_imported_weights_that_do_not_fit_before_any_work(tmp_path, capsys, tiny_trained):
    source = _save(tiny_trained.state_dict(), tmp_path / "w.pt")
    big = tmp_path / "big.safetensors"
    assert cli(["import-model", str(source), "--arch", "small_cnn", "--input-size", "16", "--channels", "1",
                "--out", str(big)]) == 0
    capsys.readouterr()
    run = tmp_path / "run"
    _refused(capsys, cli(["run", "--out", str(run), *RUN_TINY, "--weights", f"standard={big}"]),
             "(1, 16, 16)", "(1, 8, 8)")
    _refused(capsys, cli(["run", "--out", str(run), *RUN_TINY, "--weights", f"adversarial={big}"]),
             "not in model.bases")
    _refused(capsys, cli(["run", "--out", str(run), *RUN_TINY, "--weights", "standard"]), "BASE=CHECKPOINT")
    _refused(capsys, cli(["run", "--out", str(run), *RUN_TINY, "--weights", f"standard={tmp_path / 'no.safetensors'}"]),
             "not found")
    assert not (run / "config.yaml").exists()
