"""Files rmc did not write are untrusted input: names and paths read from them never lead outside their folder or
the output folder, and every field is checked when read. The first tests reproduce two escapes through an
evaluation-set index; the property-based ones below throw generated damage at every artifact kind."""

import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from rmc.artifacts.dprime import AugmentConfig, build_dprime_store
from rmc.artifacts.evalsets import AttackSpec, load_eval_sets, make_eval_sets, save_eval_sets
from rmc.artifacts.features import ensure_features
from rmc.cli import main as cli
from rmc.errors import RMCError
from rmc.models import ModelInfo, default_layer, save_checkpoint


@pytest.fixture(autouse=True)
def _own_cache(tmp_path_factory, monkeypatch):
    # The store's verification records are the one thing rmc keeps outside --out: outside every compared tree too.
    monkeypatch.setenv("RMC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "verify-cache"))


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_trained, digits):
    """A model, two evaluation sets, a small D' and its features, written by rmc itself (the clean artifacts)."""
    root = tmp_path_factory.mktemp("ws")
    os.environ.setdefault("RMC_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "verify-cache"))
    train, test = digits
    info = save_checkpoint(tiny_trained, ModelInfo("small_cnn", 10, (1, 8, 8), dataset="digits"),
                           root / "m.safetensors")
    sets = make_eval_sets(tiny_trained, info, test, 6, [AttackSpec("clean"), AttackSpec("pgd", 0.1, 2)], seed=0)
    save_eval_sets(root / "sets", sets)
    store = build_dprime_store(tiny_trained, info, train, root / "dprime",
                               AugmentConfig(steps=(2,), eps=0.1, step_size=0.03, chunk_size=64, batch_size=64,
                                             train_subset=120), progress=False)
    ensure_features(tiny_trained, info, default_layer(tiny_trained), store, root / "feats" / "dprime.npy")
    return root


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under `root` (folders as None), to compare before and after a command."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def _copy(ws: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("m.safetensors", "m.json", "sets", "dprime", "feats"):
        src = ws / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dst / name)
    return dst


def _evaluate(d: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", str(d / "m.safetensors"), "--store", str(d / "dprime"), "--evalsets",
            str(d / "sets"), "--features", str(d / "feats" / "dprime.npy"), "--n", "3", "--no-rmc",
            "--no-attack-rows", "--set", "rmc.k=16", "--set", "rmc.fast_path=false", "--out", str(out), *extra]


