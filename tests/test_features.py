"""Features with provenance: computed batch by batch, saved for FAISS, refused when they belong elsewhere."""

import json

import numpy as np
import pytest
import torch

from rmc.artifacts import features as features_mod
from rmc.artifacts.dprime import AugmentConfig, build_dprime_store
from rmc.artifacts.features import (
    FeatureConfig,
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
    write_features,
)
from rmc.cli import main as cli_main
from rmc.errors import RMCError
from rmc.io import sha256_file
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


def _mapped_file(arr: np.ndarray) -> str | None:
    """The file whose memory map holds `arr`'s data (from /proc/self/maps), or None for anonymous memory."""
    addr = arr.ctypes.data
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(v, 16) for v in parts[0].split("-"))
        if lo <= addr < hi:
            return parts[5] if len(parts) > 5 else None
    return None


def test_written_features_equal_computed_ones_float16_recorded(setup, tmp_path):
    _, model, info, store = setup
    ref = compute_features(model, info, "block3", store.images, batch_size=37)
    for dtype in ("float32", "float16"):
        path = write_features(model, info, "block3", store.images, tmp_path / f"{dtype}.npy", store_source(store),
                              FeatureConfig(dtype=dtype, batch_size=37))
        f, prov = load_features(path, info.sha256, "block3", store_source(store), mmap=True, expect_dtype=dtype)
        assert _mapped_file(f.numpy()) == str(path.resolve())                        # left on disk, mapped
        want = ref if dtype == "float32" else ref.half()
        assert f.dtype == want.dtype and torch.equal(f, want)                       # same batches: same bytes
        assert prov["dtype"] == dtype and prov["precision"] == "fp32" and prov["channels_last"] is False
        assert prov["file_sha256"] == sha256_file(path) and prov["file_bytes"] == path.stat().st_size
    with pytest.raises(RMCError, match="computed with dtype float16 but you are using dtype float32"):
        load_features(tmp_path / "float16.npy", expect_dtype="float32")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["float16.json", "float16.npy", "float32.json", "float32.npy"]


def test_interrupted_write_resumes_from_its_last_batch_to_the_same_bytes(setup, tmp_path, monkeypatch):
    _, model, info, store = setup
    cfg = FeatureConfig(dtype="float16", batch_size=32)
    whole = write_features(model, info, "block3", store.images, tmp_path / "whole.npy", store_source(store), cfg)
    real_write, seen = features_mod.FeatureWriter.write, []

    def counting(self, first, block):
        seen.append(first)
        real_write(self, first, block)

    def dying(self, first, block):
        if first == 96:
            raise KeyboardInterrupt
        seen.append(first)
        real_write(self, first, block)
    monkeypatch.setattr(features_mod.FeatureWriter, "write", dying)
    path = tmp_path / "f.npy"
    with pytest.raises(KeyboardInterrupt):
        write_features(model, info, "block3", store.images, path, store_source(store), cfg)
    assert not path.exists() and seen == [0, 32, 64]
    partial, record = features_mod.partial_paths(path)
    assert json.loads(record.read_text())["rows_done"] == 96
    seen.clear()
    monkeypatch.setattr(features_mod.FeatureWriter, "write", counting)
    write_features(model, info, "block3", store.images, path, store_source(store), cfg)
    assert seen == [96, 128, 160, 192]                                  # only the batches not yet written
    assert path.read_bytes() == whole.read_bytes() and not partial.exists() and not record.exists()
    # a partial write of something else (another layer) is not resumed: it starts over
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(features_mod.FeatureWriter, "write", dying)
        write_features(model, info, "block3", store.images, tmp_path / "g.npy", store_source(store), cfg)
    seen.clear()
    monkeypatch.setattr(features_mod.FeatureWriter, "write", counting)
    write_features(model, info, "block2", store.images, tmp_path / "g.npy", store_source(store), cfg)
    assert seen[0] == 0 and load_features(tmp_path / "g.npy")[1]["layer"] == "block2"


def test_ensure_features_recomputes_for_another_dtype_and_returns_a_memory_map(setup, tmp_path):
    _, model, info, store = setup
    path = tmp_path / "f.npy"
    a = ensure_features(model, info, "block3", store, path)
    b = ensure_features(model, info, "block3", store, path, FeatureConfig(dtype="float16"))
    assert a.dtype == np.float32 and b.dtype == np.float16 and load_features(path)[1]["dtype"] == "float16"
    assert np.array_equal(a.astype(np.float16), b)


def test_feature_config_refusals():
    for bad, match in (({"dtype": "int8"}, "features.dtype"), ({"batch_size": 0}, "features.batch_size"),
                       ({"precision": "fp16"}, "features.precision"), ({"channels_last": "yes"}, "channels_last")):
        with pytest.raises(RMCError, match=match):
            FeatureConfig(**bad)


def test_cli_features_float16(setup, tmp_path):
    root, model, info, store = setup
    out = tmp_path / "f16"
    assert cli_main(["features", "--model", str(root / "m.safetensors"), "--store", str(store.path), "--out", str(out),
                     "--dtype", "float16", "--batch-size", "64", "--quiet"]) == 0
    f, prov = load_features(store_features_path(out), expect_source=store_source(store), expect_dtype="float16")
    ref = compute_features(model, info, None, store.images, batch_size=64)   # the default layer, as the CLI
    assert f.dtype == torch.float16 and prov["store"] == str(store.path) and prov["precision"] == "fp32"
    torch.testing.assert_close(f, ref.half(), rtol=1e-3, atol=1e-3)   # the CLI's model: loaded, its own threads
