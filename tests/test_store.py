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
FILES = ["copy.npy", "labels.npy", "manifest.json", "progress.json", "shards", "source_index.npy"]
SHARD_FILES = [f"{i:05d}.npy" for i in range(9)]   # 3 copies x ceil(120 / 48) chunks


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
    """Every file under `folder` (shards included) by relative path."""
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_layout_and_shards(built):
    s = built
    assert sorted(p.name for p in s.path.iterdir()) == FILES
    assert sorted(p.name for p in (s.path / "shards").iterdir()) == SHARD_FILES
    assert not partial_path(s.path).exists()
    assert s.copy_names == ["clean", "pgd2", "pgd3"]
    assert len(s) == 360 and s.images.shape == (360, 1, 8, 8) and s.images.dtype == torch.uint8
    assert s.labels.dtype == torch.int64 and s.copy.dtype == torch.int16 and s.source_index.dtype == torch.int64
    assert s.copy.tolist() == [0] * 120 + [1] * 120 + [2] * 120
    assert s.manifest["counts"] == {"clean": 120, "pgd2": 120, "pgd3": 120}
    assert s.manifest["storage_dtype"] == "uint8" and s.manifest["attack"]["steps"] == [2, 3]
    assert s.manifest["format_version"] == 2 and s.manifest["shards"]["count"] == 9
    # Shard i holds chunk i: each copy in shards of 48, 48 and 24 rows; the store's rows are the shards in order.
    shards = [np.load(s.path / "shards" / f) for f in SHARD_FILES]
    assert [len(a) for a in shards] == [48, 48, 24] * 3 and all(a.dtype == np.uint8 for a in shards)
    whole = np.concatenate(shards)
    assert np.array_equal(s.images[:].numpy(), whole)
    rows = np.random.default_rng(0).permutation(360)[:50]
    assert np.array_equal(s.images[rows].numpy(), whole[rows])          # any order, any shards
    assert np.array_equal(s.images[torch.tensor([5, 5, -1])].numpy(), whole[[5, 5, 359]])
    assert torch.equal(s.images[7], torch.from_numpy(whole[7]))
    content = s.manifest["content"]["shards"]
    assert [store_mod.sha256_file(s.path / "shards" / f) for f in SHARD_FILES] == content
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

    # Second kill: the chunk's shard is in place but the process dies before its progress record.
    real = StoreWriter.write_chunk

    def dies_before_progress(self, task, data):
        if task.copy == 2:
            store_mod.write_shard(self.shard_path(task.index), data.numpy())
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


# A build in its own process, killed with SIGKILL by a hook: `shard` = the shard whose file write it dies in (half
# of the rows written under the temporary name), or `after` = the number of chunks recorded before it dies.
_KILLED_BUILD = """
import os, signal, sys
import torch
torch.set_num_threads(1)
from rmc.artifacts import dprime, shards
from rmc.data import load_dataset
from rmc.models import load_checkpoint

model_path, out, mode, at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model, info = load_checkpoint(model_path)
cfg = dprime.AugmentConfig(steps=(2, 3), eps=0.1, step_size=0.02, seed=0, chunk_size=48, batch_size=32,
                           train_subset=120)
writes = []
real = shards._HashingWriter.write

def write(self, data):
    writes.append(len(data))
    if mode == "shard" and len(writes) == 2 * at + 2:   # header then rows: the rows of shard `at`
        self.f.write(bytes(data)[:len(data) // 2])
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, data)

shards._HashingWriter.write = write
recorded = []

def on_chunk(task):
    recorded.append(task.index)
    if mode == "after" and len(recorded) == at:
        os.kill(os.getpid(), signal.SIGKILL)

dprime.build_dprime_store(model, info, load_dataset("digits", "train"), out, cfg, progress=False, on_chunk=on_chunk)
"""


