"""The figures of `rmc report`, drawn with matplotlib from rmc.evaluation.figure_data (never from the defense).

Each `draw_*` returns a matplotlib Figure (tests read the plotted data back from its axes); `save_png` writes one
atomically and returns its bytes for embedding.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only; no screen on these machines
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.ticker import MaxNLocator

from rmc.defense.registry import DEFENSES, RMC
from rmc.evaluation.figure_data import PURITY_BINS, Anatomy, CurveSeries, DriftSeries, PurityGroup
from rmc.evaluation.report import BASE_LABELS, row_label
from rmc.io import atomic_path

DPI = 100                                        # PNGs stay small enough to embed several in one page
DEFENSE_COLORS = {d.name: d.colour for d in DEFENSES}
THREAT_STYLES = {"transfer": "-", "defense-aware": "--"}
MARKERS = "osD^v<>ph*"                           # one per attack family within a panel
BAND_ALPHA = 0.12                                # 95% interval bands: visible, not hiding the lines
MAX_LEGEND = 16                                  # drift lines named in a legend at most (sharded runs have many)
PANEL_COLUMNS = 2                                # panels per row (a run may have several base models)
GROUP_COLORS = {"clean": "tab:blue", "transfer": "tab:orange", "defense-aware": "tab:red"}


def save_png(fig, path: str | Path) -> bytes:
    """Write `fig` as a PNG at `path` (atomically) and return the bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return data


def _panels(n: int, width: float = 5.2, height: float = 3.6):
    """`n` panels, at most PANEL_COLUMNS a row; the unused ones are hidden."""
    cols = min(n, PANEL_COLUMNS)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


# ---------------------------------------------------------------- robustness curve

def draw_curve(series: list[CurveSeries]):
    """One panel per (base model, untargeted / targeted): accuracy against eps, a line per (defense, attack), solid for
    transfer and dashed for defense-aware attacks, 95% Wilson intervals as bands."""
    keys = list(dict.fromkeys((s.base, s.targeted) for s in series))
    fig, axes = _panels(max(1, len(keys)), height=5.4)
    if not keys:
        axes[0].text(0.5, 0.5, "no attacked set with a known eps", ha="center", va="center")
    for ax, key in zip(axes, keys, strict=False):
        mine = [s for s in series if (s.base, s.targeted) == key]
        families = list(dict.fromkeys(s.family for s in mine))
        for s in mine:
            eps = [p.eps for p in s.points]
            acc = [100 * p.rate.value for p in s.points]
            lo, hi = zip(*[p.rate.interval() for p in s.points], strict=True)
            color = DEFENSE_COLORS.get(s.defense, "black")
            ax.plot(eps, acc, THREAT_STYLES[s.threat], color=color,
                    marker=MARKERS[families.index(s.family) % len(MARKERS)], label=f"{s.label} [{s.threat}]",
                    gid=s.label)
            ax.fill_between(eps, [100 * v for v in lo], [100 * v for v in hi], color=color, alpha=BAND_ALPHA, lw=0)
        base, targeted = key
        ax.set_title(f"{BASE_LABELS.get(base, base.capitalize())} base model, "
                     f"{'targeted' if targeted else 'untargeted'} attacks",
                     fontsize=9)
        ax.set_xlabel("eps (L-inf, [0, 1] pixels)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.suptitle("Robustness curve: solid = transfer (crafted on the static model), dashed = defense-aware; "
                 "bands: 95% Wilson intervals", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.98))   # leave the suptitle its own strip
    return fig


# ---------------------------------------------------------------- online drift

def draw_drift(series: list[DriftSeries]):
    """Top: RMC's running accuracy along each stream; bottom: L2 distance of the adapted weights from the static
    ones after each input (if recorded)."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.6), sharex=True)
    for s in series:
        name = f"{s.base}/{s.set_name}" + ("" if s.stream is None else f" stream {s.stream}")
        x = np.arange(1, len(s.correct) + 1)
        style = "-" if s.set_name == "clean" else ":"
        top.plot(x, [100 * a for a in s.running_accuracy], style, lw=1.4 if style == "-" else 1, label=name, gid=name)
        if s.has_drift:
            bottom.plot(x, [np.nan if d is None else d for d in s.drift], style, lw=1.4 if style == "-" else 1,
                        label=name, gid=name)
    top.set_ylabel("running accuracy %")
    top.set_ylim(-3, 103)
    top.grid(alpha=0.3)
    if len(series) <= MAX_LEGEND:
        top.legend(fontsize=6, ncol=2)
    bottom.set_ylabel("||w - w_static||_2")
    bottom.set_xlabel("position in the stream")
    bottom.grid(alpha=0.3)
    if not any(s.has_drift for s in series):
        bottom.text(0.5, 0.5, "weight drift not recorded by this run (older records)", ha="center", va="center",
                    transform=bottom.transAxes)
    fig.suptitle("Online RMC along the test stream (clean set solid, attacked sets dotted)", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- per-input anatomy

def _show_image(ax, img: torch.Tensor | None) -> None:
    ax.axis("off")
    if img is None:
        ax.text(0.5, 0.5, "image\nunavailable", ha="center", va="center", fontsize=7)
        return
    img = img.float()
    img = img / 255 if img.max() > 1 else img
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).clamp(0, 1).numpy())


def histogram_arrays(a: Anatomy, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Shares of the K neighbours per class: (clean copy, adversarial copies)."""
    k = a.neighbours.get("k") or 1
    clean, adv = np.zeros(classes), np.zeros(classes)
    for side, arr in (("clean", clean), ("adv", adv)):
        for c, n in a.neighbours.get(side, {}).items():
            if int(c) < classes:
                arr[int(c)] = n / k
    return clean, adv


