"""How each of the original's quirks moves the reproduction's columns, one at a time, at the default preset's scale.

The paper preset follows the original where it departs from common practice (evaluation PGD with a fixed step of
eps/16, D' PGD with cross-entropy on the softmax output, unclipped iterates, random shifts, Keras' Adam epsilon);
the default preset uses the corrected variants. This study runs the reproduction's columns (clean; targeted PGD-10
at 0.05; PGD-10 and targeted PGD-10 / PGD-100 at 0.1) on the default preset with the corrected variants, then with
each quirk switched on alone, then with all of them, and with the previous feature layer (block3) for the layer
change. Every variant runs in one `rmc run` folder, so the model (and D' where the variant keeps it) is shared; the
same seeded test inputs are used throughout, so differences are paired.

    python studies/quirks.py /work/runs/quirks            # runs what is missing (resumable), then the table
    python studies/quirks.py /work/runs/quirks --table    # the table from what has finished
    python studies/quirks.py /work/runs/quirks-b --variants dprime-loss dprime-noclip dprime-shift all-quirks
                                                          # a second process on another core, in its own folder

The variants that rebuild D' are listed last, so two processes split them well as above: `rmc run` locks its
folder, and each folder trains the same seeded model.

Results (results.json of each variant, with each row's per-input correctness added) are copied to
studies/quirks/<variant>.json; the table, each change paired input by input against `corrected`, to
studies/quirks/table.md.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "quirks"
# The reproduction's columns at the default preset's RMC settings (K 256, lr 1e-3, 3 epochs), 100 inputs.
BASE = ["attack.pgd=[[10, 0.05], [10, 0.1], [100, 0.1]]", "attack.untargeted=[[10, 0.1]]", "attack.n=100"]
# In the order they run: the variants that keep the corrected D' first, then those that rebuild it.
QUIRKS = {
    "eval-step": ["attack.pgd_step_size=0.00625"],   # the original's 1/255 at 16/255: eps/16 of the large eps
    "adam-eps": ["rmc.adam_eps=1e-7"],
    "dprime-loss": ["augment.loss=softmax_output"],
    "dprime-noclip": ["augment.clip=false"],
    "dprime-shift": ["augment.crop_shift=2"],
}
VARIANTS = {"corrected": [], "layer-block3": ["model.layer=block3"], **QUIRKS,
            "all-quirks": [s for v in QUIRKS.values() for s in v]}


STEP = "-step0.00625"   # the eval-step variant's column suffix, stripped so that its columns pair with the others'
ROWS = ("None", "WebNN", "RMC")   # the rows a quirk can move (DeepNN's votes depend only on the layer)


def _per_input(results: Path) -> dict[str, dict[str, str]]:
    """row -> column -> one character per test input in index order, "1" where it was classified right: every
    variant attacks the same seeded inputs, so changes pair input by input."""
    out: dict[str, dict[str, str]] = {row: {} for row in ROWS}
    for col in sorted(p for p in results.iterdir() if p.is_dir()):
        rmc = [json.loads(line) for line in (col / "rmc.jsonl").read_text().splitlines() if line.strip()]
        base = json.loads((col / "baselines.json").read_text())
        for row, recs in (("RMC", rmc), ("WebNN", base["webnn"]), ("None", base["undefended"])):
            recs = sorted(recs, key=lambda r: r["index"])
            out[row][col.name.replace(STEP, "")] = "".join("1" if r["pred"] == r["label"] else "0" for r in recs)
    return out


def _add_per_input(saved: Path, out: Path) -> None:
    """Add to the saved results their per-input correctness, read from the variant's results folder if it is in the
    run folder `out` (the saved file names it; a path elsewhere, or a folder gone, is not read)."""
    data = json.loads(saved.read_text())
    results = Path(data["stage_dirs"]["standard"]["results"]).resolve()
    if "per_input" in data or not results.is_relative_to(out.resolve()) or not results.is_dir():
        return
    data["per_input"] = _per_input(results)
    tmp = saved.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(saved)


def run_variant(out: Path, name: str) -> None:
    saved = HERE / f"{name}.json"
    if saved.exists():
        _add_per_input(saved, out)
        return
    cmd = ["rmc", "--threads", "1", "run", "--out", str(out), "--no-attack-rows"]
    for s in BASE + VARIANTS[name]:
        cmd += ["--set", s]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    HERE.mkdir(exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    shutil.copyfile(out / "results.json", tmp)
    tmp.replace(saved)
    _add_per_input(saved, out)


def _cells(results: dict, row: str) -> dict[str, tuple[float, int]]:
    """column -> (accuracy %, N) of one row of a run's table, the column names stripped of the step suffix."""
    table = results["table"]
    return {col.replace(STEP, ""): (100 * cell["accuracy"]["value"], cell["accuracy"]["n"])
            for col, cell in table["rows"][row].items()}


def mcnemar(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value of `gained` against `lost` discordant inputs (a sign test)."""
    n = gained + lost
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(gained, lost) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _paired(variant: dict, corrected: dict, row: str, col: str) -> str:
    """"; +g/-l" (inputs gained / lost against `corrected`, * where McNemar's p < 0.05), or "" without records."""
    a = corrected.get("per_input", {}).get(row, {}).get(col)
    b = variant.get("per_input", {}).get(row, {}).get(col)
    if a is None or b is None or len(a) != len(b):
        return ""
    gained = sum(x == "0" and y == "1" for x, y in zip(a, b, strict=True))
    lost = sum(x == "1" and y == "0" for x, y in zip(a, b, strict=True))
    return f"; +{gained}/-{lost}{'*' if mcnemar(gained, lost) < 0.05 else ''}"


def table(done: dict[str, dict]) -> str:
    """One Markdown table per row: every variant's accuracy, and its change from the corrected variant, paired
    input by input."""
    out = []
    for row in ROWS:
        cells = {variant: _cells(res, row) for variant, res in done.items()}
        names = list(next(iter(cells.values()))) if cells else []
        base = cells.get("corrected", {})
        out += [f"**{row}** (accuracy %; change from `corrected` in points; +g/-l: test inputs gained / lost, * "
                f"where an exact McNemar test gives p < 0.05; N = "
                f"{', '.join(sorted({str(n) for c in cells.values() for _, n in c.values()}))})", "",
                "| variant | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for variant, c in cells.items():
            shown = []
            for n in names:
                acc = c.get(n, (math.nan, 0))[0]
                delta = ""
                if variant != "corrected" and n in base:
                    delta = f" ({acc - base[n][0]:+.0f}{_paired(done[variant], done['corrected'], row, n)})"
                shown.append(f"{acc:.0f}{delta}")
            out.append(f"| {variant} | " + " | ".join(shown) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the rmc run folder shared by every variant")
    ap.add_argument("--table", action="store_true", help="only tabulate the variants already finished")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="run only these (default: all); the table shows every finished one")
    args = ap.parse_args(argv)
    if not args.table:
        for name in args.variants:
            run_variant(args.out, name)
    done = {name: json.loads((HERE / f"{name}.json").read_text()) for name in VARIANTS
            if (HERE / f"{name}.json").exists()}
    text = table(done)
    print(text)
    HERE.mkdir(exist_ok=True)
    (HERE / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