def _edit_index(folder: Path, change) -> None:
    index = json.loads((folder / "index.json").read_text())
    change(index)
    (folder / "index.json").write_text(json.dumps(index))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith("note:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------- the two reproductions

def test_a_set_name_that_climbs_out_writes_nothing_outside_out(ws, tmp_path, capsys):
    d = _copy(ws, tmp_path / "a" / "b" / "c")
    _edit_index(d / "sets", lambda ix: ix["sets"][0].update(name="../../../../x"))
    out = d / "out"
    before = _tree(tmp_path)
    rc = cli(_evaluate(d, out))
    after = {k: v for k, v in _tree(tmp_path).items() if not (tmp_path / k).is_relative_to(out)}
    assert after == before, sorted(set(after) ^ set(before))
    line = _one_line_error(capsys)
    assert rc == 2 and "sets[0].name" in line and "'../../../../x'" in line


def test_a_set_file_outside_the_set_folder_is_never_read(ws, tmp_path, capsys):
    d = _copy(ws, tmp_path / "d")
    # The file is a valid set whose hash matches the index: only its place is wrong.
    shutil.move(d / "sets" / "clean.safetensors", tmp_path / "y.safetensors")
    _edit_index(d / "sets", lambda ix: ix["sets"][0].update(file="../../y.safetensors"))
    with pytest.raises(RMCError, match=r"'sets\[0\]\.file' .* is '\.\./\.\./y\.safetensors', not a plain name"):
        load_eval_sets(d / "sets")
    assert cli(_evaluate(d, d / "out")) == 2
    assert "sets[0].file" in _one_line_error(capsys)


def test_a_set_file_that_is_a_symlink_out_of_the_folder_is_never_read(ws, tmp_path, capsys):
    d = _copy(ws, tmp_path / "d")
    shutil.move(d / "sets" / "clean.safetensors", tmp_path / "y.safetensors")
    os.symlink(tmp_path / "y.safetensors", d / "sets" / "clean.safetensors")
    with pytest.raises(RMCError, match="the file of set 'clean' .* leads outside"):
        load_eval_sets(d / "sets")
    os.unlink(d / "sets" / "clean.safetensors")
    os.symlink("../y.safetensors", d / "sets" / "clean.safetensors")   # relative, the same escape
    with pytest.raises(RMCError, match="leads outside"):
        load_eval_sets(d / "sets")


# ---------------------------------------------------------------- generated damage (hypothesis)
#
# Each artifact kind is read back clean once; then generated corruptions of it (a field given another type, a
# hostile string, a huge number, NaN, a traversal name, an absolute path, a key removed or added) are read by the
# same reader. Every one must be refused in one line (RMCError), or give exactly the clean result, or differ only in
# a field the reader keeps as it is (`recorded`: a valid value of a setting that is shown, never followed).

HOSTILE_TEXT = ["../../../../x", "../x", "..", ".", "", "/etc/passwd", "/tmp/rmc-escape", "a/b", "a\\b", "x" * 5000,
                "\x00", "a\nb", "é", " ", ".hidden", "C:\\x", "~/x", "${HOME}", "clean.safetensors/../../y"]
HOSTILE = st.one_of(
    st.sampled_from(HOSTILE_TEXT),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e308, -1, -1.5, 0, 0.5, 1, 2 ** 64, 10 ** 30,
                     -2 ** 63, True, False, None, [], {}, [None], {"": None}, [1, 2, 3], {"a": {"b": [1]}}]),
    st.integers(), st.floats(), st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=4), st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))
EXTRA_KEYS = ["extra", "../x", "name", "file", "__class__", ""]


def _paths(doc, prefix=()):
    """Every (path to a value) in a JSON document, nested values after their parents."""
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    out = []
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


def _get(doc, path):
    for k in path:
        doc = doc[k]
    return doc


def _value(doc, path):
    """The value at `path`, or None where the damage removed it."""
    try:
        return _get(doc, path)
    except (KeyError, IndexError, TypeError):
        return None


def _same(a, b) -> bool:
    return type(a) is type(b) and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@st.composite
def damaged(draw, clean, skip=()):
    """(damaged copy of the JSON document `clean`, what was done, the path it was done at)."""
    doc = copy.deepcopy(clean)
    paths = [p for p in _paths(doc) if not any(p[:len(s)] == s for s in skip)]
    op = draw(st.sampled_from(["replace", "replace", "replace", "delete", "extra"]))
    if op == "extra":
        containers = [()] * isinstance(doc, dict) + [p for p in paths if isinstance(_get(doc, p), dict)]
        path = draw(st.sampled_from(containers))
        key = draw(st.sampled_from(EXTRA_KEYS).filter(lambda k: k not in _get(doc, path)))
        _get(doc, path)[key] = draw(HOSTILE)
        return doc, op, path + (key,)
    path = draw(st.sampled_from(paths))
    parent = _get(doc, path[:-1])
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(HOSTILE.filter(lambda v: not _same(v, parent[path[-1]])))
    return doc, op, path


def _outcome(fn):
    """("ok", result) or ("refused", the one-line message); any other exception fails the test."""
    try:
        result = "ok", fn()
    except RMCError as e:
        message = str(e)
        assert "\n" not in message and "\r" not in message, message
        result = "refused", message
    event(result[0])   # pytest --hypothesis-show-statistics: how often each happened
    return result


def _check(result, clean_view, view, recorded, path, doc):
    """A refusal, the clean result, or a change that `recorded(path, doc)` allows."""
    kind, value = result
    if kind == "ok" and view(value) != clean_view:
        assert recorded(path, doc), f"accepted a damaged file that changed the result, at {path}"


