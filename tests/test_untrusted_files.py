"""Files rmc did not write are untrusted input: names and paths read from them never lead outside their folder or
the output folder, and every field is checked when read. The first tests reproduce two escapes through an
evaluation-set index; the property-based ones below throw generated damage at every artifact kind."""

import json
import os
import shutil
from pathlib import Path

import pytest

from rmc.artifacts.dprime import AugmentConfig, build_dprime_store
from rmc.artifacts.evalsets import AttackSpec, load_eval_sets, make_eval_sets, save_eval_sets
from rmc.artifacts.features import ensure_features
from rmc.cli import main as cli
from rmc.errors import RMCError
from rmc.models import ModelInfo, save_checkpoint


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
    ensure_features(tiny_trained, info, "block3", store, root / "feats" / "dprime.npy")
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
            "--no-attack-rows", "--set", "rmc.k=16", "--out", str(out), *extra]


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
    assert rc == 2 and "set name" in _one_line_error(capsys)


def test_a_set_file_outside_the_set_folder_is_never_read(ws, tmp_path, capsys):
    d = _copy(ws, tmp_path / "d")
    # The file is a valid set whose hash matches the index: only its place is wrong.
    shutil.move(d / "sets" / "clean.safetensors", tmp_path / "y.safetensors")
    _edit_index(d / "sets", lambda ix: ix["sets"][0].update(file="../../y.safetensors"))
    with pytest.raises(RMCError, match="outside"):
        load_eval_sets(d / "sets")
    assert cli(_evaluate(d, d / "out")) == 2
    assert "outside" in _one_line_error(capsys)
