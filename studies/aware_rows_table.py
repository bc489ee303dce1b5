"""The attack rows of one base so far, from the records on disk (for a defense-aware run that spans sessions).

    python studies/aware_rows_table.py runs/aware-adv/results/<key>/adversarial

`rmc run` prints the attack-row table when every row is finished. Before that, this reads each row's folder: the
transfer rows' `baselines.json` + `rmc.jsonl`, and the defense-aware rows' `attack.jsonl` (the attack's own
verdict: the attacker's RMC's prediction of the input it chose; `chen2022`: its own RMC copy under its own keys)
or, once the row finished, its scored pass `rmc.jsonl`. It prints accuracy % [95% Wilson interval] with N per cell,
for a defense-aware row the attack's verdict beside the score and the % of inputs on which they agree, the attack's
seconds per row, and the worst case per input over the clean input and every row, on the inputs every row has
reached.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rmc.evaluation.stats import Rate


def _read(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()] if path.exists() else []


def _rate(records: list[dict]) -> Rate:
    return Rate(sum(r["pred"] == r["label"] for r in records), len(records))


def rows_of(folder: Path) -> dict[str, dict]:
    """{row name: {"static": records or None, "rmc": records, "source": str, "seconds": float, "attack": the
    attack's verdicts (defense-aware rows) or None}}."""
    rows = {}
    for d in sorted(p for p in folder.iterdir() if p.is_dir()):
        attack = _read(d / "attack.jsonl")
        if attack:
            rescored = _read(d / "rmc.jsonl")
            done = len(rescored) >= len(attack)
            rows[d.name] = {"static": None, "rmc": rescored if done else attack,
                            "source": "scored pass" if done else "attack's verdict", "attack": attack,
                            "seconds": sum(r.get("seconds", 0.0) for r in attack)}
        elif (d.name == "clean" or d.name.startswith("transfer-")) and (d / "baselines.json").exists():
            base = json.loads((d / "baselines.json").read_text())["undefended"]
            rmc = _read(d / "rmc.jsonl")
            rows[d.name] = {"static": base, "rmc": rmc, "source": "records", "attack": None,
                            "seconds": sum(r.get("seconds", 0.0) for r in rmc)}
    return rows


def agreement(row: dict) -> Rate | None:
    """Inputs on which the attack's verdict equals the scored pass, once the row is scored; None before."""
    if row["attack"] is None or row["source"] != "scored pass":
        return None
    scored = {r["index"]: r["pred"] for r in row["rmc"]}
    return Rate(sum(scored.get(a["index"]) == a["pred"] for a in row["attack"]), len(row["rmc"]))


def worst_case(rows: dict[str, dict]) -> tuple[Rate, Rate, int]:
    """Static and RMC worst case per input over every row, on the first n inputs all rows have reached."""
    n = min(len(r["rmc"]) for r in rows.values())
    hit = {"static": 0, "rmc": 0}
    for i in range(n):
        for side in hit:
            recs = [r[side][i] for r in rows.values() if r[side] is not None]
            hit[side] += all(x["pred"] == x["label"] for x in recs)
    return Rate(hit["static"], n), Rate(hit["rmc"], n), n


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path, help="results/<key>/<base> of a run with attack rows")
    folder = ap.parse_args(argv).folder
    if not folder.is_dir():
        raise SystemExit(f"error: {folder} is not a folder; give results/<key>/<base> of an `rmc run` directory")
    rows = rows_of(folder)
    if not rows:
        raise SystemExit(f"error: no attack rows under {folder}: has the run reached its attack-row stage?")
    print("| row | static | RMC | source | attack's verdict | verdict = score | attack s |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        static = f"{_rate(r['static'][:len(r['rmc'])] if r['static'] else [])} (N={len(r['rmc'])})" \
            if r["static"] is not None else "-"
        verdict = f"{_rate(r['attack'])} (N={len(r['attack'])})" if r["attack"] is not None else "-"
        agree = agreement(r)
        agree_text = f"{agree} (N={agree.n})" if agree is not None else "-"
        print(f"| {name} | {static} | {_rate(r['rmc'])} (N={len(r['rmc'])}) | {r['source']} | {verdict} | "
              f"{agree_text} | {r['seconds']:.0f} |")
    s, m, n = worst_case(rows)
    print(f"| worst case per input | {s} (N={n}) | {m} (N={n}) | every row above | | | |")


if __name__ == "__main__":
    main()
