"""Scale-out on Ray (local, 2 CPUs): sharded augmentation and evaluation give the single-process results, survive a
killed worker (no example lost or counted twice) and an interrupted driver (resume from what was saved)."""

import json
import os
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from rmc.scaleout import ray_backend as distributed  # noqa: E402
from rmc.cli import main as cli_main  # noqa: E402
from rmc.defense.core import RMCConfig  # noqa: E402
from rmc.scaleout.ray_backend import build_dprime_store_distributed, evaluate_distributed  # noqa: E402
from rmc.artifacts.evalsets import EvalSet, save_eval_sets  # noqa: E402
from rmc.evaluation.driver import BaseModel, evaluate  # noqa: E402
from rmc.models import ModelInfo, save_checkpoint  # noqa: E402
from rmc.artifacts.dprime import AugmentConfig, build_dprime_store  # noqa: E402

pytestmark = pytest.mark.slow   # starts Ray once (~10 s) and runs a few dozen RMC steps on 2 workers

AUG = AugmentConfig(steps=(2, 3), eps=0.1, step_size=0.02, seed=0, chunk_size=60, batch_size=32, train_subset=240)
N = 12


@pytest.fixture(scope="module")
def crash_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("crash")


@pytest.fixture(scope="module", autouse=True)
def local_ray(crash_dir):
    """One local Ray with 2 CPUs for the module; RMC_TEST_CRASH_DIR is forwarded to its workers."""
    assert not ray.is_initialized()
    os.environ[distributed.CRASH_ENV] = str(crash_dir)
    try:
        slots = distributed.connect("local", workers=2)
        assert slots == 2
        yield
    finally:
        ray.shutdown()
        os.environ.pop(distributed.CRASH_ENV, None)


def arm(crash_dir: Path, kind: str) -> Path:
    """The next task of this kind kills its worker mid-task (once)."""
    (crash_dir / f"{kind}.fired").unlink(missing_ok=True)
    (crash_dir / kind).write_text("")
    return crash_dir / f"{kind}.fired"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, tiny_trained):
    path = tmp_path_factory.mktemp("model") / "m.safetensors"
    info = save_checkpoint(tiny_trained, ModelInfo("small_cnn", 10, (1, 8, 8), dataset="digits"), path)
    return tiny_trained, info, path


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, model_file, digits):
    model, info, _ = model_file
    return build_dprime_store(model, info, digits[0], tmp_path_factory.mktemp("ref") / "dprime", AUG, progress=False)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def test_augment_identical_to_single_process_despite_killed_worker(tmp_path, model_file, digits, reference_store,
                                                                    crash_dir):
    model, info, _ = model_file
    fired = arm(crash_dir, "augment")
    store = build_dprime_store_distributed(model, info, digits[0], tmp_path / "dprime", AUG, progress=False)
    assert fired.exists(), "the test hook did not kill a worker"
    assert store.manifest == reference_store.manifest
    assert _bytes(store.path) == _bytes(reference_store.path)


def test_augment_interrupted_driver_resumes_to_identical_store(tmp_path, model_file, digits, reference_store):
    model, info, _ = model_file
    written = []

    def interrupt(task):
        written.append(task.index)
        if len(written) == 6:   # the clean copy's 4 chunks and 2 PGD chunks are on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_dprime_store_distributed(model, info, digits[0], tmp_path / "dprime", AUG, progress=False,
                                    on_chunk=interrupt)
    progress = json.loads((tmp_path / "dprime.partial" / "progress.json").read_text())
    assert len(progress["done"]) == 6
    resumed = []
    store = build_dprime_store_distributed(model, info, digits[0], tmp_path / "dprime", AUG, progress=False,
                                        on_chunk=lambda t: resumed.append(t.index))
    assert sorted(resumed) == sorted(set(range(12)) - set(progress["done"]))   # nothing redone
    assert _bytes(store.path) == _bytes(reference_store.path)


# ---------------------------------------------------------------- evaluation