def draw_anatomy(items: list[Anatomy], images: list[torch.Tensor | None], class_name) -> object:
    """One row per input: the image; its neighbours' label shares (clean / adversarial copies stacked); the static
    and adapted predictions with confidences; the adaptation's training loss per epoch."""
    rows = max(1, len(items))
    fig, axes = plt.subplots(rows, 4, figsize=(12, 1.9 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [0.7, 2.2, 1.6, 1.6]})
    if not items:
        axes[0, 1].text(0.5, 0.5, "no record carries the per-input fields", ha="center", va="center")
    classes = max([10] + [int(c) + 1 for a in items for side in ("clean", "adv") for c in a.neighbours.get(side, {})]
                  + [a.label + 1 for a in items])
    for r, (a, img) in enumerate(zip(items, images, strict=True)):
        ax_img, ax_hist, ax_pred, ax_loss = axes[r]
        _show_image(ax_img, img)
        ax_img.set_title(f"{a.set_name} #{a.index}\ntrue {class_name(a.label)}", fontsize=7,
                         color="black" if a.correct else "red")
        clean, adv = histogram_arrays(a, classes)
        x = np.arange(classes)
        ax_hist.bar(x, clean, color="tab:blue", label="clean copy", gid="clean")
        ax_hist.bar(x, adv, bottom=clean, color="tab:orange", label="adversarial copies", gid="adv")
        ax_hist.axvline(a.label, color="black", lw=0.8, ls=":")
        ax_hist.set_xticks(x)
        ax_hist.set_xticklabels([class_name(c)[:6] for c in x], fontsize=5, rotation=45)
        ax_hist.set_ylim(0, 1)
        ax_hist.tick_params(labelsize=6)
        ax_hist.set_title(f"labels of the K={a.neighbours.get('k')} neighbours (dotted: true class)", fontsize=7)
        if r == 0:
            ax_hist.legend(fontsize=6)
        preds = [("static", a.static_pred, a.static_conf), ("RMC", a.rmc_pred, a.rmc_conf)]
        ax_pred.barh([0, 1], [c or 0 for _, _, c in preds],
                     color=["tab:gray" if p == a.label else "tab:red" for _, p, _ in preds])
        for y, (who, p, c) in enumerate(preds):
            text = "-" if p is None else f"{who}: {class_name(p)}" + ("" if c is None else f" ({100 * c:.0f}%)")
            ax_pred.text(0.02, y, text, va="center", fontsize=7)
        ax_pred.set_xlim(0, 1)
        ax_pred.set_yticks([])
        ax_pred.tick_params(labelsize=6)
        ax_pred.set_title("prediction, confidence (red: wrong)", fontsize=7)
        if a.adapt_loss:
            ax_loss.plot(range(1, len(a.adapt_loss) + 1), a.adapt_loss, "o-", ms=3, gid="adapt_loss")
            ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))   # epochs are whole
        else:
            ax_loss.text(0.5, 0.5, "not recorded", ha="center", va="center", fontsize=7)
        ax_loss.set_title("adaptation: training loss per epoch", fontsize=7)
        ax_loss.tick_params(labelsize=6)
    fig.suptitle("Per-input anatomy: inputs RMC gets right (black) and wrong (red)", fontsize=9)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- neighbour purity

def draw_purity(groups: list[PurityGroup]):
    """RMC's accuracy per bin of neighbour purity (share of the K neighbours with the input's true class), with
    95% intervals, one panel per base model; bar labels give the number of inputs per bin."""
    bases = list(dict.fromkeys(g.base for g in groups))
    fig, axes = _panels(max(1, len(bases)), 6.4, 4.0)
    if not groups:
        axes[0].text(0.5, 0.5, "neighbour labels not recorded by this run (older records)", ha="center",
                     va="center", fontsize=8)
    edges = PurityGroup.edges()
    centres = [(edges[i] + edges[i + 1]) / 2 for i in range(PURITY_BINS)]
    for ax, base in zip(axes, bases, strict=False):
        for j, g in enumerate(x for x in groups if x.base == base):
            shift = (j - 1) * 0.02     # side by side where groups share a bin
            pts = [(c + shift, r) for c, r in zip(centres, g.rates, strict=True) if r.n]
            xs = [p[0] for p in pts]
            ys = [100 * p[1].value for p in pts]
            lo = [100 * (p[1].value - p[1].interval()[0]) for p in pts]
            hi = [100 * (p[1].interval()[1] - p[1].value) for p in pts]
            color = GROUP_COLORS.get(g.group, "black")
            ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", color=color, capsize=2, label=f"{g.group} sets", gid=g.group)
            for x, (_, r) in zip(xs, pts, strict=True):
                ax.annotate(f"n={r.n}", (x, 100 * r.value), fontsize=5, xytext=(2, 3), textcoords="offset points")
        ax.set_xlim(0, 1)
        ax.set_ylim(-3, 103)
        ax.set_xticks(edges)
        ax.set_xlabel("neighbour purity (share of K neighbours with the true label)")
        ax.set_ylabel("RMC accuracy %")
        ax.set_title(f"{row_label(base, RMC)}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Neighbour purity vs correctness (is RMC right where its neighbours carry the true label?)",
                 fontsize=8)
    fig.tight_layout()
    return fig


__all__ = ["DEFENSE_COLORS", "draw_anatomy", "draw_curve", "draw_drift", "draw_purity", "histogram_arrays",
           "save_png"]