def _plain(value) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._\-=+@,]{1,128}", value) is not None \
        and not value.startswith(".")


@pytest.fixture(scope="module")
def clean_reads(ws):
    from rmc.artifacts.dprime import open_dprime_store
    from rmc.artifacts.features import load_features
    from rmc.models import load_checkpoint
    sets = load_eval_sets(ws / "sets")
    store = open_dprime_store(ws / "dprime")
    model, info = load_checkpoint(ws / "m.safetensors")
    return {"sets": _sets_view(sets), "store": _store_view(store), "model": _model_view((model, info)),
            "features": _features_view(load_features(ws / "feats" / "dprime.npy")), "info": info,
            "store_fingerprint": store.fingerprint}


def _sets_view(sets):
    return [(s.name, json.dumps(s.attack, sort_keys=True), s.images.sum().item(), s.labels.tolist(),
             None if s.targets is None else s.targets.tolist(), s.indices.tolist()) for s in sets]


def _store_view(store):
    return (len(store), store.copy_names, store.model_sha256, store.num_classes, store.input_shape,
            [store.copy_rows(c) for c in store.copy_names], store.labels.sum().item(), store.copy.tolist()[::50],
            int(store.images[:].sum()))


_PROBE = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8)


def _model_view(loaded):
    model, info = loaded
    with torch.no_grad():
        return json.dumps(dataclasses.asdict(info), sort_keys=True), model(_PROBE).tolist()


def _features_view(loaded):
    feats, prov = loaded
    return feats.sum().item(), tuple(feats.shape), {k: prov[k] for k in ("model_sha256", "layer", "source")}


def _damage_file(folder: Path, name: str, data) -> tuple[Any, str, tuple]:
    path = folder / name
    doc, op, where = data.draw(damaged(json.loads(path.read_text())))
    path.write_text(json.dumps(doc))
    return doc, op, where


@given(data=st.data())
def test_damaged_evaluation_set_index(ws, clean_reads, data):
    with tempfile.TemporaryDirectory() as tmp:
        sets = Path(tmp) / "sets"
        shutil.copytree(ws / "sets", sets)
        doc, op, path = _damage_file(sets, "index.json", data)
        result = _outcome(lambda: load_eval_sets(sets))
        _check(result, clean_reads["sets"], _sets_view, _index_recorded, path, doc)
        if path[2:3] in (("name",), ("file",)) and not _plain(_value(doc, path)):
            assert result[0] == "refused", (op, path)   # never a path component, never followed


def _index_recorded(path, doc) -> bool:
    """The attack settings are kept as they are (shown in the report); an entry's `n` is not read; a set may be
    renamed to another plain name, or left out of the index (an entry replaced by anything else is refused)."""
    return (path[2:3] == ("attack",) or path[2:] == ("n",) or (path[2:] == ("name",) and _plain(_value(doc, path)))
            or len(path) == 2)


@given(data=st.data())
def test_damaged_dprime_manifest(ws, clean_reads, data):
    from rmc.artifacts.dprime import open_dprime_store
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "dprime"
        shutil.copytree(ws / "dprime", store)
        doc, op, path = _damage_file(store, "manifest.json", data)
        result = _outcome(lambda: open_dprime_store(store))
        # The model a store was made against is recorded as it is (checked against the model it is used with).
        _check(result, clean_reads["store"], _store_view,
               lambda p, d: p[:2] in (("model", "sha256"), ("model", "num_classes")), path, doc)