def _cfg(mode: str) -> RMCConfig:
    return RMCConfig(k=64, lr=1e-3, batch_size=32, max_epochs=2, patience=1, mode=mode, calib_k=48,
                     calib_flip=False, seed=3)


@pytest.fixture(scope="module")
def setup(digits, tiny_trained, tiny_dprime):
    dprime, feats = tiny_dprime
    test = digits[1]
    gen = torch.Generator().manual_seed(5)
    sets = [EvalSet("clean", test.float_images()[:N], test.labels[:N], None, torch.arange(N), {"kind": "clean"}),
            EvalSet("noisy", (test.float_images()[:N] + 0.1 * torch.rand(N, 1, 8, 8, generator=gen)).clamp(0, 1),
                    test.labels[:N], (test.labels[:N] + 1) % 10, torch.arange(N), {"kind": "noise"})]
    base = BaseModel("standard", tiny_trained, "sha-of-tiny", "block3", feats)
    return base, dprime, sets


def _strip(results: dict) -> dict:
    """Results without the wall-clock field."""
    return {b: {s: {d: [{k: v for k, v in r.items() if k != "seconds"} for r in recs] for d, recs in ds.items()}
                for s, ds in sets.items()} for b, sets in results.items()}


@pytest.fixture(scope="module")
def reference_eval(tmp_path_factory, setup):
    """Single-process results in both modes (the ground truth)."""
    base, dprime, sets = setup
    out = {}
    for mode in ("episodic", "online"):
        out[mode] = evaluate([base], dprime, sets, _cfg(mode), tmp_path_factory.mktemp(mode), 10, progress=False)
    return out


def _check_once(results: dict) -> None:
    for sets in results.values():
        for name, defenses in sets.items():
            assert [r["index"] for r in defenses["rmc"]] == list(range(N)), name


def test_episodic_identical_to_single_process_despite_killed_worker(tmp_path, setup, reference_eval, crash_dir):
    base, dprime, sets = setup
    fired = arm(crash_dir, "evaluate")
    got = evaluate_distributed([base], dprime, sets, _cfg("episodic"), tmp_path, 10, progress=False, block=2)
    assert fired.exists(), "the test hook did not kill a worker"
    _check_once(got)
    assert _strip(got) == _strip(reference_eval["episodic"])
    lines = (tmp_path / "standard" / "clean" / "rmc.jsonl").read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == list(range(N))   # on disk: every example exactly once


def test_episodic_interrupted_driver_resumes(tmp_path, setup, reference_eval):
    base, dprime, sets = setup
    seen = []

    def interrupt(set_name, record):
        seen.append((set_name, record["index"]))
        if len(seen) == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_distributed([base], dprime, sets, _cfg("episodic"), tmp_path, 10, progress=False, block=3,
                             on_record=interrupt)
    saved = {s.name: (tmp_path / "standard" / s.name / "rmc.jsonl").read_text().splitlines() for s in sets}
    assert sum(len(v) for v in saved.values()) == 7
    again = []
    got = evaluate_distributed([base], dprime, sets, _cfg("episodic"), tmp_path, 10, progress=False, block=3,
                               on_record=lambda s, r: again.append((s, r["index"])))
    assert len(again) == 2 * N - 7 and not set(again) & set(seen)   # only the missing examples were computed
    _check_once(got)
    assert _strip(got) == _strip(reference_eval["episodic"])
    for s in sets:   # what was saved before the interruption is kept as it was
        now = (tmp_path / "standard" / s.name / "rmc.jsonl").read_text().splitlines()
        assert now[:len(saved[s.name])] == saved[s.name]


def test_single_process_run_resumes_under_ray(tmp_path, setup, reference_eval):
    """The record streams are the same files: a single-process run cut short is finished by Ray (and back)."""
    base, dprime, sets = setup
    cfg = _cfg("episodic")
    evaluate([base], dprime, sets[:1], cfg, tmp_path, 10, n=None, progress=False)
    path = tmp_path / "standard" / "clean" / "rmc.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:5]))
    got = evaluate_distributed([base], dprime, sets, cfg, tmp_path, 10, progress=False)
    assert _strip(got) == _strip(reference_eval["episodic"])


