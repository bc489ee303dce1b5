"""studies/aware_rows_table.py: the attack rows of a run still in progress, read from its records."""

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location("aware_rows_table",
                                               Path(__file__).parents[1] / "studies" / "aware_rows_table.py")
table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(table)


def _write(path: Path, preds: list[int], label: int = 0, **extra) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"index": i, "label": label, "pred": p, "seconds": 1.0, **extra}) + "\n"
                            for i, p in enumerate(preds)))


def test_rows_use_the_scored_pass_once_finished_and_the_worst_case_takes_every_row(tmp_path, capsys):
    (tmp_path / "clean").mkdir()
    (tmp_path / "clean" / "baselines.json").write_text(json.dumps(
        {"undefended": [{"index": i, "label": 0, "pred": 0} for i in range(4)]}))
    _write(tmp_path / "clean" / "rmc.jsonl", [0, 0, 0, 0])
    _write(tmp_path / "fpa-chen2022-r10" / "attack.jsonl", [0, 1, 0])              # running: the attack's verdict
    _write(tmp_path / "gmsa-min-chen2022-r10" / "attack.jsonl", [0, 3])             # the attacker's own RMC
    _write(tmp_path / "gmsa-min-chen2022-r10" / "rmc.jsonl", [0, 0])                # finished: the scored pass
    rows = table.rows_of(tmp_path)
    assert rows["fpa-chen2022-r10"]["source"] == "attack's verdict"
    assert rows["gmsa-min-chen2022-r10"]["source"] == "scored pass"
    assert table.agreement(rows["fpa-chen2022-r10"]) is None             # nothing to compare with yet
    agree = table.agreement(rows["gmsa-min-chen2022-r10"])
    assert (agree.hits, agree.n) == (1, 2)                               # input 1: verdict 3, score 0
    static, rmc, n = table.worst_case(rows)
    assert n == 2 and (rmc.hits, static.hits) == (1, 2)       # input 1 falls to FPA; the static model is right
    table.main([str(tmp_path)])
    out = capsys.readouterr().out
    assert "| fpa-chen2022-r10 | - | 66.7 [21-94] (N=3) | attack's verdict | 66.7 [21-94] (N=3) | - | 3 |" in out
    assert ("| gmsa-min-chen2022-r10 | - | 100.0 [34-100] (N=2) | scored pass | 50.0 [9-91] (N=2) | "
            "50.0 [9-91] (N=2) | 2 |") in out
    assert "| worst case per input | 100.0 [34-100] (N=2) | 50.0 [9-91] (N=2) |" in out
