"""Evaluation: the table, resume after an interruption, and the configuration's error messages."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from rmc.artifacts.evalsets import AttackSpec, make_eval_sets
from rmc.cli import main as cli
from rmc.cli.config import documented_yaml, load_config
from rmc.defense import RMC, Mode, RMCConfig
from rmc.errors import RMCError
from rmc.evaluation.common import BaseModel
from rmc.evaluation.driver import BASELINES, evaluate, finished_results, stream_names
from rmc.evaluation.report import Table
from rmc.io import load_tensors
from rmc.models import ModelInfo


@pytest.fixture(scope="module")
def setup(tiny_trained, tiny_dprime, digits):
    dprime, feats = tiny_dprime
    info = ModelInfo("small_cnn", 10, (1, 8, 8), sha256="t" * 64, dataset="digits")
    sets = make_eval_sets(tiny_trained, info, digits[1], 6,
                          [AttackSpec("clean"), AttackSpec("pgd", eps=0.1, steps=3, targeted=True)], seed=0)
    return BaseModel("standard", tiny_trained, info.sha256, "block3", feats), dprime, sets


def _cfg(mode):
    return RMCConfig(k=32, lr=1e-3, max_epochs=2, batch_size=16, calib_k=32, mode=mode, calib_flip=False)


@pytest.mark.parametrize("mode", [Mode.ONLINE, Mode.EPISODIC])
def test_interrupted_evaluation_resumes_to_the_same_table(setup, tmp_path, monkeypatch, mode):
    base, dprime, sets = setup
    full = evaluate([base], dprime, sets, _cfg(mode), tmp_path / "a", 10, progress=False)

    calls = {"n": 0}
    real_step = RMC.step

    def dying_step(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 8:          # the sets take turns: the 8th input is the second set's 4th
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(RMC, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        evaluate([base], dprime, sets, _cfg(mode), tmp_path / "b", 10, progress=False)
    monkeypatch.setattr(RMC, "step", real_step)
    done = [sum(1 for _ in (tmp_path / "b" / "standard" / s.name / "rmc.jsonl").open()) for s in sets]
    assert done == [4, 3]            # both sets advanced (one worker does not run one set to its end first)
    resumed = evaluate([base], dprime, sets, _cfg(mode), tmp_path / "b", 10, progress=False)
    assert Table.from_results(resumed).to_dict() == Table.from_results(full).to_dict()
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    for s in sets:
        assert strip(resumed["standard"][s.name]["rmc"]) == strip(full["standard"][s.name]["rmc"])


class FailOnCall:
    """A `fault` hook that interrupts the run on its n-th call (each task calls it after its first input)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt


def test_in_process_tasks_are_single_inputs_and_a_fault_mid_task_loses_nothing(setup, tmp_path):
    """In this process the driver runs one input per task on the inline executor (the executor Ray replaces), so
    the online state is saved after every input; a task that dies loses only its own input."""
    base, dprime, sets = setup
    full = evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path / "a", 10, progress=False)
    fault = FailOnCall(3)
    with pytest.raises(KeyboardInterrupt):
        evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path / "b", 10, progress=False, fault=fault)
    folder = tmp_path / "b" / "standard" / sets[0].name
    assert sum(1 for _ in (folder / "rmc.jsonl").open()) == 2                         # the third task died
    assert int(load_tensors(folder / "rmc.state.safetensors", "state")["__n_done__"]) == 2
    resumed = evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path / "b", 10, progress=False,
                       fault=fault)
    assert fault.calls == 3 + 4                                                       # one call per input left
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    assert strip(resumed["standard"][sets[0].name]["rmc"]) == strip(full["standard"][sets[0].name]["rmc"])


