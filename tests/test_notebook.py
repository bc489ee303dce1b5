"""examples/visualize.ipynb runs from top to bottom on a small run made by `rmc run`, and shows what it says."""

import json
import re
from pathlib import Path

import nbclient
import nbformat
import pytest

from rmc.cli import main as cli

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "visualize.ipynb"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("nb") / "run"
    args = ["run", "--out", str(run), "--set", "data.dataset=digits", "--set", "train.epochs=3",
            "--set", "augment.train_subset=300", "--set", "augment.steps=[3]", "--set", "attack.n=8",
            "--set", "attack.pgd=[[5, 0.15]]", "--set", "rmc.k=32", "--set", "rmc.calib_k=32",
            "--set", "rmc.max_epochs=2", "--set", "visualize.inputs=2", "--no-attack-rows"]
    assert cli(args) == 0
    return run


def _records(run: Path, name: str) -> tuple[dict, dict]:
    results = json.loads((run / "results.json").read_text())["stage_dirs"]["standard"]["results"]
    folder = run / "results" / Path(results).parts[-2] / "standard" / name
    static = {r["index"]: r for r in json.loads((folder / "baselines.json").read_text())["undefended"]}
    defended = {r["index"]: r for line in (folder / "rmc.jsonl").read_text().splitlines() if line.strip()
                for r in [json.loads(line)]}
    return static, defended


@pytest.mark.slow
def test_notebook_runs_on_a_small_run_and_shows_neighbours_curve_and_predictions(tiny_run, monkeypatch):
    monkeypatch.setenv("RMC_RUN", str(tiny_run))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")   # committed without outputs
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    figures = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert figures == 3                                         # neighbours, adaptation curve, probabilities
    chosen = re.search(r"set (\S+), input (\d+): true class (\d+)", text)
    name, index = chosen.group(1), int(chosen.group(2))
    assert name == "pgd5-eps0.15"                               # the first attacked set
    static, defended = _records(tiny_run, name)
    turned = [i for i, r in sorted(defended.items()) if r["pred"] == r["label"] != static[i]["pred"]]
    assert index == (turned[0] if turned else 0)                # static wrong, RMC right, where the run has one
    assert int(chosen.group(3)) == static[index]["label"]
    assert re.search(rf"static model: {static[index]['pred']}\n", text)
    assert re.search(rf"RMC in the run: {defended[index]['pred']}\n", text)
    assert re.search(r"fresh RMC \(episodic\): \d\n", text)
    share = re.search(r"(\d+)% of its 32 neighbours carry its true class", text)
    assert share and 0 <= int(share.group(1)) <= 100