def _killed_build(model_path: Path, out: Path, mode: str, at: int) -> None:
    import os
    import signal
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _KILLED_BUILD, str(model_path), str(out), mode, str(at)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def test_sigkill_mid_build_then_resume_gives_byte_identical_shards(tmp_path, model_file, digits, built):
    """kill -9 twice: once in the middle of writing a shard's file, once right after a chunk is recorded; each
    resume redoes only unrecorded chunks, and the finished store equals the uninterrupted one byte for byte."""
    model, info, path = model_file
    out = tmp_path / "killed"
    _killed_build(path, out, "shard", 4)
    part = partial_path(out)
    assert json.loads((part / "progress.json").read_text())["done"] == [0, 1, 2, 3]
    left = sorted(f.name for f in (part / "shards").iterdir())
    assert left[1:] == SHARD_FILES[:4] and left[0].startswith(".00004.npy.")   # shard 4 half-written, not in place
    _killed_build(path, out, "after", 2)          # the resumed build: chunks 4 and 5 recorded, then killed
    assert json.loads((part / "progress.json").read_text())["done"] == list(range(6))
    redone = []
    s = build_dprime_store(model, info, digits[0], out, CFG, progress=False, on_chunk=lambda t: redone.append(t.index))
    assert redone == [6, 7, 8]
    assert _bytes(s.path) == _bytes(built.path) and s.fingerprint == built.fingerprint


def test_damaged_shard_of_a_finished_store_is_found_and_rebuilt_alone(tmp_path, model_file, digits, built):
    import shutil
    model, info, _ = model_file
    store = tmp_path / "store"
    shutil.copytree(built.path, store)
    open_dprime_store(store)                                   # verified once: later opens re-hash changed files
    shard = store / "shards" / SHARD_FILES[4]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF                                          # one flipped byte, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(RMCError, match=r"shards/00004.npy does not match its manifest hash.*rebuilds only"):
        open_dprime_store(store)
    (store / "shards" / SHARD_FILES[7]).unlink()
    with pytest.raises(RMCError, match=r"shards/00007.npy is missing.*re-run `rmc augment`"):
        open_dprime_store(store, verify="none")
    redone = []
    s = build_dprime_store(model, info, digits[0], store, CFG, progress=False,
                           on_chunk=lambda t: redone.append(t.index))
    assert redone == [4, 7]                                    # only the damaged shards
    assert _bytes(store) == _bytes(built.path) and s.fingerprint == built.fingerprint
    open_dprime_store(store, verify="full")

    # A rebuilt shard that does not reproduce its recorded hash never replaces the file on disk.
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["content"]["shards"][2] = "0" * 64
    (store / "manifest.json").write_text(json.dumps(manifest))
    before = (store / "shards" / SHARD_FILES[2]).read_bytes()
    with pytest.raises(RMCError, match="rebuilt shard 00002.npy differs from the one its manifest records"):
        build_dprime_store(model, info, digits[0], store, CFG, progress=False)
    assert (store / "shards" / SHARD_FILES[2]).read_bytes() == before
    assert not [f for f in (store / "shards").iterdir() if f.name.startswith(".")]


def test_reading_k_rows_opens_only_their_shards(built, monkeypatch):
    from rmc.artifacts import shards as shards_mod
    opened = []
    real = shards_mod.open_shard
    monkeypatch.setattr(shards_mod, "open_shard", lambda p, shape: opened.append(p.name) or real(p, shape))
    s = open_dprime_store(built.path)
    whole = np.concatenate([np.load(built.path / "shards" / f) for f in SHARD_FILES])
    rows = np.array([250, 3, 47, 260, 10])                     # shards 6 (rows 240-287) and 0 (rows 0-47)
    x, y = s.dprime().gather(rows)
    assert sorted(opened) == [SHARD_FILES[0], SHARD_FILES[6]]
    assert torch.equal(x, torch.from_numpy(whole[rows]).float() / 255) and torch.equal(y, s.labels[rows])
    s.images[[1, 2, 255]]
    assert len(opened) == 2                                    # already open: nothing opened again
    s.images[100:118]                                          # rows of copy 0's shard 2 only (96-119)
    assert opened[2:] == [SHARD_FILES[2]]
    bounded = shards_mod.ShardImages(s.path, s.images.layout, max_open=2)
    for i in (0, 1, 2, 0):                                     # at most 2 open: the least recently used is closed
        bounded[i * 48]
    assert list(bounded._open) == [2, 0] and opened[3:] == [SHARD_FILES[i] for i in (0, 1, 2, 0)]
    t = s.images[[3]]
    t[0] = 255 - t[0]                                          # rows are copies: the store is never written
    assert np.array_equal(s.images[[3]].numpy(), whole[[3]])


