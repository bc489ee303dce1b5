"""studies/quirks.py: each variant's change from the corrected one is paired input by input, and tested."""

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("quirks", Path(__file__).parents[1] / "studies" / "quirks.py")
quirks = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quirks)


@pytest.mark.parametrize("gained, lost, p", [(0, 6, 2 / 64), (5, 13, 2 * 12616 / 2 ** 18), (3, 3, 1.0), (0, 0, 1.0),
                                             (13, 5, 2 * 12616 / 2 ** 18)])
def test_mcnemar_is_the_exact_two_sided_sign_test(gained, lost, p):
    assert quirks.mcnemar(gained, lost) == pytest.approx(p)


def _column(folder: Path, correct_rmc: str, correct_webnn: str) -> None:
    folder.mkdir(parents=True)
    recs = [{"index": i, "label": 1, "pred": int(c)} for i, c in enumerate(correct_rmc)]
    (folder / "rmc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(recs)))   # any order on disk
    web = [{"index": i, "label": 1, "pred": int(c)} for i, c in enumerate(correct_webnn)]
    (folder / "baselines.json").write_text(json.dumps({"webnn": web, "undefended": web, "deepnn": web}))


def _saved(tmp_path: Path, name: str, rmc: str, step: str = "") -> Path:
    results = tmp_path / name / "standard"
    _column(results / f"pgd10-eps0.1{step}", rmc, "1100")
    acc = {"accuracy": {"value": rmc.count("1") / len(rmc), "n": len(rmc)}}
    table = {"rows": {row: {f"pgd10-eps0.1{step}": acc} for row in ("None", "WebNN", "RMC")}}
    saved = tmp_path / f"{name}.json"
    saved.write_text(json.dumps({"table": table, "stage_dirs": {"standard": {"results": str(results)}}}))
    return saved


def _added(saved: Path, out: Path) -> dict:
    quirks._add_per_input(saved, out)
    return json.loads(saved.read_text())


def test_changes_pair_the_same_inputs_across_variants_and_their_column_names(tmp_path):
    base = _added(_saved(tmp_path, "corrected", "1100"), tmp_path)
    assert base["per_input"]["RMC"] == {"pgd10-eps0.1": "1100"}          # index order, not file order
    # the eval-step variant's columns carry the step in their names; they still pair with the corrected ones
    other = _added(_saved(tmp_path, "eval-step", "0111", step=quirks.STEP), tmp_path)
    assert other["per_input"]["RMC"] == {"pgd10-eps0.1": "0111"}
    text = quirks.table({"corrected": base, "eval-step": other})
    assert "| eval-step | 75 (+25; +2/-1) |" in text                    # not +1/-0: the same total, other inputs
    assert "| corrected | 50 |" in text


def test_a_variant_without_records_shows_no_pairing(tmp_path):
    base = _added(_saved(tmp_path, "corrected", "1100"), tmp_path)
    moved = tmp_path / "gone.json"
    data = json.loads(_saved(tmp_path, "gone", "1111").read_text())
    data["stage_dirs"]["standard"]["results"] = str(tmp_path / "deleted")   # its run folder is on another machine
    moved.write_text(json.dumps(data))
    assert "| gone | 100 (+50) |" in quirks.table({"corrected": base, "gone": _added(moved, tmp_path)})


def test_a_results_folder_outside_the_run_folder_is_not_read(tmp_path):
    """The saved file names its results folder; only one inside the run folder given on the command line is read."""
    saved = _saved(tmp_path / "elsewhere", "corrected", "1100")
    (tmp_path / "run").mkdir()
    assert "per_input" not in _added(saved, tmp_path / "run")
    assert _added(saved, tmp_path / "elsewhere")["per_input"]["RMC"] == {"pgd10-eps0.1": "1100"}