def test_online_shards(tmp_path, setup, reference_eval, crash_dir):
    base, dprime, sets = setup
    cfg = _cfg("online")
    one = evaluate_distributed([base], dprime, sets, cfg, tmp_path / "s1", 10, progress=False, block=4)
    assert _strip(one) == _strip(reference_eval["online"])   # S = 1: the single-process stream

    fired = arm(crash_dir, "evaluate")
    two = evaluate_distributed([base], dprime, sets, cfg, tmp_path / "s2", 10, progress=False, shards=2, block=4)
    assert fired.exists()
    _check_once(two)
    inline = evaluate_distributed([base], dprime, sets, cfg, tmp_path / "inline", 10, progress=False, ray=None,
                                  shards=2, block=5)
    assert _strip(two) == _strip(inline)   # S = 2 streams, with or without Ray, any segment size
    seen = []

    def interrupt(set_name, record):
        seen.append(record["index"])
        if len(seen) == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):   # the driver is interrupted mid-run: each stream resumes from its state
        evaluate_distributed([base], dprime, sets, cfg, tmp_path / "s2i", 10, progress=False, shards=2, block=2,
                             on_record=interrupt)
    resumed = evaluate_distributed([base], dprime, sets, cfg, tmp_path / "s2i", 10, progress=False, shards=2, block=3)
    assert _strip(resumed) == _strip(two)
    recs = two["standard"]["clean"]["rmc"]
    assert {r["stream"] for r in recs} == {0, 1} and all(r["streams"] == 2 for r in recs)
    folder = tmp_path / "s2" / "standard" / "clean"
    assert sorted(p.name for p in folder.glob("rmc*.jsonl")) == ["rmc.stream0of2.jsonl", "rmc.stream1of2.jsonl"]
    # Stream 1 starts afresh from the static weights at input 6: its adaptation is the episodic one there.
    first, episodic = recs[N // 2], reference_eval["episodic"]["standard"]["clean"]["rmc"][N // 2]
    assert first["stream"] == 1 and (first["pred"], first["adapt_epochs"]) == (episodic["pred"],
                                                                               episodic["adapt_epochs"])


def test_cli_augment_and_evaluate_with_ray(tmp_path, model_file, digits, reference_store, setup, capsys):
    _, _, model_path = model_file
    base, _, sets = setup
    out = tmp_path / "dprime"
    args = ["augment", "--model", str(model_path), "--out", str(out), "--steps", "2", "3", "--eps", "0.1",
            "--step-size", "0.02", "--chunk-size", "60", "--batch-size", "32", "--train-subset", "240", "--quiet"]
    assert cli_main(args + ["--ray"]) == 0
    assert _bytes(out) == _bytes(reference_store.path)
    save_eval_sets(tmp_path / "sets", sets)
    common = ["evaluate", "--model", str(model_path), "--store", str(out), "--evalsets", str(tmp_path / "sets"),
              "--layer", "block3", "--set", "rmc.k=64", "--set", "rmc.max_epochs=2", "--set", "rmc.lr=0.001",
              "--n", "6", "--no-attack-rows"]
    assert cli_main(common + ["--out", str(tmp_path / "single"), "--mode", "episodic"]) == 0
    assert cli_main(common + ["--out", str(tmp_path / "ray"), "--mode", "episodic", "--ray", "--workers", "2"]) == 0
    single = json.loads((tmp_path / "single" / "results.json").read_text())
    viaray = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert single["table"] == viaray["table"] and viaray["ray"] == "local" and viaray["online_streams"] is None
    assert cli_main(common + ["--out", str(tmp_path / "on"), "--mode", "online", "--ray", "--shards", "2"]) == 0
    assert json.loads((tmp_path / "on" / "results.json").read_text())["online_streams"] == 2
