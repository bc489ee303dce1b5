"""The saved neighbour index of a large D' (rmc.artifacts.index): built in batches from the features on disk, saved
beside them with what it was built from, reused, refused when it does not match, removed with its features."""

import json
import pickle

import numpy as np
import pytest
import torch

from rmc.artifacts import index as index_mod
from rmc.artifacts.features import FORMAT, FeatureWriter, load_features, save_features
from rmc.artifacts.index import index_path, open_index
from rmc.defense import DPrime
from rmc.defense.knn import IndexConfig, IndexKind, NeighbourIndex
from rmc.errors import RMCError
from rmc.evaluation.common import NeighbourSearch
from rmc.io import sha256_file

PROV = {"model_sha256": "m" * 64, "layer": "block3", "source": "store:test"}
CFG = IndexConfig(index="ivfpq", nlist=16, nprobe=16, pq_m=4, rerank=600, add_batch=700)


def _features(tmp_path, n=3000, d=16, dtype="float16", seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(30, d)).astype(np.float32) * 3
    x = centers[rng.integers(30, size=n)] + rng.normal(size=(n, d)).astype(np.float32)
    path = save_features(tmp_path / "dprime.npy", x, {"format": FORMAT, **PROV}, dtype=dtype)
    return path, x


def test_built_in_batches_saved_with_its_sidecar_and_reused(tmp_path, monkeypatch):
    path, x = _features(tmp_path)
    batches = []
    real = index_mod.build_ivf
    monkeypatch.setattr(index_mod, "build_ivf", lambda v, s, b, p: real(v, s, b, lambda r: (batches.append(r), p(r))))
    index = open_index(path, CFG)
    assert batches == [0, 700, 700, 700, 700, 200]                # trained, then add_batch rows at a time
    settings = CFG.build_settings(3000, 16)
    saved = index_path(path, settings)
    side = json.loads(saved.with_suffix(".json").read_text())
    assert side["features"] == {"file": "dprime.npy", "sha256": sha256_file(path), "bytes": path.stat().st_size,
                                "count": 3000, "dim": 16, "dtype": "float16"}
    assert {k: side[k] for k in ("kind", "nlist", "pq_m", "pq_bits", "seed", "nprobe", "train_rows")} == {
        "kind": "ivfpq", "nlist": 16, "pq_m": 4, "pq_bits": 8, "seed": 0, "nprobe": 16, "train_rows": 1024}
    assert side["index_sha256"] == sha256_file(saved)
    assert sorted(f.name for f in tmp_path.iterdir()) == sorted(["dprime.npy", "dprime.json", saved.name,
                                                                 saved.with_suffix(".json").name])
    q = x[:5] + 0.01
    first = index.search(q, 30)
    monkeypatch.setattr(index_mod, "build_ivf", lambda *a: pytest.fail("the saved index was not reused"))
    again = open_index(path, CFG)
    assert again.kind is IndexKind.IVFPQ
    assert np.array_equal(again.search(q, 30)[1], first[1])
    assert np.array_equal(first[1], NeighbourIndex(x.astype(np.float16)).search(q, 30)[1])   # every list probed
    # search-time settings do not rebuild; build settings name another file
    assert open_index(path, IndexConfig(**{**CFG.__dict__, "nprobe": 2})).nprobe == 2
    assert index_path(path, IndexConfig(**{**CFG.__dict__, "nlist": 8}).build_settings(3000, 16)) != saved


def test_flat_is_not_saved(tmp_path):
    path, x = _features(tmp_path, dtype="float32")
    index = open_index(path, IndexConfig())                      # auto: a small matrix is searched exactly
    assert index.kind is IndexKind.FLAT and sorted(f.name for f in tmp_path.iterdir()) == ["dprime.json", "dprime.npy"]