def test_a_finished_online_stream_needs_no_state_but_one_to_continue_does(setup, tmp_path):
    base, dprime, sets = setup
    first = evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, n=3, progress=False)
    folder = tmp_path / "standard" / sets[0].name
    (folder / "rmc.state.safetensors").unlink()          # e.g. carried without it (studies/carry_run.py)
    calls = FailOnCall(0)
    again = evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, n=3, progress=False, fault=calls)
    assert calls.calls == 0 and again == first           # read from the records, nothing recomputed
    path = folder / "rmc.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))   # unfinished, and no weights
    evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, n=3, progress=False, fault=calls)
    assert calls.calls == 3                              # to go on it needs the weights: all 3 from the start


@pytest.mark.parametrize("mode,shards", [(Mode.ONLINE, 1), (Mode.ONLINE, 2), (Mode.EPISODIC, 1)])
def test_finished_records_are_read_back_without_d_prime_and_unfinished_ones_are_not(setup, tmp_path, mode, shards):
    """`rmc run` tabulates a base whose records are all on disk without rebuilding D' (finished_results)."""
    base, dprime, sets = setup
    cfg = _cfg(mode)
    made = evaluate([base], dprime, sets, cfg, tmp_path, 10, n=5, progress=False, shards=shards, rmc_n=4)["standard"]
    folder = tmp_path / "standard"
    assert finished_results(folder, sets, cfg, 5, shards=shards, rmc_n=4) == made
    if shards == 1:   # one stream's prefix; S > 1 streams split another count elsewhere (evaluate refuses it too)
        assert finished_results(folder, sets, cfg, 5, rmc_n=3) == \
            evaluate([base], dprime, sets, cfg, tmp_path, 10, n=5, progress=False, rmc_n=3)["standard"]
    else:
        assert finished_results(folder, sets, cfg, 5, shards=shards, rmc_n=3) is None
    assert finished_results(folder, sets, cfg, 5, with_rmc=False) == \
        {name: {b: rows[b] for b in BASELINES} for name, rows in made.items()}
    assert finished_results(folder, sets, cfg, 5, shards=shards, rmc_n=5) is None      # a stream still to run
    assert finished_results(folder, sets, cfg, 6, shards=shards, rmc_n=4) is None      # baselines of 5, not 6
    stream = folder / sets[1].name / stream_names(shards)[-1]
    lines = Path(f"{stream}.jsonl").read_text().splitlines(keepends=True)
    Path(f"{stream}.jsonl").write_text("".join(lines[:-1]))                            # a record lost
    assert finished_results(folder, sets, cfg, 5, shards=shards, rmc_n=4) is None
    (folder / sets[0].name / "baselines.json").write_text("{")                         # a torn file
    assert finished_results(folder, sets, cfg, 5, shards=shards, rmc_n=4) is None


@pytest.mark.parametrize("mode", [Mode.ONLINE, Mode.EPISODIC])
def test_rmc_on_fewer_inputs_than_the_baselines_grows_in_the_same_streams(setup, tmp_path, mode):
    """attack.rmc_n: the baselines on all n inputs, RMC on the first rmc_n; a larger rmc_n later continues the same
    streams (online: from the saved weights), and a smaller one reports its prefix, keeping the rest on disk."""
    base, dprime, sets = setup
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731
    full = evaluate([base], dprime, sets, _cfg(mode), tmp_path / "full", 10, progress=False)
    calls = {"n": 0}
    count = lambda *_: calls.__setitem__("n", calls["n"] + 1)  # noqa: E731
    part = evaluate([base], dprime, sets, _cfg(mode), tmp_path / "grow", 10, progress=False, rmc_n=3, on_record=count)
    for s in sets:
        assert part["standard"][s.name]["undefended"] == full["standard"][s.name]["undefended"]   # all 6 inputs
        assert strip(part["standard"][s.name]["rmc"]) == strip(full["standard"][s.name]["rmc"][:3])
    assert calls["n"] == 6
    table = Table.from_results(part)
    assert "(N = 3)" in table.markdown() and "N = 6 per cell unless the cell states its own" in table.markdown()
    calls["n"] = 0
    grown = evaluate([base], dprime, sets, _cfg(mode), tmp_path / "grow", 10, progress=False, rmc_n=5, on_record=count)
    assert calls["n"] == 4                                    # inputs 3 and 4 of each set, nothing redone
    for s in sets:
        assert strip(grown["standard"][s.name]["rmc"]) == strip(full["standard"][s.name]["rmc"][:5])
    calls["n"] = 0
    back = evaluate([base], dprime, sets, _cfg(mode), tmp_path / "grow", 10, progress=False, rmc_n=2, on_record=count)
    assert calls["n"] == 0 and all(len(back["standard"][s.name]["rmc"]) == 2 for s in sets)
    assert all(len((tmp_path / "grow" / "standard" / s.name / "rmc.jsonl").read_text().splitlines()) == 5 for s in sets)


