"""Features with provenance: computed batch by batch, saved for FAISS, refused when they belong elsewhere."""

import json

import numpy as np
import pytest
import torch

from rmc.artifacts import features as features_mod
from rmc.artifacts.dprime import AugmentConfig, build_dprime_store
from rmc.artifacts.features import (
    compute_features,
    ensure_features,
    evalset_features_path,
    evalset_source,
    load_features,
    make_provenance,
    save_features,
    store_features_path,
    store_source,
    tensor_source,
)
from rmc.cli import main as cli_main
from rmc.errors import RMCError
from rmc.models import ModelInfo, build_model, extract_features, save_checkpoint

CFG = AugmentConfig(steps=(2,), eps=0.1, step_size=0.02, chunk_size=64, batch_size=64, train_subset=100)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digits):
    root = tmp_path_factory.mktemp("feat")
    torch.manual_seed(0)
    model = build_model("small_cnn", 10, 1).eval()
    info = save_checkpoint(model, ModelInfo("small_cnn", 10, (1, 8, 8), dataset="digits"), root / "m.safetensors")
    store = build_dprime_store(model, info, digits[0], root / "store", CFG, progress=False)
    return root, model, info, store


def test_store_features_batchwise_match_and_roundtrip(setup, tmp_path):
    _, model, info, store = setup
    feats = compute_features(model, info, None, store.images, batch_size=37)    # default layer, odd batches
    assert feats.dtype == torch.float32 and feats.shape == (200, 64) and feats.is_contiguous()
    whole = extract_features(model, "block2", store.images[:].float() / 255)
    assert torch.allclose(feats, whole, atol=1e-5)
    prov = make_provenance(info, "block2", store_source(store), feats)
    path = save_features(tmp_path / "d.npy", feats, prov)
    arr = np.load(path)
    assert arr.dtype == np.float32 and arr.flags["C_CONTIGUOUS"] and arr.shape == (200, 64)
    side = json.loads((tmp_path / "d.json").read_text())
    assert {k: side[k] for k in ("model_sha256", "layer", "source", "count", "dim")} == {
        "model_sha256": info.sha256, "layer": "block2", "source": f"store:{store.fingerprint}", "count": 200,
        "dim": 64}
    for mmap in (False, True):
        loaded, p = load_features(path, expect_model_sha256=info.sha256, expect_layer="block2",
                                  expect_source=store_source(store), mmap=mmap)
        assert torch.equal(loaded, feats) and p["count"] == 200
    assert sorted(f.name for f in tmp_path.iterdir()) == ["d.json", "d.npy"]   # no temporary files left


def test_ensure_features_reuses_its_file_and_recomputes_for_another_layer(setup, tmp_path, monkeypatch):
    _, model, info, store = setup
    path = tmp_path / "f.npy"
    first = ensure_features(model, info, "block3", store, path)
    assert np.array_equal(first, load_features(path, info.sha256, "block3", store_source(store))[0].numpy())
    with monkeypatch.context() as m:
        m.setattr(features_mod, "compute_features", lambda *a, **k: pytest.fail("the cached file was not used"))
        assert np.array_equal(ensure_features(model, info, "block3", store, path), first)
    other = ensure_features(model, info, "block2", store, path)   # another layer: recomputed, the file replaced
    assert load_features(path, expect_layer="block2")[0].shape == other.shape and other.shape[0] == 200


def test_provenance_mismatch_refused(setup, tmp_path):
    _, model, info, store = setup
    feats = compute_features(model, info, "block2", store.images[:10])
    path = save_features(tmp_path / "f.npy", feats, make_provenance(info, "block2", store_source(store), feats))
    with pytest.raises(RMCError,
                       match=r"computed with model [0-9a-f]{12} but you are using model 0000.*re-run `rmc features`"):
        load_features(path, expect_model_sha256="0" * 64)
    with pytest.raises(RMCError, match="computed with layer block2 but you are using layer block3"):
        load_features(path, expect_layer="block3")
    with pytest.raises(RMCError, match="source store:.*but you are using source store:other"):
        load_features(path, expect_model_sha256=info.sha256, expect_source="store:other")


def test_missing_or_inconsistent_files_refused(setup, tmp_path):
    _, model, info, store = setup
    with pytest.raises(RMCError, match="not found"):
        load_features(tmp_path / "none.npy")
    feats = torch.rand(5, 3)
    prov = make_provenance(info, "block3", "evalset:x:1", feats)
    path = save_features(tmp_path / "f.npy", feats, prov)
    np.save(tmp_path / "f.npy", np.zeros((4, 3), np.float32))              # replaced behind the sidecar's back
    with pytest.raises(RMCError, match=r"sidecar says float32 \[5, 3\]"):
        load_features(path)
    (tmp_path / "f.json").unlink()
    with pytest.raises(RMCError, match="no provenance sidecar"):
        load_features(path)
    with pytest.raises(RMCError, match="lacks"):
        save_features(tmp_path / "g.npy", feats, {"layer": "x"})
    with pytest.raises(RMCError, match="no layer 'nope'"):
        compute_features(model, info, "nope", store.images[:4])
    with pytest.raises(RMCError, match="C x H x W"):
        compute_features(model, info, None, torch.zeros(2, 1, 28, 28))


def test_sources_follow_content():
    x = torch.rand(4, 1, 8, 8)
    y = torch.arange(4)
    assert tensor_source("a", x, y) == tensor_source("a", x.clone(), y)
    assert tensor_source("a", x, y) != tensor_source("a", x + 1e-3, y)
    assert tensor_source("a", x, y) != tensor_source("b", x, y)


def test_cli_features(setup, tmp_path, digits, capsys):
    root, model, info, store = setup
    from rmc.artifacts.evalsets import AttackSpec, load_eval_sets, make_eval_sets, save_eval_sets
    sets = make_eval_sets(model, info, digits[1], 20, [AttackSpec("clean"), AttackSpec("fgsm", 0.1)], seed=0)
    save_eval_sets(tmp_path / "ev", sets)
    out = tmp_path / "feats"
    model_path = str(root / "m.safetensors")
    assert cli_main(["features", "--model", model_path, "--store", str(store.path), "--evalsets",
                     str(tmp_path / "ev"), "--out", str(out), "--quiet"]) == 0
    f, prov = load_features(store_features_path(out), expect_model_sha256=info.sha256, expect_layer="block2",
                            expect_source=store_source(store))
    assert f.shape == (200, 64)
    for s in load_eval_sets(tmp_path / "ev"):
        g, _ = load_features(evalset_features_path(out, s.name), expect_source=evalset_source(s))
        assert torch.allclose(g, extract_features(model, "block2", s.images), atol=1e-5)
    capsys.readouterr()
    bad = [
        ["--store", str(tmp_path / "nostore")],
        ["--store", str(store.path), "--layer", "nope"],
        ["--store", str(store.path), "--evalsets", str(tmp_path / "noev")],
        ["--store", str(store.path), "--batch-size", "0"],
    ]
    for extra in bad:
        assert cli_main(["features", "--model", model_path, "--out", str(tmp_path / "x"), "--quiet", *extra]) == 2
    assert cli_main(["features", "--model", str(tmp_path / "no.safetensors"), "--store", str(store.path),
                     "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 5 and "no layer 'nope'" in err