def test_threads_share_one_store_reader(built):
    """Batched RMC's threads gather from one D': the bounded cache of open shards is shared safely."""
    from concurrent.futures import ThreadPoolExecutor

    from rmc.artifacts.shards import ShardImages
    s = open_dprime_store(built.path)
    whole = s.images[:].numpy()
    shared = ShardImages(s.path, s.images.layout, max_open=2)        # far fewer than the 9 shards: constant churn

    def reads(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        return all(np.array_equal(shared[rows].numpy(), whole[rows])
                   for rows in (rng.choice(360, 40, replace=False) for _ in range(30)))

    with ThreadPoolExecutor(6) as pool:
        assert all(pool.map(reads, range(12)))
    assert len(shared._open) <= 2


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
    shard = bad / "shards" / SHARD_FILES[3]
    shard.write_bytes((built.path / "shards" / SHARD_FILES[3]).read_bytes()[:500])
    with pytest.raises(RMCError, match=r"shards/00003.npy is 500 bytes, expected 3\d+; re-run `rmc augment`"):
        open_dprime_store(bad, verify="none")             # a truncated shard: found by its size, without reading it
    shard.write_bytes(b"\x93NUMPY" + bytes(3200 - 6))
    with pytest.raises(RMCError, match="00003.npy is not a readable .npy file"):
        open_dprime_store(bad, verify="none").images[150]  # the same size, no valid header: found when read
    shutil.copy(built.path / "shards" / SHARD_FILES[3], shard)
    open_dprime_store(bad).verify()
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["content"]["shards"][3] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RMCError, match="00003.npy does not match its manifest hash"):
        open_dprime_store(bad, verify="full")
    manifest["shards"]["count"] = 8
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RMCError, match="inconsistent counts, shape or shards"):
        open_dprime_store(bad)


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


# ---------------------------------------------------------------- stores of the single-file format (format 1)

def _single_file_store(built, folder: Path) -> Path:
    """`built` as an earlier rmc wrote it: format 1, every image in one images.npy (what `rmc migrate-dprime`
    converts)."""
    import shutil
    folder.mkdir()
    np.save(folder / "images.npy", built.images[:].numpy())
    for f in ("labels.npy", "copy.npy", "source_index.npy"):
        shutil.copy(built.path / f, folder / f)
    m = json.loads((built.path / "manifest.json").read_text())
    old = {k: v for k, v in m.items() if k not in ("shards", "per_class")}
    old["format_version"] = 1
    old["dataset"] = {k: v for k, v in m["dataset"].items() if k not in ("sha256_of", "preprocessing")}
    old["files"] = {"images": "images.npy", **m["files"]}
    old["content"] = {k: store_mod.sha256_file(folder / f) for k, f in old["files"].items()}
    (folder / "manifest.json").write_text(json.dumps(old))
    (folder / "progress.json").write_text(json.dumps({"done": list(range(9)), "total": 9, "hashes": {}}))
    return folder


def test_single_file_store_is_refused_with_the_migration_command(built, model_file, digits, tmp_path):
    model, info, _ = model_file
    old = _single_file_store(built, tmp_path / "old")
    message = rf"single-file format of an earlier rmc.*convert it in place to shards with `rmc migrate-dprime {old}`"
    with pytest.raises(RMCError, match=message):
        open_dprime_store(old)
    with pytest.raises(RMCError, match=message):
        build_dprime_store(model, info, digits[0], old, CFG, progress=False)
    partial = partial_path(tmp_path / "p")                     # an unfinished build of the old format
    _single_file_store(built, partial)
    with pytest.raises(RMCError, match="unfinished build in the single-file format.*delete it and re-run"):
        build_dprime_store(model, info, digits[0], tmp_path / "p", CFG, progress=False)


