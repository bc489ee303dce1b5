from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rmc.config import load_config, parse_override, to_dict
from rmc.core import Bank
from rmc.evalsets import load_eval_sets
from rmc.evaluation.report import Table
from rmc.evaluation.runner import BaseModel, evaluate
from rmc.featurestore import load_features, store_source
from rmc.io import write_json, write_text
from rmc.models import default_layer, load_checkpoint
from rmc.pipeline import ensure_features
from rmc.store import open_store


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="static base model (.safetensors from `rmc train`)")
    p.add_argument("--name", default="standard", help="base-model name for the rows: standard | adversarial | any")
    p.add_argument("--store", required=True, help="augmented dataset D' (`rmc augment`)")
    p.add_argument("--evalsets", required=True, help="evaluation sets (`rmc attack`)")
    p.add_argument("--sets", nargs="+", help="only these evaluation sets (default: all)")
    p.add_argument("--features", help="D' features of this model (`rmc features`); default: computed and cached in --out")
    p.add_argument("--layer", help="feature layer (default: the model's)")
    p.add_argument("--out", required=True, help="results directory (re-run the same command to resume)")
    p.add_argument("--config", help="YAML configuration; its rmc section sets the RMC hyperparameters")
    p.add_argument("--preset", default="default", choices=["default", "paper"], help="RMC defaults to start from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. --set rmc.k=256")
    p.add_argument("--n", type=int, help="evaluate only the first N inputs of each set")
    p.add_argument("--mode", choices=["online", "episodic"], help="RMC mode")
    p.add_argument("--no-rmc", action="store_true", help="baselines only (fast)")


def main(args) -> int:
    overrides = [parse_override(s) for s in args.set] + ([("rmc.mode", args.mode)] if args.mode else [])
    cfg = load_config(args.config, args.preset, overrides)
    store = open_store(args.store)
    model, info = load_checkpoint(args.model)
    sets = load_eval_sets(args.evalsets, args.sets)
    layer = args.layer or default_layer(model)
    out = Path(args.out)
    if args.features:
        feats = load_features(args.features, info.sha256, layer, store_source(store))[0].numpy()
    else:
        feats = ensure_features(model, info, layer, store, out / f"features-{args.name}.npy")
    base = BaseModel(args.name, model, info.sha256, layer, feats)
    bank = Bank(store.images, store.labels, store.copy, store.copy_names)
    results = evaluate([base], bank, sets, cfg.rmc, out / "results", info.num_classes, n=args.n,
                       with_rmc=not args.no_rmc)
    notes = {s.name: "clean" if s.attack.get("kind") == "clean" else "transfer" for s in sets}
    table = Table.from_results(results, notes)
    write_json(out / "results.json", {"rmc": to_dict(cfg.rmc), "model": dataclasses.asdict(info),
                                      "store": store.fingerprint, "layer": layer, "table": table.to_dict()})
    write_text(out / "results.md", table.markdown())
    print(table.plain())
    print(f"results: {out}/results.md, {out}/results.json")
    return 0
