"""What drives RMC's clean-accuracy loss?

Online RMC on the first N clean and N PGD-10 eps 0.1 (transfer) inputs of a finished `rmc run` directory, with one
knob at a time moved away from the run's own RMC settings: locality (K), learning rate x epochs, and whether Adam's
moments live for the whole stream or are fresh per fine-tuning. Each configuration is evaluated by the library's
`evaluate` into <out>/runs/<config>/ (records are written per input, so an interrupted study resumes), then
<out>/summary.json and <out>/clean_accuracy.png are written.

    python studies/clean_accuracy.py --run runs/default --out studies/clean_accuracy
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

from rmc.artifacts.dprime import open_dprime_store
from rmc.artifacts.evalsets import load_eval_sets
from rmc.artifacts.features import load_features, store_source
from rmc.cli.config import load_config, to_dict
from rmc.errors import RMCError
from rmc.evaluation.common import BaseModel
from rmc.evaluation.driver import evaluate
from rmc.evaluation.run_records import stage_folders
from rmc.evaluation.stats import Rate
from rmc.models import default_layer, load_checkpoint

SETS = {"clean": "clean", "pgd": "pgd10-eps0.1"}     # summary key -> evaluation set of the run
# Each configuration departs from the run's RMC settings in the knobs listed; "default" is shared by all groups.
CONFIGS = {
    "default": {},
    "k64": {"k": 64},
    "k1024": {"k": 1024},
    "lr3e-4": {"lr": 3e-4},
    "lr1e-4-ep10": {"lr": 1e-4, "max_epochs": 10},
    "per-input": {"optimizer": "per-input"},
    "k64-per-input": {"k": 64, "optimizer": "per-input"},
}
GROUPS = {   # knob -> (config, point label), in plotting order
    "locality (K, share of D')": [("k64", "K=64"), ("default", "K=256"), ("k1024", "K=1024")],
    "lr x max_epochs": [("default", "1e-3 x 3"), ("lr3e-4", "3e-4 x 3"), ("lr1e-4-ep10", "1e-4 x 10")],
    "Adam state": [("default", "stream"), ("per-input", "per-input"), ("k64-per-input", "per-input\nK=64")],
}
SHOWN = ("k", "lr", "max_epochs", "patience", "calib_k", "optimizer", "mode", "seed")


def need(path: Path, what: str) -> Path:
    if not path.exists():
        raise RMCError(f"{what} not found at {path}; run `rmc run` first (or pass --run <a finished run directory>)")
    return path


def load_run(run: Path):
    """The run's static model, D', D' features and the two evaluation sets, checked against each other."""
    if not run.is_dir():
        raise RMCError(f"run directory {run} not found; run `rmc run --out {run}` first")
    saved = yaml.safe_load(need(run / "config.yaml", "the run's configuration").read_text()) or {}
    where = stage_folders(run, "standard")
    model, info = load_checkpoint(need(where["model"], "the static model"))
    store = open_dprime_store(need(where["dprime"], "D'"))
    layer = (saved.get("model") or {}).get("layer") or default_layer(model)
    feats, _ = load_features(need(where["features"], "D' features"), info.sha256, layer, store_source(store))
    sets = load_eval_sets(need(where["evalsets"], "evaluation sets"), list(SETS.values()), info.sha256)
    return saved, info, store, BaseModel("standard", model, info.sha256, layer, feats.numpy()), sets


def rmc_config(saved: dict, overrides: dict, seed: int):
    """The run's own RMC settings (only its data/model/rmc sections: older runs have other sections), then the
    study's overrides. Going through load_config validates them exactly as `rmc run` does."""
    pairs = [(f"{s}.{k}", v) for s in ("data", "model", "rmc") for k, v in (saved.get(s) or {}).items()]
    cfg = load_config(preset="default", overrides=pairs + [(f"rmc.{k}", v) for k, v in overrides.items()]
                      + [("rmc.seed", seed)])
    if cfg.data.dataset == "digits":
        cfg.rmc.calib_flip = False   # as rmc run does: a flipped digit is another (or no) digit
    return cfg.rmc


def rate(records) -> dict:
    return Rate(sum(r["pred"] == r["label"] for r in records), len(records)).to_dict()


