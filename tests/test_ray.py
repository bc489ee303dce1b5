"""Scale-out on Ray (local, 2 CPUs): sharded augmentation and evaluation give the single-process results, survive a
killed worker (no example lost or counted twice) and an interrupted driver (resume from what was saved)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from rmc.artifacts.dprime import AugmentConfig, build_dprime_store  # noqa: E402
from rmc.artifacts.evalsets import EvalSet, save_eval_sets  # noqa: E402
from rmc.cli import main as cli_main  # noqa: E402
from rmc.defense import RMCConfig  # noqa: E402
from rmc.evaluation import driver  # noqa: E402
from rmc.evaluation.common import BaseModel  # noqa: E402
from rmc.evaluation.driver import evaluate  # noqa: E402
from rmc.models import ModelInfo, save_checkpoint  # noqa: E402
from rmc.scaleout import executors  # noqa: E402

pytestmark = pytest.mark.slow   # starts Ray once (~10 s) and runs a few dozen RMC steps on 2 workers

AUG = AugmentConfig(steps=(2, 3), eps=0.1, step_size=0.02, seed=0, chunk_size=60, batch_size=32, train_subset=240)
N = 12


class KillWorker:
    """A `fault` hook: once armed, the first task to call it kills its own worker process mid-task (once)."""

    def __init__(self, folder: Path):
        self.marker, self.fired = folder / "armed", folder / "fired"

    def arm(self) -> "KillWorker":
        self.fired.unlink(missing_ok=True)
        self.marker.write_text("")
        return self

    def __call__(self) -> None:
        try:
            os.rename(self.marker, self.fired)   # atomic: exactly one task wins
        except OSError:
            return
        os._exit(1)


# Ray's workers cannot import this test module: the hook travels by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture
def kill(tmp_path_factory):
    return KillWorker(tmp_path_factory.mktemp("kill"))


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """One local Ray with 2 CPUs for the module (each driver call reuses it)."""
    assert not ray.is_initialized()
    try:
        slots = executors.connect("local", workers=2)
        assert slots == 2
        yield
    finally:
        ray.shutdown()


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
    """Every file under `folder` (shards included) by relative path."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_augment_identical_to_single_process_despite_killed_worker(tmp_path, model_file, digits, reference_store,
                                                                    kill):
    model, info, _ = model_file
    store = build_dprime_store(model, info, digits[0], tmp_path / "dprime", AUG, progress=False, ray="local",
                               fault=kill.arm())
    assert kill.fired.exists(), "the fault hook did not kill a worker"
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
        build_dprime_store(model, info, digits[0], tmp_path / "dprime", AUG, progress=False, on_chunk=interrupt,
                           ray="local")
    progress = json.loads((tmp_path / "dprime.partial" / "progress.json").read_text())
    assert len(progress["done"]) == 6
    resumed = []
    store = build_dprime_store(model, info, digits[0], tmp_path / "dprime", AUG, progress=False,
                               on_chunk=lambda t: resumed.append(t.index), ray="local")
    assert sorted(resumed) == sorted(set(range(12)) - set(progress["done"]))   # nothing redone
    assert _bytes(store.path) == _bytes(reference_store.path)


def test_augment_reads_a_lazy_image_folder_on_the_workers(tmp_path, monkeypatch):
    """A lazy training set goes to Ray's workers as its file list (they decode their chunks from the shared path):
    the store equals the one built in this process."""
    import numpy as np
    from PIL import Image
    from torch import nn

    from rmc.data import load_dataset
    from rmc.data.imagefolder import FolderImages
    rng = np.random.default_rng(0)
    for c in range(3):
        for i in range(20):
            path = tmp_path / "data" / "train" / f"n{c:08d}" / f"{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    train = load_dataset("imagefolder", "train", tmp_path / "data", image_size=16, lazy=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(4), nn.Flatten(), nn.Linear(48, 3)).eval()
    info = ModelInfo("linear-probe", 3, (3, 16, 16), dataset="imagefolder", sha256="0" * 64)
    cfg = AugmentConfig(steps=(2,), eps=8 / 255, step_size=2 / 255, chunk_size=16, batch_size=8, per_class=15)
    here = build_dprime_store(model, info, train, tmp_path / "here", cfg, progress=False)
    put = []
    real_put = executors.RayExecutor.put
    monkeypatch.setattr(executors.RayExecutor, "put", lambda self, obj: put.append(obj) or real_put(self, obj))
    there = build_dprime_store(model, info, train, tmp_path / "ray", cfg, progress=False, ray="local")
    assert _bytes(there.path) == _bytes(here.path) and len(there) == 90
    assert any(isinstance(o, FolderImages) for o in put) and not any(getattr(o, "ndim", 0) == 4 for o in put)


