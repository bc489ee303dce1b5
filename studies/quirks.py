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

Results (results.json of each variant) are copied to studies/quirks/<variant>.json; the table to
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


def run_variant(out: Path, name: str) -> dict:
    saved = HERE / f"{name}.json"
    if saved.exists():
        return json.loads(saved.read_text())
    cmd = ["rmc", "--threads", "1", "run", "--out", str(out), "--no-attack-rows"]
    for s in BASE + VARIANTS[name]:
        cmd += ["--set", s]
    print(f"[{name}] {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)
    HERE.mkdir(exist_ok=True)
    tmp = saved.with_suffix(".tmp")
    shutil.copyfile(out / "results.json", tmp)
    tmp.replace(saved)
    return json.loads(saved.read_text())


ROWS = ("None", "WebNN", "RMC")   # the rows a quirk can move (DeepNN's votes depend only on the layer)


def _cells(results: dict, row: str) -> dict[str, tuple[float, int]]:
    """column -> (accuracy %, N) of one row of a run's table, the column names stripped of the step suffix."""
    table = results["table"]
    return {col.replace("-step0.00625", ""): (100 * cell["accuracy"]["value"], cell["accuracy"]["n"])
            for col, cell in table["rows"][row].items()}


def table(done: dict[str, dict]) -> str:
    """One Markdown table per row: every variant's accuracy, and its change from the corrected variant."""
    out = []
    for row in ROWS:
        cells = {variant: _cells(res, row) for variant, res in done.items()}
        names = list(next(iter(cells.values()))) if cells else []
        base = cells.get("corrected", {})
        out += [f"**{row}** (accuracy %, change from `corrected` in points; N = "
                f"{', '.join(sorted({str(n) for c in cells.values() for _, n in c.values()}))})", "",
                "| variant | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for variant, c in cells.items():
            shown = []
            for n in names:
                acc = c.get(n, (math.nan, 0))[0]
                delta = f" ({acc - base[n][0]:+.0f})" if variant != "corrected" and n in base else ""
                shown.append(f"{acc:.0f}{delta}")
            out.append(f"| {variant} | " + " | ".join(shown) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the rmc run folder shared by every variant")
    ap.add_argument("--table", action="store_true", help="only tabulate the variants already finished")
    args = ap.parse_args(argv)
    done = {}
    for name in VARIANTS:
        if args.table and not (HERE / f"{name}.json").exists():
            continue
        done[name] = run_variant(args.out, name)
    text = table(done)
    print(text)
    HERE.mkdir(exist_ok=True)
    (HERE / "table.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