@given(data=st.data())
def test_damaged_model_sidecar(ws, clean_reads, data):
    from rmc.models import load_checkpoint
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(ws / "m.safetensors", Path(tmp) / "m.safetensors")
        shutil.copy(ws / "m.json", Path(tmp) / "m.json")
        doc, op, path = _damage_file(Path(tmp), "m.json", data)
        result = _outcome(lambda: load_checkpoint(Path(tmp) / "m.safetensors"))
        # Recorded as they are: the test accuracy, seed, training settings, where imported weights came from,
        # adversarial flag; the data set and image shape (checked against the data and D' a command combines it
        # with: rmc.artifacts.provenance); and the normalisation, a valid edit of which changes the model as the
        # file now says.
        recorded = {"test_accuracy", "seed", "config", "imported", "dataset", "adversarial", "mean", "std", "sha256",
                    "input_shape"}
        _check(result, clean_reads["model"], _model_view, lambda p, d: p[0] in recorded, path, doc)
        if path[:1] == ("arch",) and result[0] == "ok":
            assert result[1][1].arch in ("small_cnn", "resnet18")   # a sidecar never chooses code to run


@given(data=st.data())
def test_damaged_features_sidecar(ws, clean_reads, data):
    from rmc.artifacts.features import load_features
    info = clean_reads["info"]
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ws / "feats", Path(tmp) / "feats")
        doc, op, path = _damage_file(Path(tmp) / "feats", "dprime.json", data)
        layer = json.loads((ws / "feats" / "dprime.json").read_text())["layer"]
        result = _outcome(lambda: load_features(Path(tmp) / "feats" / "dprime.npy", info.sha256, layer,
                                                f"store:{clean_reads['store_fingerprint']}"))
        _check(result, clean_reads["features"], _features_view, lambda p, d: False, path, doc)


# -- records and progress files

@pytest.fixture(scope="module")
def evaluated(ws, tmp_path_factory):
    """An `rmc evaluate` output with RMC records (episodic, 2 inputs per set), and the run directory `rmc report`
    reads, laid out as `rmc run` lays it out."""
    root = tmp_path_factory.mktemp("evaluated")
    out = root / "out"
    argv = _evaluate(ws, out)
    argv = [a for a in argv if a != "--no-rmc"] + ["--rmc-n", "2", "--mode", "episodic", "--set", "rmc.max_epochs=1",
                                                   "--set", "rmc.calib_k=16"]
    assert cli(argv) == 0
    run = root / "run"
    key = "abcd1234"
    shutil.copytree(out / "results" / "standard", run / "results" / key / "standard")
    shutil.copytree(ws / "sets", run / "evalsets" / f"standard-{key}")
    results = json.loads((out / "results.json").read_text())
    results["stage_dirs"] = {"standard": {"evalsets": f"{run}/evalsets/standard-{key}",
                                          "results": f"{run}/results/{key}/standard"}}
    (run / "results.json").write_text(json.dumps(results))
    (run / "config.yaml").write_text("data:\n  dataset: digits\nrmc:\n  mode: episodic\nmodel:\n  bases: [standard]\n")
    return argv, out, run


def _records_view(stream):
    return [{k: v for k, v in r.items()} for r in stream.records]