# ---------------------------------------------------------------- evaluation

def _cfg(mode: str) -> RMCConfig:
    return RMCConfig(k=64, lr=1e-3, batch_size=32, max_epochs=2, patience=1, mode=mode, calib_k=48,
                     calib_flip=False, seed=3)


@pytest.fixture(scope="module")
def setup(digits, tiny_trained, tiny_dprime):
    dprime, feats = tiny_dprime
    test = digits[1]
    gen = torch.Generator().manual_seed(5)
    # Noise stands in for a targeted attack (only its inputs and targets matter here); an index names known kinds.
    sets = [EvalSet("clean", test.float_images()[:N], test.labels[:N], None, torch.arange(N), {"kind": "clean"}),
            EvalSet("noisy", (test.float_images()[:N] + 0.1 * torch.rand(N, 1, 8, 8, generator=gen)).clamp(0, 1),
                    test.labels[:N], (test.labels[:N] + 1) % 10, torch.arange(N), {"kind": "pgd", "targeted": True})]
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


def test_episodic_identical_to_single_process_despite_killed_worker(tmp_path, setup, reference_eval, kill):
    base, dprime, sets = setup
    got = evaluate([base], dprime, sets, _cfg("episodic"), tmp_path, 10, progress=False, ray="local", block=2,
                   fault=kill.arm())
    assert kill.fired.exists(), "the fault hook did not kill a worker"
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
        evaluate([base], dprime, sets, _cfg("episodic"), tmp_path, 10, progress=False, ray="local", block=3,
                 on_record=interrupt)
    saved = {s.name: (tmp_path / "standard" / s.name / "rmc.jsonl").read_text().splitlines() for s in sets}
    assert sum(len(v) for v in saved.values()) == 7
    again = []
    got = evaluate([base], dprime, sets, _cfg("episodic"), tmp_path, 10, progress=False, ray="local", block=3,
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
    got = evaluate([base], dprime, sets, cfg, tmp_path, 10, progress=False, ray="local")
    assert _strip(got) == _strip(reference_eval["episodic"])


def test_in_process_and_ray_run_the_same_tasks(tmp_path, setup, monkeypatch):
    """One driver: with or without Ray the same task function gets the same inputs; only the executor differs."""
    base, dprime, sets = setup
    tasks: dict[str, list] = {"InlineExecutor": [], "RayExecutor": []}
    for cls in (executors.InlineExecutor, executors.RayExecutor):
        def spy(self, key, fn, *args, real=cls.submit, seen=tasks[cls.__name__]):
            seen.append((fn, args[1], tuple(args[2])))   # the function, the set's name, the input positions
            return real(self, key, fn, *args)
        monkeypatch.setattr(cls, "submit", spy)
    cfg = _cfg("online")
    here = evaluate([base], dprime, sets, cfg, tmp_path / "here", 10, n=6, progress=False, shards=2, block=2)
    there = evaluate([base], dprime, sets, cfg, tmp_path / "ray", 10, n=6, progress=False, ray="local", shards=2,
                     block=2)
    assert _strip(here) == _strip(there)
    inline, remote = tasks["InlineExecutor"], tasks["RayExecutor"]
    assert {t[0] for t in inline} == {t[0] for t in remote} == {driver.rmc_task}
    assert sorted(t[1:] for t in inline) == sorted(t[1:] for t in remote) and len(inline) == 2 * 2 * 2


def test_online_shards(tmp_path, setup, reference_eval, kill):
    base, dprime, sets = setup
    cfg = _cfg("online")
    one = evaluate([base], dprime, sets, cfg, tmp_path / "s1", 10, progress=False, ray="local", block=4)
    assert _strip(one) == _strip(reference_eval["online"])   # S = 1: the single-process stream

    two = evaluate([base], dprime, sets, cfg, tmp_path / "s2", 10, progress=False, ray="local", shards=2, block=4,
                   fault=kill.arm())
    assert kill.fired.exists()
    _check_once(two)
    inline = evaluate([base], dprime, sets, cfg, tmp_path / "inline", 10, progress=False, ray=None, shards=2, block=5)
    assert _strip(two) == _strip(inline)   # S = 2 streams, with or without Ray, any segment size
    seen = []

    def interrupt(set_name, record):
        seen.append(record["index"])
        if len(seen) == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):   # the driver is interrupted mid-run: each stream resumes from its state
        evaluate([base], dprime, sets, cfg, tmp_path / "s2i", 10, progress=False, ray="local", shards=2, block=2,
                 on_record=interrupt)
    resumed = evaluate([base], dprime, sets, cfg, tmp_path / "s2i", 10, progress=False, ray="local", shards=2,
                       block=3)
    assert _strip(resumed) == _strip(two)
    recs = two["standard"]["clean"]["rmc"]
    assert {r["stream"] for r in recs} == {0, 1} and all(r["streams"] == 2 for r in recs)
    folder = tmp_path / "s2" / "standard" / "clean"
    assert sorted(p.name for p in folder.glob("rmc*.jsonl")) == ["rmc.stream0of2.jsonl", "rmc.stream1of2.jsonl"]
    # Stream 1 starts afresh from the static weights at input 6: its adaptation is the episodic one there.
    first, episodic = recs[N // 2], reference_eval["episodic"]["standard"]["clean"]["rmc"][N // 2]
    assert first["stream"] == 1 and (first["pred"], first["adapt_epochs"]) == (episodic["pred"],
                                                                               episodic["adapt_epochs"])


def test_workers_read_dprime_from_the_store_path(tmp_path, model_file, reference_store, setup, monkeypatch):
    """A D' on disk reaches Ray's workers as its path (the default): what goes into the object store holds no image
    (the workers read the shards themselves), and the results equal the single-process ones and those with the images
    sent through the object store. A worker that finds another store at that path refuses in one line."""
    from rmc.artifacts.dprime import open_dprime_store
    from rmc.artifacts.shards import ShardImages
    from rmc.errors import RMCError
    from rmc.models import extract_features
    model, _, _ = model_file
    _, _, sets = setup
    store = open_dprime_store(reference_store.path)
    base = BaseModel("standard", model, "sha", "block3", extract_features(model, "block3", store.images[:]).numpy())
    put = []
    real_put = executors.RayExecutor.put
    monkeypatch.setattr(executors.RayExecutor, "put", lambda self, obj: put.append(obj) or real_put(self, obj))
    cfg = _cfg("episodic")
    here = evaluate([base], store.dprime(), sets, cfg, tmp_path / "here", 10, n=4, progress=False)
    by_path = evaluate([base], store.dprime(), sets, cfg, tmp_path / "path", 10, n=4, progress=False, ray="local")
    by_objects = evaluate([base], store.dprime(), sets, cfg, tmp_path / "objects", 10, n=4, progress=False,
                          ray="local", dprime_via="object-store")
    assert _strip(here) == _strip(by_path) == _strip(by_objects)
    sent = [ray.cloudpickle.dumps(o) for o in put if isinstance(o, driver.DPrime)]
    assert len(sent) == 2 and len(sent[0]) < store.images.numel() / 4 < store.images.numel() < len(sent[1])
    assert isinstance(ray.cloudpickle.loads(sent[0]).images, ShardImages)
    elsewhere = driver.DPrime(ShardImages(store.path, store.images.layout, manifest_sha256="0" * 64), store.labels,
                              store.copy, store.copy_names, store.fingerprint)
    with pytest.raises(RMCError, match=r"does not see the D' store the driver opened at .*--dprime-via object-store"):
        evaluate([base], elsewhere, sets, cfg, tmp_path / "elsewhere", 10, n=4, progress=False, ray="local")


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
    assert cli_main(common + ["--out", str(tmp_path / "on"), "--mode", "online", "--ray", "--shards", "2",
                              "--dprime-via", "object-store"]) == 0
    assert json.loads((tmp_path / "on" / "results.json").read_text())["online_streams"] == 2


def test_sigterm_stops_a_command_under_ray_like_ctrl_c():
    """Ray installs a SIGTERM handler of its own (a stack trace, then the process dies); `kill` of a background
    `rmc ... --ray` must instead end like Ctrl-C, through the CLI's KeyboardInterrupt path that saves and explains."""
    script = """if True:
        import os, signal, threading, time
        from rmc.cli import stop_on_sigterm
        from rmc.scaleout.executors import session
        stop_on_sigterm()
        with session("local", workers=1):
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
            try:
                time.sleep(30)
            except KeyboardInterrupt:
                print("stopped as by Ctrl-C")
    """
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert done.stdout.strip() == "stopped as by Ctrl-C", done.stderr[-2000:]
    assert done.returncode == 0
