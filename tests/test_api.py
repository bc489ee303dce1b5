"""The public API of `import rmc`: a few names, each a thin door onto the library, and `import rmc` stays light."""

import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch

import rmc
from rmc.artifacts.features import make_provenance, save_features, store_source
from rmc.cli import main as cli
from rmc.defense import build_rmc as internal_build_rmc
from rmc.defense.knn import NeighbourIndex
from rmc.models import default_layer, extract_features


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A model and its D' made by the CLI on the digits (`rmc train`, `rmc augment`), as a user would."""
    d = tmp_path_factory.mktemp("api")
    assert cli(["train", "--dataset", "digits", "--epochs", "3", "--out", str(d / "m.safetensors"), "--quiet"]) == 0
    assert cli(["augment", "--model", str(d / "m.safetensors"), "--out", str(d / "dprime"), "--steps", "3",
                "--train-subset", "300", "--quiet"]) == 0
    return d


def _cfg(**kw):
    return rmc.RMCConfig(**{"k": 32, "lr": 1e-3, "max_epochs": 2, "batch_size": 16, "calib_k": 32,
                            "calib_flip": False, **kw})


def _test_images(n=6):
    from rmc.data import load_dataset
    test = load_dataset("digits", "test")
    return test.float_images()[:n], test.labels[:n]


def test_import_rmc_pulls_in_nothing_heavy():
    code = ("import sys, rmc; print(sorted(m for m in ('torch', 'numpy', 'faiss', 'ray', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves_and_is_documented():
    for name in rmc.__all__:
        obj = getattr(rmc, name)
        if name != "__version__":
            assert inspect.getdoc(obj), f"rmc.{name} has no docstring"
        if inspect.isclass(obj):                    # and so is each public method or property of a public class
            for member, value in vars(obj).items():
                if not member.startswith("_") and (inspect.isfunction(value) or isinstance(value, property)):
                    assert inspect.getdoc(value), f"rmc.{name}.{member} has no docstring"
    assert rmc.RMC.__module__ == "rmc.defense.core" and rmc.RMCClassifier.__module__ == "rmc.defense.classifier"
    assert dir(rmc) == sorted(rmc.__all__)           # what tab completion offers: the public names
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        rmc.nothing  # noqa: B018 (the lookup is what is tested)


def test_load_model_and_open_dprime_are_the_checkpoint_and_store(made):
    model, info = rmc.load_model(made / "m.safetensors")
    assert isinstance(info, rmc.ModelInfo) and info.dataset == "digits" and not model.training
    store = rmc.open_dprime(made / "dprime")
    assert isinstance(store, rmc.DPrimeStore) and len(store) == 600 and store.model_sha256 == info.sha256
    with pytest.raises(rmc.RMCError, match="not found"):
        rmc.load_model(made / "missing.safetensors")


def test_build_rmc_computes_the_features_itself_and_matches_the_library(made):
    """Given no features, build_rmc embeds D' at the model's default layer: the same neighbours, hence the same
    predictions, as the library's own build_rmc over features computed by hand."""
    model, _ = rmc.load_model(made / "m.safetensors")
    store = rmc.open_dprime(made / "dprime")
    x, _ = _test_images(4)
    ours = rmc.build_rmc(model, made / "dprime", _cfg())
    layer = default_layer(model)
    feats = extract_features(model, layer, store.images).numpy()
    theirs = internal_build_rmc(model, store.dprime(), NeighbourIndex(feats), _cfg(), layer)
    q = extract_features(model, layer, x).numpy()
    for i in range(len(x)):
        a, b = ours.step(x[i:i + 1], q[i:i + 1]), theirs.step(x[i:i + 1], q[i:i + 1])
        assert np.array_equal(a.neighbours, b.neighbours) and a.logits == b.logits
    assert ours.feature_layer == layer


def test_build_rmc_reads_a_feature_file_and_refuses_one_of_another_d_prime_or_layer(made, tmp_path):
    model, info = rmc.load_model(made / "m.safetensors")
    store = rmc.open_dprime(made / "dprime")
    layer = default_layer(model)
    feats = extract_features(model, layer, store.images)
    path = save_features(tmp_path / "f.npy", feats, make_provenance(info, layer, store_source(store), feats))
    from_file = rmc.build_rmc(model, store, _cfg(), features=path)
    assert np.array_equal(from_file.index.vectors(np.arange(5)), feats[:5].numpy())
    with pytest.raises(rmc.RMCError, match="layer"):
        rmc.build_rmc(model, store, _cfg(), features=path, layer="block1")
    other = save_features(tmp_path / "g.npy", feats, make_provenance(info, layer, "store:0123456789ab", feats))
    with pytest.raises(rmc.RMCError, match="source"):
        rmc.build_rmc(model, store, _cfg(), features=other)
    with pytest.raises(rmc.RMCError, match="one row per D' image"):
        rmc.build_rmc(model, store, _cfg(), features=feats[:10])
    with pytest.raises(rmc.RMCError, match="must be an rmc.RMCConfig"):
        rmc.build_rmc(model, store, {"k": 32})
    with pytest.raises(rmc.RMCError, match="D' store"):
        rmc.build_rmc(model, [1, 2, 3], _cfg())


def test_evaluate_is_the_stream_of_steps_and_the_static_accuracy(made):
    model, _ = rmc.load_model(made / "m.safetensors")
    x, y = _test_images(6)
    stream = rmc.build_rmc(model, made / "dprime", _cfg())
    by_hand = rmc.build_rmc(model, made / "dprime", _cfg())
    q = extract_features(model, default_layer(model), x).numpy()
    preds = [by_hand.step(x[i:i + 1], q[i:i + 1]).prediction for i in range(len(x))]
    assert rmc.evaluate(stream, x, y, batch_size=4) == pytest.approx(np.mean(np.array(preds) == y.numpy()))
    assert stream.steps_done == 6                     # online: the defense went along the images, as deployed
    assert all(torch.equal(v, by_hand.state_dict()[k]) for k, v in stream.state_dict().items())
    with torch.no_grad():
        static = (model(x).argmax(1) == y).float().mean().item()
    assert rmc.evaluate(model, x, y) == pytest.approx(static)
    with pytest.raises(rmc.RMCError, match="one integer label per image"):
        rmc.evaluate(model, x, y[:3])
    with pytest.raises(rmc.RMCError, match=r"\[0, 1\]"):
        rmc.evaluate(model, x * 255, y)
    with pytest.raises(rmc.RMCError, match="no images"):
        rmc.evaluate(model, x[:0], y[:0])


def test_classifier_without_a_static_model_uses_the_weights_rmc_started_from(made):
    """RMCClassifier(rmc) alone: a copy of RMC's network at its static weights gives the features, even after the
    online stream moved RMC's own weights."""
    model, _ = rmc.load_model(made / "m.safetensors")
    x, y = _test_images(3)
    defense = rmc.build_rmc(model, made / "dprime", _cfg())
    rmc.evaluate(defense, x, y)                        # the adapted weights now differ from the static ones
    layer = default_layer(model)
    alone, given = rmc.RMCClassifier(defense), rmc.RMCClassifier(defense, model, layer)
    assert alone.layer == layer
    assert torch.equal(extract_features(alone.static, layer, x), extract_features(model, layer, x))
    assert torch.equal(alone(x), given(x))