def test_sharded_streams_with_another_rmc_n_are_refused(setup, tmp_path):
    """With several streams per set, the number of RMC inputs decides where each stream starts: another one
    cannot continue them."""
    base, dprime, sets = setup
    evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, progress=False, shards=2, rmc_n=4)
    with pytest.raises(RMCError, match="other settings"):
        evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, progress=False, shards=2)


def test_resume_refuses_results_made_with_other_settings(setup, tmp_path):
    base, dprime, sets = setup
    evaluate([base], dprime, sets[:1], _cfg(Mode.EPISODIC), tmp_path, 10, n=2, progress=False)
    other = RMCConfig(**{**_cfg(Mode.EPISODIC).__dict__, "lr": 5e-4})
    with pytest.raises(RMCError, match="other settings"):
        evaluate([base], dprime, sets[:1], other, tmp_path, 10, n=2, progress=False)


def test_resume_refuses_a_dprime_with_other_content(setup, tmp_path):
    """A D' rebuilt with other bytes (same length) must not continue the streams of the first: the stream's
    fingerprint holds the store's content fingerprint, not just its size."""
    base, dprime, sets = setup
    first = dataclasses.replace(dprime, fingerprint="a" * 64)
    evaluate([base], first, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, n=2, progress=False)
    evaluate([base], first, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, n=2, progress=False)   # same: resumes
    with pytest.raises(RMCError, match="other settings"):
        evaluate([base], dataclasses.replace(dprime, fingerprint="b" * 64), sets[:1], _cfg(Mode.ONLINE), tmp_path,
                 10, n=2, progress=False)


def test_table_has_baselines_rmc_ci_and_targeted_success(setup, tmp_path):
    base, dprime, sets = setup
    res = evaluate([base], dprime, sets, _cfg(Mode.EPISODIC), tmp_path, 10, progress=False)
    table = Table.from_results(res, {"clean": "clean"})
    assert list(table.rows) == ["None", "DeepNN", "WebNN", "RMC"]
    d = table.to_dict()
    clean = d["rows"]["None"]["clean"]["accuracy"]
    static = (base.model(sets[0].images).argmax(1) == sets[0].labels).sum().item()
    assert clean["hits"] == static and clean["n"] == 6
    assert clean["ci95"][0] <= clean["value"] <= clean["ci95"][1]
    assert "attack_success" in d["rows"]["RMC"][sets[1].name]
    md = table.markdown()
    assert "| None |" in md and "N = 6 per cell." in md