@given(data=st.data())
def test_damaged_record_stream(evaluated, data):
    from rmc.evaluation.records import RecordStream
    _, out, _ = evaluated
    folder = out / "results" / "standard" / "clean"
    lines = [json.loads(x) for x in (folder / "rmc.jsonl").read_text().splitlines()]
    fingerprint = lines[0]["fingerprint"]
    clean = _records_view(RecordStream(folder, "rmc", fingerprint))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(folder, Path(tmp) / "clean")
        doc, op, path = data.draw(damaged(lines))
        (Path(tmp) / "clean" / "rmc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in doc))
        result = _outcome(lambda: RecordStream(Path(tmp) / "clean", "rmc", fingerprint))
        if result[0] == "ok":
            got = _records_view(result[1])
            # A record out of order (or removed) ends the stream there: the rest is recomputed (the driver refuses a
            # stream that starts at another input than it expects). A valid value in another field is results as
            # recorded (rmc cannot tell an edited prediction from its own).
            truncated = got == doc[:len(got)] and (len(path) == 1 or path[1] == "index")
            edited = len(got) == len(clean) and len(path) >= 2 and path[1] not in ("index", "fingerprint") and all(
                g == c for i, (g, c) in enumerate(zip(got, clean, strict=True)) if i != path[0])
            assert got == clean or truncated or edited, (op, path)


@given(data=st.data())
def test_damaged_baselines_are_recomputed_or_refused(ws, evaluated, data):
    from rmc.cli.config import load_config
    from rmc.evaluation.driver import finished_results
    _, out, _ = evaluated
    cfg = load_config(None, "default", [("rmc.k", 16), ("rmc.mode", "episodic"), ("rmc.max_epochs", 1),
                                        ("rmc.calib_k", 16)]).rmc
    sets = load_eval_sets(ws / "sets")
    clean = finished_results(out / "results" / "standard", sets, cfg, 3, rmc_n=2)
    assert clean is not None
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "standard"
        shutil.copytree(out / "results" / "standard", folder)
        _, op, path = _damage_file(folder / "clean", "baselines.json", data)
        result = _outcome(lambda: finished_results(folder, sets, cfg, 3, rmc_n=2))
        # None: the evaluation recomputes (and rewrites) the baselines; a valid record is results as recorded.
        if result[0] == "ok" and result[1] is not None and result[1] != clean:
            assert len(path) >= 3 and path[0] in ("undefended", "deepnn", "webnn"), (op, path)


@given(data=st.data())
def test_damaged_store_progress_still_builds_the_same_store(ws, digits, tiny_trained, data):
    from rmc.artifacts.dprime import AugmentConfig, build_dprime_store, partial_path
    from rmc.models import load_checkpoint
    _, info = load_checkpoint(ws / "m.safetensors")
    cfg = AugmentConfig(steps=(2,), eps=0.1, step_size=0.03, chunk_size=64, batch_size=64, train_subset=120)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "d"
        seen = []

        def stop(task):
            seen.append(task)
            if len(seen) == 3:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            build_dprime_store(tiny_trained, info, digits[0], out, cfg, progress=False, on_chunk=stop)
        _damage_file(partial_path(out), "progress.json", data)
        result = _outcome(lambda: build_dprime_store(tiny_trained, info, digits[0], out, cfg, progress=False))
        if result[0] == "ok":   # every file of the store (its shards, arrays, manifest) byte for byte
            assert _tree(out) == _tree(ws / "dprime")


@given(data=st.data())
def test_damaged_results_json_of_a_run(evaluated, data):
    from rmc.evaluation.html_report import tables
    from rmc.evaluation.run_records import RunRecords
    _, _, run = evaluated

    def view(r):
        table, where = tables(r)
        return ([(s.base, s.name, str(s.folder.relative_to(r.root)), s.images and str(s.images.relative_to(r.root)))
                 for s in r.sets], table.to_dict(), where, sorted(r.missing))

    clean = view(RunRecords(run))
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(run, Path(tmp) / "run", symlinks=True)
        target = Path(tmp) / "run"
        text = (target / "results.json").read_text().replace(str(run), str(target))
        (target / "results.json").write_text(text)
        # What the report reads of results.json: the stage folders (named by path) and the table.
        doc, op, path = data.draw(damaged(json.loads(text), skip=[("rmc",), ("attack_rows",), ("model",)]))
        (target / "results.json").write_text(json.dumps(doc))
        result = _outcome(lambda: view(RunRecords(target)))
        # The table is shown as results.json has it.
        _check(result, clean, lambda v: v, lambda p, d: p[:1] == ("table",), path, doc)


# -- end to end: the command refuses in one line, or gives the clean table, and writes nothing outside --out

def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli(argv)
    return rc, err.getvalue()


def _refused_in_one_line(rc: int, err: str) -> None:
    event("refused")
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in err, (rc, err[-2000:])


def _outside(root: Path, out: Path) -> dict:
    return {k: v for k, v in _tree(root).items() if not (root / k).is_relative_to(out)}


def _rows(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())["table"]["rows"]


@pytest.fixture(scope="module")
def clean_rows(ws, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    assert _run(_evaluate(ws, out))[0] == 0
    return _rows(out)


@settings(max_examples=6)
@given(data=st.data())
def test_evaluate_with_a_damaged_index(ws, clean_rows, data):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        d = _copy(ws, root / "w")
        doc, op, path = _damage_file(d / "sets", "index.json", data)
        before = _outside(root, d / "out")
        rc, err = _run(_evaluate(d, d / "out"))
        assert _outside(root, d / "out") == before
        if rc != 0:
            _refused_in_one_line(rc, err)
        else:   # the table's cells come from the images, never from the settings recorded beside them
            assert _rows(d / "out") == clean_rows or _index_recorded(path, doc), (op, path)


@settings(max_examples=4)
@given(data=st.data())
def test_evaluate_resumes_from_damaged_records_or_refuses(evaluated, data):
    argv, out, _ = evaluated
    clean = _rows(out)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        shutil.copytree(out, root / "out")
        stream = root / "out" / "results" / "standard" / "pgd2-eps0.1" / "rmc.jsonl"
        lines = [json.loads(x) for x in stream.read_text().splitlines()]
        doc, op, path = data.draw(damaged(lines))
        stream.write_text("".join(json.dumps(r) + "\n" for r in doc))
        before = _outside(root, root / "out")
        rc, err = _run(argv[:argv.index("--out") + 1] + [str(root / "out")] + argv[argv.index("--out") + 2:])
        assert _outside(root, root / "out") == before
        if rc != 0:
            _refused_in_one_line(rc, err)
        else:   # recomputed where damaged; a valid prediction, label or target is results as recorded
            assert _rows(root / "out") == clean or path[1:2] in (("pred",), ("label",), ("target",)), (op, path)


def _page(run: Path) -> str:
    text = (run / "report.html").read_text()
    return re.sub(r"Written \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", "", text).replace(str(run), "RUN")


@pytest.fixture(scope="module")
def clean_page(evaluated, tmp_path_factory):
    _, _, run = evaluated
    copy_ = tmp_path_factory.mktemp("page") / "run"
    shutil.copytree(run, copy_)
    assert _run(["report", str(copy_)])[0] == 0
    return _page(copy_)


@settings(max_examples=4)
@given(data=st.data())
def test_report_of_a_run_with_damaged_results_json(evaluated, clean_page, data):
    _, _, run = evaluated
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        target = root / "run"
        shutil.copytree(run, target)
        doc, op, path = data.draw(damaged(json.loads((target / "results.json").read_text()),
                                          skip=[("rmc",), ("attack_rows",), ("model",)]))
        (target / "results.json").write_text(json.dumps(doc))
        before = _outside(root, target)
        rc, err = _run(["report", str(target)])
        assert _outside(root, target) == before
        if rc != 0:
            _refused_in_one_line(rc, err)
        else:
            assert _page(target) == clean_page or path[:1] == ("table",), (op, path)


# -- links: a folder or file of an output that leads out of it is never written through

def test_a_results_folder_that_links_out_of_out_is_refused(ws, tmp_path, capsys):
    d = _copy(ws, tmp_path / "w")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (d / "out" / "results" / "standard").mkdir(parents=True)
    os.symlink(elsewhere, d / "out" / "results" / "standard" / "clean")
    before = _outside(tmp_path, d / "out")
    assert cli(_evaluate(d, d / "out")) == 2
    assert "leads outside" in _one_line_error(capsys)
    assert _outside(tmp_path, d / "out") == before and not any(elsewhere.iterdir())


def test_a_record_file_that_links_out_of_its_folder_is_refused(ws, evaluated, tmp_path, capsys):
    argv, out, _ = evaluated
    shutil.copytree(out, tmp_path / "out")
    victim = tmp_path / "victim.txt"
    victim.write_text("mine\n")
    stream = tmp_path / "out" / "results" / "standard" / "clean" / "rmc.jsonl"
    stream.unlink()
    os.symlink(victim, stream)
    i = argv.index("--out")
    assert cli(argv[:i + 1] + [str(tmp_path / "out")] + argv[i + 2:]) == 2
    assert "a record stream" in _one_line_error(capsys) and victim.read_text() == "mine\n"


def test_a_report_does_not_follow_a_set_folder_out_of_the_run(evaluated, tmp_path, capsys):
    _, _, run = evaluated
    shutil.copytree(run, tmp_path / "run")
    sets = tmp_path / "run" / "results" / "abcd1234" / "standard"
    shutil.move(sets / "clean", tmp_path / "clean-elsewhere")
    os.symlink(tmp_path / "clean-elsewhere", sets / "clean")
    assert cli(["report", str(tmp_path / "run")]) == 2
    assert "leads outside" in _one_line_error(capsys)


def test_a_report_does_not_embed_a_figure_that_links_out_of_the_run(evaluated, tmp_path, capsys):
    _, _, run = evaluated
    shutil.copytree(run, tmp_path / "run")
    (tmp_path / "secret.png").write_bytes(b"\x89PNG not for the page")
    os.symlink(tmp_path / "secret.png", tmp_path / "run" / "neighbours.png")
    assert cli(["report", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    assert "the neighbours figure" in _one_line_error(capsys) and not (tmp_path / "out" / "report.html").exists()


def test_an_invalid_value_a_flag_replaces_is_still_refused(ws, tmp_path, capsys):
    from rmc.cli.config import load_config
    assert load_config(None, "default", [("rmc.mode", "online")], [("rmc.mode", "episodic")]).rmc.mode.value == \
        "episodic"                                           # the flag wins over a valid value
    with pytest.raises(RMCError, match="'foo' is not a valid Mode"):
        load_config(None, "default", [("rmc.mode", "foo")], [("rmc.mode", "episodic")])
    assert cli(_evaluate(ws, tmp_path / "out", "--set", "rmc.mode=foo", "--mode", "episodic")) == 2
    assert "foo" in _one_line_error(capsys) and not (tmp_path / "out" / "results").exists()
    with pytest.raises(RMCError, match="model.bases"):        # a check that was shadowed by a second validate()
        load_config(None, "default", [("model.bases", ["nope"])])


# -- online states: the count and the tensors of a saved state fit the model, or a one-line refusal

@pytest.mark.parametrize("damage, match", [
    (lambda s: s.pop("__n_done__"), "__n_done__"),
    (lambda s: s.update(__n_done__=torch.tensor(1.5)), "__n_done__"),
    (lambda s: s.update(__n_done__=torch.tensor([1, 2])), "__n_done__"),
    (lambda s: s.update(__n_done__=torch.tensor(-1)), "__n_done__"),
    (lambda s: s.pop(next(k for k in s if not k.startswith("__"))), "other weights"),
    (lambda s: s.update({"evil": torch.zeros(1)}), "other weights"),
    (lambda s: s.update({k: torch.zeros(3) for k in list(s)[:1]}), "other shapes"),
    (lambda s: s.update({"__optimizer__.9999.exp_avg": torch.zeros(1)}), "fits no parameter"),
    (lambda s: s.update({"__optimizer__.0.evil": torch.zeros(1)}), "fits no parameter"),
    (lambda s: s.update({"__optimizer__.x": torch.zeros(1)}), "fits no parameter"),
])
def test_a_damaged_online_state_is_refused_in_one_line(tiny_trained, tmp_path, damage, match):
    import types

    from rmc.evaluation.records import RecordStream, check_state
    from rmc.io import save_tensors
    state = {k: v.clone() for k, v in tiny_trained.state_dict().items()}
    rmc = types.SimpleNamespace(static_state=dict(state), params=list(tiny_trained.parameters()))
    stream = RecordStream(tmp_path, "rmc", "fp")
    for i in range(2):
        stream.append({"index": i, "label": 0, "pred": 0})
    saved = {**state, "__n_done__": torch.tensor(2)}
    assert check_state(dict(state), rmc, "s") is not None        # the clean state fits
    damage(saved)
    save_tensors(stream.state_path, saved)
    with pytest.raises(RMCError, match=match) as e:
        loaded = RecordStream(tmp_path, "rmc", "fp").load_state()
        check_state(loaded, rmc, str(stream.state_path))
    assert "\n" not in str(e.value)
