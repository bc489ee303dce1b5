"""studies/carry_run.py: a long run's results survive a fresh machine, and D' (data) never travels."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rmc.evaluation.records import RecordStream

_spec = importlib.util.spec_from_file_location("carry_run", Path(__file__).parents[1] / "studies" / "carry_run.py")
carry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(carry)


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    (run / "models").mkdir(parents=True)
    (run / "models" / "standard-1.safetensors").write_bytes(b"weights")
    (run / "dprime" / "standard-2").mkdir(parents=True)
    (run / "dprime" / "standard-2" / "images.npy").write_bytes(b"\0" * 1000)
    (run / "dprime" / "standard-2" / "manifest.json").write_text(json.dumps({"sha256": "abc"}))
    (run / "features").mkdir()
    (run / "features" / "standard-3.npy").write_bytes(b"\0" * 100)
    stream = RecordStream(run / "results" / "standard" / "clean", "rmc", "fp")
    for i in range(3):
        stream.append({"index": i, "label": 0, "pred": i}, {"w": torch.full((4,), float(i))})
    return run


def test_save_then_restore_resumes_the_stream_and_leaves_data_behind(tmp_path):
    run = _run(tmp_path)
    index = carry.save(run, tmp_path / "carried")
    assert set(index["files"]) == {"models/standard-1.safetensors", "results/standard/clean/rmc.jsonl",
                                   "results/standard/clean/rmc.state.safetensors"}
    assert index["dprime_manifests"] == {"standard-2": {"sha256": "abc"}}
    fresh = tmp_path / "fresh"
    carry.restore(tmp_path / "carried", fresh)
    stream = RecordStream(fresh / "results" / "standard" / "clean", "rmc", "fp")
    state = stream.load_state()
    assert len(stream) == 3 and state["w"].tolist() == [2.0] * 4
    assert not (fresh / "dprime").exists() and not (fresh / "features").exists()


def test_states_are_copied_before_their_records(tmp_path):
    order = [str(r) for r in carry.carried_files(_run(tmp_path))]
    assert order.index("results/standard/clean/rmc.state.safetensors") < order.index(
        "results/standard/clean/rmc.jsonl")


def test_restore_keeps_newer_local_files_and_refuses_a_damaged_copy(tmp_path):
    run = _run(tmp_path)
    carry.save(run, tmp_path / "carried")
    RecordStream(run / "results" / "standard" / "clean", "rmc", "fp").append({"index": 3, "label": 0, "pred": 0},
                                                                            {"w": torch.zeros(4)})
    before = (run / "results" / "standard" / "clean" / "rmc.jsonl").read_text()
    assert carry.restore(tmp_path / "carried", run) == []
    assert (run / "results" / "standard" / "clean" / "rmc.jsonl").read_text() == before
    (tmp_path / "carried" / "models" / "standard-1.safetensors").write_bytes(b"other")
    with pytest.raises(SystemExit, match="damaged"):
        carry.restore(tmp_path / "carried", tmp_path / "elsewhere")


@pytest.mark.parametrize("rel", ["../../outside.txt", "/tmp/rmc-carry-outside.txt"])
def test_restore_writes_nothing_outside_the_run_whatever_the_index_names(tmp_path, rel):
    carried = tmp_path / "carried"
    carried.mkdir()
    (carried / "outside.txt").write_text("x")
    index = {"files": {rel: {"sha256": carry._sha256(carried / "outside.txt"), "bytes": 1}}}
    (carried / carry.INDEX).write_text(json.dumps(index))
    with pytest.raises(SystemExit, match="leads outside|absolute path"):
        carry.restore(carried, tmp_path / "a" / "run")
    assert not (tmp_path / "outside.txt").exists() and not Path("/tmp/rmc-carry-outside.txt").exists()
    assert not (tmp_path / "a").exists()


def test_save_replaces_the_previous_carry_whole(tmp_path):
    run = _run(tmp_path)
    carry.save(run, tmp_path / "carried")
    (run / "models" / "standard-1.safetensors").unlink()
    carry.save(run, tmp_path / "carried")
    assert not (tmp_path / "carried" / "models").exists()
    assert not (tmp_path / "carried.partial").exists() and not (tmp_path / "carried.old").exists()


def test_finished_streams_travel_without_their_state(tmp_path):
    run = _run(tmp_path)
    assert "results/standard/clean/rmc.state.safetensors" not in carry.save(run, tmp_path / "c3", finished=3)["files"]
    assert "results/standard/clean/rmc.state.safetensors" in carry.save(run, tmp_path / "c4", finished=4)["files"]
    carry.restore(tmp_path / "c3", tmp_path / "fresh")
    folder = tmp_path / "fresh" / "results" / "standard" / "clean"
    done = RecordStream(folder, "rmc", "fp")
    assert done.load_state(needed=3) is None and len(done) == 3       # finished: read from its records
    more = RecordStream(folder, "rmc", "fp")
    assert more.load_state(needed=4) is None and len(more) == 0       # more inputs wanted: no weights, start over
