"""Accuracy of RMC against the round number of the defense-aware attacks: how fast they win.

Drawn from the per-input records the attacks write (`attack.jsonl`: `round_preds`, RMC's prediction of each
round's candidate in the attacker's trial). After round r an input counts as correct if no round 1..r fooled RMC.
For `chen2022` those trials run on the attacker's own RMC copy under its own random keys, so the curve is the
attacker's view; the point at the right is the scored pass (a separate RMC pass over the chosen inputs), what the
table shows.

    python -m rmc.evaluation.rounds_figure OUT.png NAME=RESULTS_DIR [NAME=RESULTS_DIR ...]

draws one panel per base model from `rmc evaluate` results folders (`<out>/results/<base>`).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from rmc.attacks.protocols import KINDS, LABELS
from rmc.errors import RMCError
from rmc.evaluation.records import read_records
from rmc.io import atomic_path


def accuracy_by_round(attack_records: list[dict], rounds: int) -> list[float]:
    """Fraction of inputs no round 1..r fooled, for r = 1..rounds (an input stops at the round that fools it)."""
    if not attack_records:
        raise RMCError("no attack records to draw; run the defense-aware rows first")
    out = []
    for r in range(1, rounds + 1):
        ok = [all(p == rec["label"] for p in rec["round_preds"][:r]) for rec in attack_records]
        out.append(float(np.mean(ok)))
    return out


def save_rounds_figure(panels: dict[str, dict[str, tuple[list[dict], list[dict]]]], rounds: int,
                       path: str | Path) -> Path:
    """panels: base name -> {row label: (attack records, scored RMC records)}; one PNG, one panel per base."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False, sharey=True)
    xs = np.arange(1, rounds + 1)
    for ax, (base, curves) in zip(axes[0], panels.items(), strict=True):
        for i, (label, (attack, rescored)) in enumerate(sorted(curves.items())):
            style = "-" if "[chen2022]" in label else "--"
            line, = ax.plot(xs, 100 * np.array(accuracy_by_round(attack, rounds)), style, marker="o", ms=3,
                            label=label, color=f"C{i // 2 if len(curves) > 1 else 0}")
            final = 100 * np.mean([r["pred"] == r["label"] for r in rescored])
            ax.plot([rounds + 1], [final], marker="*", ms=10, color=line.get_color(), ls="none")
        ax.set_xticks(list(xs) + [rounds + 1], [str(x) for x in xs] + ["scored\npass"])
        ax.set_xlabel("round")
        ax.set_title(f"{base} (N = {len(attack)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[0][0].set_ylabel("RMC accuracy % (attacker's trials; star: scored pass)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def load_panel(results_dir: str | Path) -> tuple[dict[str, tuple[list[dict], list[dict]]], int]:
    """The defense-aware rows of one base's results folder: {label: (attack records, re-scored records)}, rounds."""
    results_dir = Path(results_dir)
    curves, rounds = {}, 0
    for stream in sorted(results_dir.glob("*/attack.jsonl")):
        attack = read_records(stream)
        rescored_path = stream.parent / "rmc.jsonl"
        if not attack or not rescored_path.exists():
            continue
        name = stream.parent.name              # e.g. gmsa-min-chen2022-r10-pgd40-eps0.1 (attack_rows.set_names)
        kind = next((k for k in KINDS if name.startswith(k + "-")), None)
        found = re.search(r"-r(\d+)-", name)
        if kind is None or found is None:
            continue
        rounds = max(rounds, int(found.group(1)))
        rescored = read_records(rescored_path)
        if not rescored:
            continue
        # the attack may have run ahead of the re-score (a run resumed with a smaller N): the same first inputs
        curves[f"{LABELS[kind]} [{attack[0].get('protocol', '?')}]"] = (attack[:len(rescored)], rescored)
    if not curves:
        raise RMCError(f"no finished defense-aware rows (attack.jsonl + rmc.jsonl) under {results_dir}")
    return curves, rounds


def main(argv: list[str]) -> int:
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise RMCError("usage: python -m rmc.evaluation.rounds_figure OUT.png NAME=RESULTS_DIR [...]")
    panels, rounds = {}, 0
    for arg in argv[1:]:
        name, folder = arg.split("=", 1)
        panels[name], r = load_panel(folder)
        rounds = max(rounds, r)
    print(save_rounds_figure(panels, rounds, argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