def versus_static(rmc, static) -> dict:
    """Paired with the static model on the same inputs (sharper than two CIs): inputs RMC got wrong that the
    static model got right (lost), and the other way round (gained)."""
    pairs = [(a["pred"] == a["label"], b["pred"] == b["label"]) for a, b in zip(rmc, static, strict=True)]
    return {"lost": sum(s and not r for r, s in pairs), "gained": sum(r and not s for r, s in pairs)}


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
    colours = ["tab:blue", "tab:orange", "tab:green"]
    d = summary["configs"]["default"]["settings"]
    refs = [("static", "static model", "black", "-"), ("deepnn", f"DeepNN (K={d['k']})", "tab:purple", "--"),
            ("webnn", f"WebNN (K={d['k']})", "tab:brown", ":")]
    for ax, (key, title) in zip(axes, [("clean", "clean inputs"), ("pgd", "PGD-10 eps 0.1 (transfer)")], strict=True):
        ticks, labels, x = [], [], 0
        for (group, points), colour in zip(GROUPS.items(), colours, strict=True):
            start = x
            for name, label in points:
                r = summary["configs"][name][key]
                v, (lo, hi) = 100 * r["value"], (100 * r["ci95"][0], 100 * r["ci95"][1])
                ax.errorbar(x, v, yerr=[[v - lo], [hi - v]], fmt="s" if name == "default" else "o", color=colour,
                            mfc="white" if name == "default" else colour, capsize=4, ms=7)
                ax.annotate(f"{v:.0f}", (x, v), xytext=(7, 0), textcoords="offset points", va="center", fontsize=8)
                if group.startswith("locality"):
                    label += f"\n{100 * summary['configs'][name]['settings']['k'] / summary['dprime_size']:.2g}%"
                ticks.append(x), labels.append(label)
                x += 1
            ax.text((start + x - 1) / 2, -0.2, group, transform=ax.get_xaxis_transform(), ha="center",
                    color=colour, fontweight="bold")
            x += 0.8   # a gap between knobs
        for ref, label, colour, style in refs:
            r = {k: 100 * summary["reference"][ref][k]["value"] for k in SETS}
            ax.axhline(r[key], color=colour, ls=style, lw=1.2,
                       label=f"{label}: clean {r['clean']:.0f}%, PGD {r['pgd']:.0f}%")
        if key == "clean":   # what the paper claims RMC costs on clean inputs
            ax.axhline(100 * summary["reference"]["static"]["clean"]["value"] - 1, color="grey", lw=4, alpha=0.25,
                       label="static - 1 point (the paper's claim)")
        ax.set_xticks(ticks, labels, fontsize=8)
        ax.set_ylabel("RMC accuracy (%), 95% Wilson CI")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=2, frameon=False)
    lr = f"{d['lr']:.0e}".replace("e-0", "e-")   # 1e-3, as the tick labels write it
    fig.suptitle(f"Online RMC, one knob at a time from K={d['k']}, lr {lr} x {d['max_epochs']} epochs, "
                 f"{d['optimizer']} Adam (open squares): N={summary['n']} per set, |D'|={summary['dprime_size']:,}")
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default="runs/default", help="a finished `rmc run` directory")
    p.add_argument("--out", default="studies/clean_accuracy")
    p.add_argument("--n", type=int, default=100, help="first N inputs of each evaluation set")
    p.add_argument("--seed", type=int, default=0, help="RMC's seed (splits, batch order, calibration samples)")
    p.add_argument("--threads", type=int, default=1, help="torch threads; 1 is kind to a shared machine and, for "
                   "RMC's small batches, rarely slower")
    args = p.parse_args()
    if args.n < 1 or args.threads < 1:
        p.error("--n and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    run, out = Path(args.run), Path(args.out)
    try:
        saved, info, store, base, sets = load_run(run)
        dprime = store.dprime()
        summary = {"run": str(run), "n": args.n, "seed": args.seed, "threads": args.threads,
                   "dprime_size": len(dprime), "sets": SETS, "configs": {}}
        t_all = time.perf_counter()
        for name, overrides in CONFIGS.items():
            cfg = rmc_config(saved, overrides, args.seed)
            print(f"[{name}] {overrides or 'the run settings'} ...", flush=True)
            t0 = time.perf_counter()
            res = evaluate([base], dprime, sets, cfg, out / "runs" / name, info.num_classes, n=args.n)["standard"]
            wall = time.perf_counter() - t0
            rmc = {k: res[s]["rmc"] for k, s in SETS.items()}
            # seconds: RMC's per-input time summed from the records (survives resumes); wall: this invocation only
            seconds = sum(r["seconds"] for recs in rmc.values() for r in recs)
            settings = to_dict(cfg)
            paired = versus_static(rmc["clean"], res[SETS["clean"]]["undefended"])
            summary["configs"][name] = {"overrides": overrides, "settings": {k: settings[k] for k in SHOWN},
                                        **{k: rate(v) for k, v in rmc.items()}, "clean_vs_static": paired,
                                        "seconds": round(seconds, 1),
                                        "wall_seconds_this_invocation": round(wall, 1)}
            acc = "  ".join(f"{k} {100 * rate(v)['value']:.0f}%" for k, v in rmc.items())
            print(f"[{name}] {acc}; clean vs static: {paired['lost']} lost, {paired['gained']} gained  "
                  f"(RMC {seconds:.0f} s, wall {wall:.0f} s)", flush=True)
            if name == "default":   # the K=256 baselines are the figure's reference lines
                summary["reference"] = {d: {k: rate(res[s][d]) for k, s in SETS.items()}
                                        for d in ("undefended", "deepnn", "webnn")}
                summary["reference"]["static"] = summary["reference"].pop("undefended")
        summary["seconds"] = round(sum(c["seconds"] for c in summary["configs"].values()), 1)
        summary["wall_seconds_this_invocation"] = round(time.perf_counter() - t_all, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        plot(summary, out / "clean_accuracy.png")
    except RMCError as e:
        raise SystemExit(f"error: {e}") from None
    except KeyboardInterrupt:   # every finished input is on disk
        raise SystemExit(f"interrupted; the same command resumes from the records under {out / 'runs'}") from None
    print(f"wrote {out / 'summary.json'} and {out / 'clean_accuracy.png'} "
          f"({summary['wall_seconds_this_invocation']:.0f} s)")


if __name__ == "__main__":
    main()
