"""The results table of a run directory from its per-input records, finished or not (for the reproduction run at the
paper's settings, which takes longer than one session): baselines over every input, RMC over the inputs done so far.

    python studies/reproduction_table.py runs/paper [--bases standard adversarial denoising]

Reads only `results/<key>/<base>/<set>/baselines.json` and `rmc.jsonl` (what `rmc run` writes as it goes); prints the
table in markdown with N per cell, in the original's row order, the mean seconds per RMC input, and per set the static
model and RMC scored on the same inputs (RMC's cells cover fewer inputs than the static row's while the run goes on,
so the paired counts are the fair comparison). Bases without records yet are left out (and named).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rmc.errors import RMCError
from rmc.evaluation.driver import BASELINES
from rmc.evaluation.report import Table
from rmc.evaluation.run_records import stage_folders


def read_records(run: Path, base: str) -> tuple[dict, list[float]]:
    """{base: {set: {defense: records}}} and the seconds of every RMC input, from the run's results folder."""
    try:
        folder = stage_folders(run, base).get("results")
    except RMCError:
        folder = None
    if folder is None or not folder.is_dir():
        return {}, []
    results, seconds = {base: {}}, []
    for set_dir in sorted(p for p in folder.iterdir() if (p / "baselines.json").exists()):
        saved = json.loads((set_dir / "baselines.json").read_text())
        defenses = {name: saved[name] for name in BASELINES}          # the report's row order
        stream = set_dir / "rmc.jsonl"
        if stream.exists():
            rmc = [json.loads(line) for line in stream.read_text().splitlines() if line.strip()]
            defenses["rmc"] = rmc
            seconds += [r["seconds"] for r in rmc]
        results[base][set_dir.name] = defenses
    return results, seconds


def paired_counts(results: dict) -> list[str]:
    """Per base and set: static and RMC correct on the inputs RMC has done, and how many RMC lost and gained."""
    lines = []
    for base, sets in results.items():
        for name, defenses in sets.items():
            rmc = defenses.get("rmc", [])
            if not rmc:
                continue
            static = {r["index"]: r["pred"] == r["label"] for r in defenses["undefended"]}
            pairs = [(static[r["index"]], r["pred"] == r["label"]) for r in rmc]
            lost = sum(s and not d for s, d in pairs)
            gained = sum(d and not s for s, d in pairs)
            lines.append(f"{base} {name}: static {sum(s for s, _ in pairs)} / RMC {sum(d for _, d in pairs)} "
                         f"correct of the same {len(pairs)} (RMC lost {lost}, gained {gained})")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--bases", nargs="+", default=["standard", "adversarial", "denoising"])
    args = p.parse_args()
    results, seconds = {}, []
    for base in args.bases:
        res, sec = read_records(args.run, base)
        results.update(res)
        seconds += sec
    if not results:
        raise SystemExit(f"no results under {args.run}: is it a run directory of `rmc run` that reached its "
                         "evaluate stage?")
    missing = [b for b in args.bases if b not in results]
    table = Table.from_results(results)
    lines = ["| defense | " + " | ".join(table.columns) + " |", "|---|" + "---|" * len(table.columns)]
    for label, cells in table.rows.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{cells[c].text()} (N={cells[c].accuracy.n})" if c in cells and cells[c].accuracy.n else "- (N=0)"
            for c in table.columns) + " |")
    print("\n".join(lines))
    if missing:
        print(f"\nNo records yet of: {', '.join(missing)}")
    if seconds:
        print(f"\nRMC: {len(seconds)} inputs, {sum(seconds) / len(seconds):.1f} s per input on average")
        print("\n".join(["", "Static model and RMC on the same inputs:"] + paired_counts(results)))


if __name__ == "__main__":
    main()
