"""A PNG grid of test inputs (clean and adversarial) beside their nearest neighbours in D', with labels,
which copy each neighbour came from (clean or PGD-k) and its feature distance: what the original's notebook
showed, so one can see what RMC fine-tunes on."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")   # files only; no screen on these machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from rmc.defense.core import DPrime  # noqa: E402
from rmc.evaluation.common import NeighbourSearch  # noqa: E402
from rmc.io import atomic_path  # noqa: E402
from rmc.models import extract_features  # noqa: E402


def _show(ax, img: torch.Tensor, title: str, color: str = "black") -> None:
    img = img.float()
    img = img / 255 if img.max() > 1 else img
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_title(title, fontsize=6, color=color)
    ax.axis("off")


def neighbour_grid(base, dprime: DPrime, eval_sets: Sequence, path: str | Path, cfg, class_names: Sequence[str] = (),
                   max_sets: int = 2) -> Path:
    """Draw `cfg.inputs` inputs of the first `max_sets` sets (clean first) and `cfg.neighbours` neighbours each."""
    name = lambda c: class_names[c] if c < len(class_names) else str(c)  # noqa: E731
    sets = list(eval_sets)[:max_sets]
    rows = [(s, i) for s in sets for i in range(min(cfg.inputs, len(s)))]
    index = NeighbourSearch.of(base, dprime).all
    fig, axes = plt.subplots(len(rows), cfg.neighbours + 1, figsize=(1.1 * (cfg.neighbours + 1), 1.25 * len(rows)),
                             squeeze=False)
    for r, (s, i) in enumerate(rows):
        x = s.images[i:i + 1]
        q = extract_features(base.model, base.layer, x).numpy()
        dist, nb = index.search(q, cfg.neighbours)
        with torch.no_grad():
            pred = int(base.model(x).argmax(1))
        truth = int(s.labels[i])
        _show(axes[r, 0], x[0], f"{s.name}\ntrue {name(truth)}\nstatic: {name(pred)}",
              "black" if pred == truth else "red")
        imgs, labels = dprime.gather(nb[0])
        for j in range(cfg.neighbours):
            lab = int(labels[j])
            copy = dprime.copy_names[int(dprime.copy[int(nb[0, j])])]
            _show(axes[r, j + 1], imgs[j], f"{name(lab)}\n{copy} d={dist[0, j]:.2f}",
                  "black" if lab == truth else "red")
    fig.suptitle("Test inputs (left) and their nearest neighbours in D' (static-model features); red = wrong class",
                 fontsize=7)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