def test_mismatched_or_damaged_index_refused_in_one_line(tmp_path):
    path, x = _features(tmp_path)
    open_index(path, CFG)
    saved = index_path(path, CFG.build_settings(3000, 16))
    side = saved.with_suffix(".json")
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "features": {**meta["features"], "sha256": "0" * 64}}))
    with pytest.raises(RMCError, match=r"^index dprime\.index-ivfpq-\w+\.faiss was built from other features "
                                       r"\(sha256 000000000000 but the features now have [0-9a-f]{12}\); delete"):
        open_index(path, CFG)
    side.write_text(json.dumps({**meta, "nlist": 8}))
    with pytest.raises(RMCError, match="built with nlist = 8, not 16"):
        open_index(path, CFG)
    side.write_text(json.dumps(meta))
    data = bytearray(saved.read_bytes())
    data[len(data) // 2] ^= 1
    saved.write_bytes(bytes(data))
    with pytest.raises(RMCError, match="does not match the sha256") as e:
        open_index(path, CFG)
    assert "\n" not in str(e.value)
    side.write_text("{not json")
    with pytest.raises(RMCError, match="not valid JSON"):
        open_index(path, CFG)


def test_new_features_remove_the_old_index(tmp_path):
    path, x = _features(tmp_path)
    open_index(path, CFG)
    assert len(list(tmp_path.iterdir())) == 4
    _features(tmp_path, seed=1)                                   # the features replaced: their index goes
    assert sorted(f.name for f in tmp_path.iterdir()) == ["dprime.json", "dprime.npy"]


def test_neighbour_search_uses_the_saved_index_and_travels_as_a_path(tmp_path):
    path, x = _features(tmp_path)
    copy = torch.zeros(3000, dtype=torch.long)
    copy[1000:] = 1
    dprime = DPrime(torch.zeros(3000, 1, 2, 2, dtype=torch.uint8), torch.zeros(3000, dtype=torch.long), copy)
    feats = load_features(path, mmap=True)[0].numpy()
    search = NeighbourSearch(feats, dprime, CFG, path)
    q = x[:4] + 0.01
    rows = search.clean.search(q, 20)[1]
    assert (rows < 1000).all() and search.all.kind is IndexKind.IVFPQ
    assert index_path(path, CFG.build_settings(3000, 16)).exists()
    exact = NeighbourIndex(x[:1000].astype(np.float16)).search(q, 20)[1]
    assert np.array_equal(rows, exact)
    blob = pickle.dumps(search)
    assert len(blob) < 30_000                                     # the path, not 3000 x 16 features
    other = pickle.loads(blob)
    assert np.array_equal(other.all.search(q, 20)[1], search.all.search(q, 20)[1])


def test_feature_writer_holds_one_block_in_memory(tmp_path):
    import tracemalloc
    n, d, block = 40_000, 256, 1000                             # 40 MB of float32 written, 1 MB at a time
    tracemalloc.start()
    with FeatureWriter(tmp_path / "f.npy", n, "float32", {**PROV, "batch_size": block}) as w:
        for first in range(0, n, block):
            w.write(first, np.full((block, d), first, np.float32))
            if first == 0:
                tracemalloc.reset_peak()
        peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    w.finish({"format": FORMAT, **PROV})
    assert peak < 4 * block * d * 4                               # a few blocks, never the 40 MB matrix
    f, prov = load_features(tmp_path / "f.npy", mmap=True)
    assert f.shape == (n, d) and float(f[-1, 0]) == n - block and prov["file_sha256"] == sha256_file(tmp_path / "f.npy")


def test_evaluation_with_an_exhaustive_ivf_index_matches_flat_under_another_fingerprint(tiny_trained, tiny_dprime,
                                                                                       digits, tmp_path):
    from rmc.artifacts.evalsets import AttackSpec, make_eval_sets
    from rmc.defense import RMCConfig
    from rmc.evaluation.common import BaseModel
    from rmc.evaluation.driver import evaluate, stream_fingerprint
    from rmc.models import ModelInfo
    dprime, feats = tiny_dprime
    info = ModelInfo("small_cnn", 10, (1, 8, 8), sha256="t" * 64, dataset="digits")
    sets = make_eval_sets(tiny_trained, info, digits[1], 8, [AttackSpec("clean")], seed=0)
    cfg = RMCConfig(k=32)
    flat = BaseModel("standard", tiny_trained, info.sha256, "block3", feats)
    ivf = BaseModel("standard", tiny_trained, info.sha256, "block3", feats,
                    index=IndexConfig(index="ivf", nlist=8, nprobe=8, rerank=64))   # every list: exact again
    a = evaluate([flat], dprime, sets, cfg, tmp_path / "a", 10, with_rmc=False, progress=False)
    b = evaluate([ivf], dprime, sets, cfg, tmp_path / "b", 10, with_rmc=False, progress=False)
    assert a == b
    assert flat.search_settings() == {} and ivf.search_settings()["kind"] == "ivf"
    assert stream_fingerprint(flat, dprime, sets[0], cfg, 8) != stream_fingerprint(ivf, dprime, sets[0], cfg, 8)


def test_results_folder_key_follows_changed_search_settings_only():
    from rmc.cli.config import load_config
    from rmc.cli.pipeline import results_key
    key = lambda *o: results_key(load_config(overrides=list(o)), "m", "d", "l", 1, True)  # noqa: E731
    assert key() == key(("knn.index", "auto")) == key(("features.batch_size", 64))   # defaults, and speed only
    assert len({key(), key(("knn.index", "ivfpq")), key(("knn.nprobe", 8)), key(("features.dtype", "float16"))}) == 4