def test_migrate_dprime_converts_in_place_to_the_store_augment_builds(built, tmp_path, capsys, monkeypatch):
    from rmc.artifacts import migrate
    old = _single_file_store(built, tmp_path / "old")
    images_before = (old / "images.npy").read_bytes()
    real, calls = migrate.write_shard, []

    def dies_at_the_fifth(path, rows, expect=None):
        calls.append(path.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(path, rows, expect)

    monkeypatch.setattr(migrate, "write_shard", dies_at_the_fifth)
    assert cli_main(["migrate-dprime", str(old), "--quiet"]) == 130   # interrupted (the CLI's Ctrl-C code)
    with pytest.raises(RMCError, match="rmc migrate-dprime"):   # still the old store, whole
        open_dprime_store(old)
    assert (old / "images.npy").read_bytes() == images_before
    monkeypatch.setattr(migrate, "write_shard", real)
    assert cli_main(["migrate-dprime", str(old), "--quiet"]) == 0
    assert "converted" in capsys.readouterr().out
    assert _bytes(old) == _bytes(built.path)                   # exactly the store `rmc augment` writes
    s = open_dprime_store(old, verify="full")
    assert s.fingerprint == built.fingerprint and torch.equal(s.images[:], built.images[:])
    (old / "images.npy").write_bytes(images_before)            # as left by a conversion stopped after its commit
    assert cli_main(["migrate-dprime", str(old), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "already in the shard format" in out.out and "removed" in out.err and not (old / "images.npy").exists()


def test_migrate_dprime_refuses_a_damaged_store(built, tmp_path, capsys):
    old = _single_file_store(built, tmp_path / "old")
    mm = np.load(old / "images.npy", mmap_mode="r+")
    mm[5] = 255 - mm[5]
    mm.flush()
    del mm
    assert cli_main(["migrate-dprime", str(old), "--quiet"]) == 2
    assert "images.npy is not what its manifest records; the store is damaged" in capsys.readouterr().err
    assert not (old / "shards").exists() and json.loads((old / "manifest.json").read_text())["format_version"] == 1
    assert cli_main(["migrate-dprime", str(tmp_path / "none")]) == 2
    assert "not a finished D' store" in capsys.readouterr().err


def test_per_class_subset_is_seeded_and_recorded(model_file, digits, tmp_path):
    model, info, path = model_file
    labels = digits[0].labels
    cfg = dataclasses.replace(CFG, per_class=7, train_subset=None, steps=(1,))
    idx = store_mod.select_subset(labels, cfg)
    assert np.bincount(labels[idx].numpy(), minlength=10).tolist() == [7] * 10
    assert torch.equal(idx, idx.sort().values) and torch.equal(idx, store_mod.select_subset(labels, cfg))
    first = torch.cat([torch.nonzero(labels == c).flatten()[:7] for c in range(10)]).sort().values
    assert not torch.equal(idx, first)                               # a seeded choice, not each class's first
    assert not torch.equal(idx, store_mod.select_subset(labels, dataclasses.replace(cfg, seed=1)))
    few = labels[:60]                                                # a class with fewer than 7 is kept whole
    have = np.bincount(few.numpy(), minlength=10)
    assert (have < 7).any() and (have > 7).any()
    got = np.bincount(few[store_mod.select_subset(few, cfg)].numpy(), minlength=10)
    assert got.tolist() == np.minimum(have, 7).tolist()
    both = store_mod.select_subset(labels, dataclasses.replace(cfg, train_subset=20))
    assert len(both) == 20 and set(both.tolist()) <= set(idx.tolist())   # train_subset applies after per_class
    store = build_dprime_store(model, info, digits[0], tmp_path / "d", cfg, progress=False)
    assert store.manifest["per_class"] == 7 and torch.equal(store.source_index[:70], idx)
    assert store_mod.config_from_manifest(store.manifest) == cfg
    args = ["augment", "--model", str(path), "--dataset", "digits", "--steps", "1", "--eps", "0.1", "--step-size",
            "0.02", "--chunk-size", "48", "--batch-size", "32", "--per-class", "7", "--out", str(tmp_path / "cli"),
            "--quiet"]
    assert cli_main(args) == 0 and _bytes(tmp_path / "cli") == _bytes(store.path)


def test_a_manifest_of_more_rows_than_an_image_side_is_read(built):
    """The paper preset's D' (240,000 rows) and the seed's (5 million) are far above any image side's bound."""
    manifest = json.loads((built.path / "manifest.json").read_text())
    n = 2_000_000
    manifest["counts"] = {name: n for name in manifest["copy_names"]}
    manifest["total"] = n * len(manifest["copy_names"])
    manifest["shape"][0] = manifest["total"]
    manifest["dataset"]["size"] = n
    assert store_mod._check_manifest(manifest, built.path / "manifest.json")["shape"][0] == 6_000_000
    for side in (1, 2, 3):                                 # each side is still bounded, by its own field
        bad = json.loads(json.dumps(manifest))
        bad["shape"][side] = 1 << 17
        with pytest.raises(RMCError, match=rf"'shape\[{side}\]' must be an integer, 1 <= n <= 65536"):
            store_mod._check_manifest(bad, built.path / "manifest.json")