def test_config_rejects_bad_values_with_one_line(tmp_path):
    for overrides, needle in [([("rmc.k", -3)], "rmc.k"), ([("rmc.lr", "fast")], "rmc.lr"),
                              ([("rmc.kk", 3)], "unknown config key"), ([("rmc.mode", "sometimes")], "mode"),
                              ([("augment.eps", 2.0)], "eps"), ([("train.epochs", 0)], "epochs"),
                              ([("attack.n", 50), ("attack.rmc_n", 60)], "attack.rmc_n = 60 exceeds attack.n = 50")]:
        with pytest.raises(RMCError) as e:
            load_config(overrides=overrides)
        assert needle in str(e.value) and "\n" not in str(e.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rmc:\n  k: [unclosed\n")
    with pytest.raises(RMCError, match="not valid YAML"):
        load_config(bad)
    assert cli(["run", "--set", "rmc.batch_size=0", "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()       # nothing written for a refused config


def test_rmc_n_leaves_the_stage_and_results_folders_as_they_were():
    """Raising attack.rmc_n later must continue the same streams: it is in no folder key."""
    from rmc.cli.pipeline import attack_settings, results_key
    plain, fewer = load_config(), load_config(overrides=[("attack.rmc_n", 10)])
    assert fewer.attack.rmc_n == 10 and attack_settings(fewer.attack) == attack_settings(plain.attack)
    assert results_key(fewer, "m", "d", "l", 1, True) == results_key(plain, "m", "d", "l", 1, True)
    assert results_key(load_config(overrides=[("attack.n", 10)]), "m", "d", "l", 1, True) != results_key(
        plain, "m", "d", "l", 1, True)


def test_config_file_preset_and_overrides_compose(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rmc:\n  k: 100\n  lr: 1e-4\n")     # YAML 1.1 reads 1e-4 as a string: accepted as a number
    cfg = load_config(path, "paper", [("rmc.k", 64)])
    assert cfg.rmc.k == 64 and cfg.rmc.lr == 1e-4 and cfg.rmc.max_epochs == 100 and cfg.augment.steps == (10, 30, 100)
    text = documented_yaml(cfg)
    assert "k: 64   # neighbours of each test input" in text
    assert load_config(_write(tmp_path, text)).rmc.k == 64     # the printed config loads back


def _write(tmp_path, text):
    p = tmp_path / "printed.yaml"
    p.write_text(text)
    return p


@pytest.mark.slow
def test_rmc_run_end_to_end_on_digits_and_resume(tmp_path, capsys):
    args = ["run", "--out", str(tmp_path / "run"), "--set", "data.dataset=digits", "--set", "train.epochs=3",
            "--set", "augment.train_subset=300", "--set", "augment.steps=[3]", "--set", "attack.n=8",
            "--set", "attack.pgd=[[5, 0.15]]", "--set", "rmc.k=32", "--set", "rmc.calib_k=32",
            "--set", "rmc.max_epochs=2", "--set", "visualize.inputs=2", "--adversarial-base",
            "--set", "train.adv_steps=2"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "RMC" in out and "pgd5-eps0.15" in out and "Adv. trained + RMC" in out
    meta = json.loads((tmp_path / "run" / "results.json").read_text())
    assert meta["table"]["rows"]["RMC"]["clean"]["accuracy"]["n"] == 8
    # Each base model has its own D', crafted against it (the original's principle).
    for base in ("standard", "adversarial"):
        model_sha = meta["models"][base]["sha256"]
        manifest = json.loads((Path(meta["stage_dirs"][base]["dprime"]) / "manifest.json").read_text())
        assert manifest["model"]["sha256"] == meta["stores"][base]["model_sha256"] == model_sha
    assert meta["models"]["standard"]["sha256"] != meta["models"]["adversarial"]["sha256"]
    assert (tmp_path / "run" / "neighbours.png").stat().st_size > 1000
    assert "Adv. trained + RMC" in (tmp_path / "run" / "report.html").read_text()   # rmc report ran at the end
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert cli(args) == 0                                  # a second run reuses every stage
    assert _without_wall_times(json.loads((tmp_path / "run" / "results.json").read_text())["table"]) == \
        _without_wall_times(meta["table"])
    changed = sorted({p.name for p, t in stamps.items() if p.stat().st_mtime_ns != t})
    # Nothing expensive is recomputed: only the tables, the pictures, the report and the kNN baselines (cheap).
    report = {"report.html", "robustness.png", "drift.png", "anatomy.png", "purity.png",   # rmc report, redrawn
              "rounds.png"}                                                                   # the per-round figure
    assert set(changed) <= {"results.json", "results.md", "config.yaml", "neighbours.png", "baselines.json"} | report, \
        changed

    # Another rmc.k: the models, D', features and evaluation sets are reused; only the rows are re-made, into
    # their own folder beside the first configuration's.
    assert cli(args + ["--set", "rmc.k=16"]) == 0
    other = json.loads((tmp_path / "run" / "results.json").read_text())
    for base, where in meta["stage_dirs"].items():
        assert {k: v for k, v in other["stage_dirs"][base].items() if k != "results"} == \
            {k: v for k, v in where.items() if k != "results"}
        assert other["stage_dirs"][base]["results"] != where["results"] and Path(where["results"]).is_dir()
    for p, t in stamps.items():
        top = p.relative_to(tmp_path / "run").parts[0]
        if top in ("models", "dprime", "features", "evalsets"):
            assert p.stat().st_mtime_ns == t, p
    assert other["config"]["rmc"]["k"] == 16

    # Fewer base models: the remaining one's records are those of the run with both (keyed per base).
    records = Path(other["stage_dirs"]["standard"]["results"]) / "clean" / "rmc.jsonl"
    before = records.stat().st_mtime_ns
    standard_only = [a for a in args if a != "--adversarial-base"]
    assert cli(standard_only + ["--set", "rmc.k=16"]) == 0
    alone = json.loads((tmp_path / "run" / "results.json").read_text())
    assert alone["stage_dirs"] == {"standard": other["stage_dirs"]["standard"]}
    assert records.stat().st_mtime_ns == before and alone["table"]["rows"]["RMC"] == other["table"]["rows"]["RMC"]
    # RMC on fewer inputs (--rmc-n): the same folders and records, the table on their first 4, baselines on all 8.
    assert cli(standard_only + ["--set", "rmc.k=16", "--rmc-n", "4"]) == 2     # the attack rows' 8 inputs: refused
    assert "--no-attack-rows" in capsys.readouterr().err
    assert cli(standard_only + ["--set", "rmc.k=16", "--rmc-n", "4", "--no-attack-rows"]) == 0
    fewer = json.loads((tmp_path / "run" / "results.json").read_text())
    assert fewer["table"]["rows"]["RMC"]["clean"]["accuracy"]["n"] == 4
    assert fewer["table"]["rows"]["None"]["clean"]["accuracy"]["n"] == 8
    stream = Path(fewer["stage_dirs"]["standard"]["results"]) / "clean" / "rmc.jsonl"
    first = stream.read_text().splitlines()
    assert cli(standard_only + ["--set", "rmc.k=16", "--rmc-n", "6", "--no-attack-rows"]) == 0   # the stream goes on
    more = json.loads((tmp_path / "run" / "results.json").read_text())
    assert more["stage_dirs"] == fewer["stage_dirs"] and more["table"]["rows"]["RMC"]["clean"]["accuracy"]["n"] == 6
    assert len(first) == 4 and stream.read_text().splitlines()[:4] == first
    # Every record on disk (a run carried to a machine without its D'): the table is read from the records, and D'
    # and its features are not rebuilt.
    for kind in ("dprime", "features"):
        shutil.rmtree(tmp_path / "run" / kind)
    capsys.readouterr()
    assert cli(standard_only + ["--set", "rmc.k=16", "--rmc-n", "6", "--no-attack-rows"]) == 0
    assert "without rebuilding D'" in capsys.readouterr().out
    read = json.loads((tmp_path / "run" / "results.json").read_text())
    assert _without_wall_times(read["table"]) == _without_wall_times(more["table"])
    assert not (tmp_path / "run" / "dprime").exists() and not (tmp_path / "run" / "features").exists()

    # Another training setting: a new model (and everything downstream) beside the old one, the old one kept.
    assert cli(standard_only + ["--set", "train.epochs=2"]) == 0
    newest = json.loads((tmp_path / "run" / "results.json").read_text())
    assert newest["stage_dirs"]["standard"]["model"] != meta["stage_dirs"]["standard"]["model"]
    assert Path(meta["stage_dirs"]["standard"]["model"]).exists() and "adversarial" not in newest["models"]


def _without_wall_times(table: dict) -> dict:
    """A table's dict without its wall-time notes (a resumed run re-scores in other seconds; the results are equal)."""
    return {**table, "notes": [n for n in table["notes"] if not n.startswith("Wall time")],
            "appendix": [_without_wall_times(t) for t in table["appendix"]]}


def test_threads_flag_is_checked():
    assert cli(["--threads", "0", "layers", "--arch", "small_cnn"]) == 2
    assert cli(["--threads", "1", "layers", "--arch", "small_cnn"]) == 0 and torch.get_num_threads() == 1


def test_batched_episodic_evaluation_gives_the_one_at_a_time_records_and_resumes(setup, tmp_path, monkeypatch):
    base, dprime, sets = setup
    one = evaluate([base], dprime, sets, _cfg(Mode.EPISODIC), tmp_path / "one", 10, progress=False)
    # conftest runs torch with one thread: the batched CPU workers' arithmetic, so records agree bit for bit
    strip = lambda recs: [{k: v for k, v in r.items() if k != "seconds"} for r in recs]  # noqa: E731

    from rmc.defense.batched import BatchedEpisodic
    real_run, calls = BatchedEpisodic.run, {"n": 0}

    def counted_run(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 2 and calls.get("die"):          # the second batch of the first set
            raise KeyboardInterrupt
        return real_run(self, *a, **kw)

    monkeypatch.setattr(BatchedEpisodic, "run", counted_run)
    calls["die"] = True
    with pytest.raises(KeyboardInterrupt):
        evaluate([base], dprime, sets, _cfg(Mode.EPISODIC), tmp_path / "b", 10, progress=False, batch=4)
    assert sum(1 for _ in (tmp_path / "b" / "standard" / sets[0].name / "rmc.jsonl").open()) == 4   # one batch saved
    calls["die"] = False
    got = evaluate([base], dprime, sets, _cfg(Mode.EPISODIC), tmp_path / "b", 10, progress=False, batch=4)
    assert calls["n"] == 2 + 1 + 2   # resumed: the rest of set 1 (2 inputs: one batch), then set 2 (6: two batches)
    for s in sets:
        assert strip(got["standard"][s.name]["rmc"]) == strip(one["standard"][s.name]["rmc"])


@pytest.mark.parametrize("kw, match", [({"batch": 0}, "whole number"), ({"batch": 2.5}, "whole number"),
                                       ({"batch": 4, "mode": Mode.ONLINE}, "episodic"),
                                       ({"batch": 4, "shards": 2}, "drop --batch")])
def test_bad_batch_is_refused_before_any_work(setup, tmp_path, kw, match):
    base, dprime, sets = setup
    kw = dict(kw)
    mode = kw.pop("mode", Mode.EPISODIC)
    with pytest.raises(RMCError, match=match):
        evaluate([base], dprime, sets, _cfg(mode), tmp_path, 10, progress=False, **kw)
    assert not (tmp_path / "standard").exists()


def test_run_and_evaluate_refuse_batch_in_online_mode_before_any_work(tmp_path, capsys):
    assert cli(["run", "--batch", "4", "--out", str(tmp_path / "run")]) == 2
    assert "needs episodic mode" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    for flag, message in (("--block", "--block must be a whole number >= 1"), ("--shards", "--shards must be")):
        assert cli(["run", flag, "0", "--out", str(tmp_path / "run")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
    # checked before the store is even opened (it does not exist here)
    assert cli(["evaluate", "--model", "m", "--store", "s", "--evalsets", "e", "--out", str(tmp_path / "ev"),
                "--batch", "4"]) == 2
    assert "needs episodic mode" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


@pytest.mark.parametrize("env, tuned", [({}, True), ({"RMC_DEFAULT_MALLOC": "1"}, False),
                                        ({"MALLOC_TRIM_THRESHOLD_": "1000000"}, False)])
def test_cli_tunes_the_allocator_unless_told_not_to(monkeypatch, env, tuned):
    import rmc.cpu
    calls = []
    monkeypatch.setattr(rmc.cpu, "tune_malloc", lambda: calls.append(1) or True)
    for k in ("RMC_DEFAULT_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli(["layers", "--arch", "small_cnn"]) == 0
    assert calls == ([1] if tuned else [])


def test_ray_workers_tune_the_allocator_and_threads_once(monkeypatch):
    # A Ray worker is a process rmc owns, like the command's: untuned, PGD spent most of its time in the kernel.
    import rmc.cpu
    from rmc.scaleout import executors
    calls = []
    monkeypatch.setattr(rmc.cpu, "tune_malloc", lambda: calls.append(1) or True)
    monkeypatch.setattr(executors, "_WORKER_READY", False)
    monkeypatch.delenv("RMC_DEFAULT_MALLOC", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert executors._entry(lambda a, b: a + b, 2, 5) == 7 and executors._entry(lambda: 1) == 1
        assert calls == [1] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_paper_preset_evaluates_the_originals_targeted_columns_and_one_untargeted():
    from rmc.cli.pipeline import attack_specs
    names = [s.resolved().name for s in attack_specs(load_config(preset="paper").attack)]
    # The original's fixed step (eps/16 of the large eps) is part of every set's name.
    assert names == ["clean", "pgd10-eps0.05-step0.00625-targeted", "pgd10-eps0.1-step0.00625",
                     "pgd10-eps0.1-step0.00625-targeted", "pgd100-eps0.1-step0.00625-targeted"]
    with pytest.raises(RMCError, match=r"\[10, 0.2\], which is not a \[steps, eps\] pair of attack.pgd"):
        load_config(preset="paper", overrides=[("attack.untargeted", [[10, 0.2]])])
    with pytest.raises(RMCError, match="attack.untargeted = 3 is not a valid bool"):
        load_config(overrides=[("attack.untargeted", 3)])
    both = [s.resolved().name for s in attack_specs(load_config(overrides=[("attack.pgd", [[10, 0.1]])]).attack)]
    assert both == ["clean", "pgd10-eps0.1", "pgd10-eps0.1-targeted"]
    with pytest.raises(RMCError, match="makes no set"):   # refused when the config is read, before any work
        load_config(overrides=[("attack.targeted", False), ("attack.untargeted", False)])


def test_table_rows_follow_the_originals_order_with_every_base():
    rec = lambda ok: [{"pred": 0, "label": 0 if ok else 1}]  # noqa: E731
    results = {b: {"clean": {"undefended": rec(True), "deepnn": rec(True), "webnn": rec(False), "rmc": rec(True)}}
               for b in ("standard", "adversarial", "denoising")}
    table = Table.from_results(results)
    assert list(table.rows) == ["None", "Adv. trained", "Denoising block", "DeepNN", "WebNN", "RMC",
                                "Adv. trained + DeepNN", "Adv. trained + WebNN", "Adv. trained + RMC",
                                "Denoising block + DeepNN", "Denoising block + WebNN", "Denoising block + RMC"]
    assert table.rows["WebNN"]["clean"].accuracy.value == 0.0 and table.rows["RMC"]["clean"].accuracy.value == 1.0


def test_records_carry_the_compute_path_and_a_stream_refuses_another(setup, tmp_path):
    base, dprime, sets = setup
    torch.set_num_threads(1)
    stop = FailOnCall(3)
    with pytest.raises(KeyboardInterrupt):
        evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, progress=False,
                 on_record=lambda name, record: stop())          # interrupted after three inputs
    path = tmp_path / "standard" / sets[0].name / "rmc.jsonl"
    paths = {json.loads(line)["compute"] for line in path.read_text().splitlines()}
    assert len(paths) == 1 and next(iter(paths)).endswith("/fp32/1t")
    torch.set_num_threads(2)   # resumed under another thread count: refused, naming both
    with pytest.raises(RMCError, match=r"computed with .*/1t, but this worker computes with .*/2t"):
        evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, progress=False)
    assert len(path.read_text().splitlines()) == 3          # nothing of the other compute path was written
    torch.set_num_threads(1)
    done = evaluate([base], dprime, sets[:1], _cfg(Mode.ONLINE), tmp_path, 10, progress=False)   # same path: fine
    assert len(done["standard"][sets[0].name]["rmc"]) == len(done["standard"][sets[0].name]["undefended"]) == 6


@pytest.fixture(scope="module")
def cli_workspace(tmp_path_factory):
    """A model, its evaluation sets, D' and features made by the CLI on the digits, as a user would."""
    root = tmp_path_factory.mktemp("ev")
    model = root / "m.safetensors"
    assert cli(["train", "--dataset", "digits", "--epochs", "3", "--batch-size", "64", "--quiet", "--out",
                str(model)]) == 0
    assert cli(["attack", "--model", str(model), "--n", "8", "--eps", "--pgd", "3:0.1", "--untargeted",
                "--out", str(root / "sets")]) == 0
    assert cli(["augment", "--model", str(model), "--out", str(root / "dprime"), "--steps", "2", "--eps", "0.1",
                "--step-size", "0.03", "--chunk-size", "64", "--batch-size", "64", "--train-subset", "200",
                "--quiet"]) == 0
    assert cli(["features", "--model", str(model), "--store", str(root / "dprime"), "--out", str(root / "feats"),
                "--quiet"]) == 0
    return root


def _evaluate(ws, out, *extra):
    assert cli(["evaluate", "--model", str(ws / "m.safetensors"), "--store", str(ws / "dprime"), "--evalsets",
                str(ws / "sets"), "--features", str(ws / "feats" / "dprime.npy"), "--n", "8", "--set", "rmc.k=32",
                "--set", "rmc.calib_k=16", "--set", "rmc.max_epochs=1", "--set", "dent.steps=2", "--out", str(out),
                *extra]) == 0
    got = json.loads((out / "results.json").read_text())
    return got, [r for t in [got["table"], *got["table"].get("appendix", [])] for r in t["rows"]]


def test_evaluate_takes_defenses_as_rmc_run_does(cli_workspace, tmp_path, capsys):
    got, rows = _evaluate(cli_workspace, tmp_path / "dent", "--defenses", "dent", "--attacks", "fpa",
                          "--protocols", "chen2022", "--set", "batch_rows.rounds=1", "--set", "batch_rows.steps=2")
    assert got["defenses"] == ["dent"]
    assert "DENT" in rows and "RMC" not in rows                       # DENT instead of RMC in the main table
    results = tmp_path / "dent" / "results" / "standard"
    assert (results / "clean" / "dent.json").exists() and not list(results.rglob("rmc*.jsonl"))
    appendix = got["table"]["appendix"][0]
    assert "DENT" in appendix["columns"] and any(r.startswith("FPA [chen2022] against DENT") for r in appendix["rows"])

    got, rows = _evaluate(cli_workspace, tmp_path / "default", "--no-attack-rows")
    assert got["defenses"] == ["rmc"] and "RMC" in rows and "DENT" not in rows

    with pytest.raises(SystemExit):                                    # the registry's selectable defenses only
        cli(["evaluate", "--model", "m", "--store", "s", "--evalsets", "e", "--out", str(tmp_path / "x"),
             "--defenses", "undefended"])
    assert "invalid choice: 'undefended'" in capsys.readouterr().err
