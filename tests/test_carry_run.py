"""studies/carry_run.py: a long run's results survive a fresh machine, and D' (data) never travels."""

import hashlib
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
    (run / "features-standard.npy").write_bytes(b"\0" * 100)    # `rmc evaluate`'s features in its --out
    (run / "features-standard.json").write_text("{}")
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


def _two_streams(tmp_path: Path, second: int) -> Path:
    """A run with a second evaluation stream of `second` records, an evaluation set, a figure and a report page."""
    run = _run(tmp_path)
    (run / "evalsets" / "standard-4").mkdir(parents=True)
    (run / "evalsets" / "standard-4" / "clean.safetensors").write_bytes(b"images")
    (run / "evalsets" / "standard-4" / "index.json").write_text("{}")
    (run / "figures").mkdir()
    (run / "figures" / "robustness.png").write_bytes(b"png")
    (run / "report.html").write_text("<html></html>")
    (run / "results.md").write_text("| table |")
    stream = RecordStream(run / "results" / "standard" / "pgd", "rmc", "fp")
    for i in range(second):
        stream.append({"index": i, "label": 0, "pred": i}, {"w": torch.zeros(4)})
    return run


def test_a_finished_run_travels_without_weights_states_or_image_sets(tmp_path):
    index = carry.save(_two_streams(tmp_path, 3), tmp_path / "carried", finished=3)
    assert index["finished"] is True
    assert sorted(index["files"]) == ["evalsets/standard-4/index.json", "figures/robustness.png", "results.md",
                                      "results/standard/clean/rmc.jsonl", "results/standard/pgd/rmc.jsonl"]
    assert sorted(index["left_out"]) == ["evalsets/standard-4/clean.safetensors", "models/standard-1.safetensors",
                                         "report.html"]      # finished streams' states: left out by --finished alone
    assert all(len(meta["sha256"]) == 64 for meta in index["left_out"].values())
    assert not list((tmp_path / "carried").rglob("*.safetensors"))
    carry.restore(tmp_path / "carried", tmp_path / "fresh")
    assert len(RecordStream(tmp_path / "fresh" / "results" / "standard" / "pgd", "rmc", "fp")) == 3


def test_an_unfinished_run_keeps_what_resuming_needs(tmp_path):
    index = carry.save(_two_streams(tmp_path, 2), tmp_path / "carried", finished=3)
    assert index["finished"] is False and index["left_out"] == {}
    assert {"models/standard-1.safetensors", "evalsets/standard-4/clean.safetensors", "report.html",
            "results/standard/pgd/rmc.state.safetensors"} <= set(index["files"])
    assert "results/standard/clean/rmc.state.safetensors" not in index["files"]   # that stream is done
    assert carry.save(_two_streams(tmp_path / "b", 3), tmp_path / "unsaid")["finished"] is False   # no --finished


def test_prune_turns_a_carried_run_that_has_finished_into_its_records(tmp_path):
    run = _two_streams(tmp_path, 2)
    carry.save(run, tmp_path / "carried")
    with pytest.raises(SystemExit, match="not finished"):
        carry.prune(tmp_path / "carried", 3)
    assert (tmp_path / "carried" / "models" / "standard-1.safetensors").exists()
    RecordStream(run / "results" / "standard" / "pgd", "rmc", "fp").append({"index": 2, "label": 0, "pred": 2},
                                                                          {"w": torch.zeros(4)})
    carry.save(run, tmp_path / "carried")
    dropped = carry.prune(tmp_path / "carried", 3)
    assert set(dropped) == {"models/standard-1.safetensors", "evalsets/standard-4/clean.safetensors", "report.html",
                            "results/standard/clean/rmc.state.safetensors",
                            "results/standard/pgd/rmc.state.safetensors"}
    index = json.loads((tmp_path / "carried" / carry.INDEX).read_text())
    assert index["finished"] is True and set(index["left_out"]) == set(dropped)
    assert not list((tmp_path / "carried").rglob("*.safetensors")) and not (tmp_path / "carried" / "models").exists()
    assert (tmp_path / "carried" / "figures" / "robustness.png").exists()
    carry.restore(tmp_path / "carried", tmp_path / "fresh")            # the index names only what is there
    assert len(RecordStream(tmp_path / "fresh" / "results" / "standard" / "pgd", "rmc", "fp")) == 3


def test_the_committed_finished_runs_hold_no_tensors():
    """The two finished long runs keep records, tables, figures and configuration, and every file their index names."""
    studies = Path(__file__).parents[1] / "studies"
    for folder in ("reproduction/paper2", "defense_aware/adversarial"):
        index = json.loads((studies / folder / carry.INDEX).read_text())
        assert index["finished"] and not any(carry.only_for_resuming(Path(rel)) for rel in index["files"])
        assert all((studies / folder / rel).is_file() for rel in index["files"])
        assert not list((studies / folder).rglob("*.safetensors"))


def test_the_committed_runs_match_their_index_byte_for_byte():
    """`restore` refuses a copy whose hash differs from carried.json: a committed file changed in place (e.g. a PNG
    recompressed) must have its entry updated with it, or the documented restore command fails."""
    studies = Path(__file__).parents[1] / "studies"
    for index_path in studies.rglob(carry.INDEX):
        files = json.loads(index_path.read_text())["files"]
        for rel, meta in files.items():
            data = (index_path.parent / rel).read_bytes()
            assert (len(data), hashlib.sha256(data).hexdigest()) == (meta["bytes"], meta["sha256"]), \
                f"{index_path.parent / rel} differs from {index_path}"


def test_restore_names_the_compute_path_the_carried_dprime_was_built_on(tmp_path, monkeypatch, capsys):
    """D''s bytes follow the CPU's code path; a machine on another one is told so, and how to run the carried one."""
    run = _run(tmp_path)
    avx2 = {"aten_cpu_capability": "AVX2", "onednn_max_cpu_isa": None, "torch": "2.13.0"}
    monkeypatch.setattr(carry, "compute_path", lambda: avx2)
    assert carry.save(run, tmp_path / "carried")["compute_path"] == avx2
    carry.restore(tmp_path / "carried", tmp_path / "same")
    assert "note:" not in capsys.readouterr().err           # the same path: nothing to say
    monkeypatch.setattr(carry, "compute_path", lambda: {**avx2, "aten_cpu_capability": "AVX512"})
    carry.restore(tmp_path / "carried", tmp_path / "wider")
    err = capsys.readouterr().err
    assert "built with torch 2.13.0 on the AVX2 code path" in err and "runs torch 2.13.0 on AVX512" in err
    assert "ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2" in err
    monkeypatch.setattr(carry, "compute_path", lambda: {**avx2, "torch": "2.14.0", "aten_cpu_capability": "AVX512"})
    carry.restore(tmp_path / "carried", tmp_path / "newer")
    err = capsys.readouterr().err
    assert "note:" in err and "ATEN_CPU_CAPABILITY" not in err   # another torch: no setting reproduces the bytes


def test_compute_path_is_this_process_s():
    import torch
    assert carry.compute_path()["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
