from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rmc.artifacts.evalsets import load_eval_sets
from rmc.artifacts.features import ensure_features, load_features, store_source
from rmc.artifacts.provenance import check_together
from rmc.checks import check_positive
from rmc.cli.commands import (
    add_device_argument,
    add_shared_arguments,
    add_trust_arch_argument,
    add_verify_argument,
    attack_overrides,
    check_ray_arguments,
    check_ray_device,
    load_model,
    open_store,
)
from rmc.cli.config import PRESETS, load_config, parse_override, to_dict
from rmc.defense.registry import DEFAULT_DEFENSES, RMC, selectable
from rmc.errors import RMCError
from rmc.evaluation import batch_defense
from rmc.evaluation.common import BaseModel
from rmc.evaluation.driver import check_work_split, compute_paths, evaluate, online_streams
from rmc.evaluation.report import Table
from rmc.io import write_json, write_text
from rmc.models import default_layer
from rmc.paths import safe_name
from rmc.scaleout.executors import hold


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="static base model (.safetensors from `rmc train`)")
    add_trust_arch_argument(p)
    p.add_argument("--name", default="standard", help="base-model name for the rows: standard | adversarial | any")
    p.add_argument("--store", required=True, help="augmented dataset D' (`rmc augment`)")
    p.add_argument("--evalsets", required=True, help="evaluation sets (`rmc attack`)")
    p.add_argument("--sets", nargs="+", help="only these evaluation sets (default: all)")
    p.add_argument("--features",
                   help="D' features of this model (`rmc features`); default: computed and cached in --out")
    p.add_argument("--layer", help="feature layer (default: the model's)")
    p.add_argument("--out", required=True, help="results directory (re-run the same command to resume)")
    p.add_argument("--config", help="YAML configuration; its rmc, features and knn sections apply")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="RMC defaults to start from")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. --set rmc.k=256")
    p.add_argument("--n", type=int, help="evaluate only the first N inputs of each set")
    p.add_argument("--rmc-n", type=int, help="RMC on only the first N of those (the baselines on all; default: all)")
    p.add_argument("--mode", choices=["online", "episodic"], help="RMC mode")
    p.add_argument("--defenses", nargs="+", choices=selectable(), metavar="DEFENSE",
                   help=f"defenses evaluated beside the static model and the kNN votes, each a column of every table: "
                        f"{', '.join(selectable())} (defenses; default: {' '.join(DEFAULT_DEFENSES)})")
    p.add_argument("--no-rmc", action="store_true", help="baselines only (fast): no defense, no attack rows")
    add_verify_argument(p)
    add_device_argument(p)
    add_shared_arguments(p)


def main(args) -> int:
    check_ray_arguments(args)
    from rmc.training import resolve_device
    device = resolve_device(args.device)
    check_ray_device(args.ray, device)
    if args.n is not None:
        check_positive(args.n, "--n (inputs per evaluation set)", integer=True)
    if args.rmc_n is not None:
        check_positive(args.rmc_n, "--rmc-n (RMC inputs per evaluation set)", integer=True)
    safe_name(args.name, "--name")   # a folder of --out
    flags = ([("rmc.mode", args.mode)] if args.mode else []) + attack_overrides(args)
    if args.defenses:
        flags.append(("defenses", args.defenses))
    cfg = load_config(args.config, args.preset, [parse_override(s) for s in args.set], flags)
    check_work_split(args.batch, cfg.rmc, args.ray, args.shards, args.block)   # before any work
    store = open_store(args)
    model, info = load_model(args, device)
    sets = load_eval_sets(args.evalsets, args.sets)
    check_together(info, store, sets)
    run_rmc = not args.no_rmc and RMC in cfg.defenses   # as `rmc run`: --no-rmc leaves the baselines alone
    batch_names = [] if args.no_rmc else batch_defense.batch_defenses(cfg.defenses)
    if run_rmc and cfg.rmc.k > len(store):
        raise RMCError(f"rmc.k = {cfg.rmc.k} exceeds |D'| = {len(store)} ({args.store}); lower rmc.k (--set rmc.k=...)")
    from rmc.evaluation.attack_rows import (
        attack_table,
        check_rows_within_rmc,
        clean_set,
        evaluate_attacks,
        wants_attack_rows,
    )
    attack_rows = not args.no_rmc and wants_attack_rows(cfg.attack_rows)
    if attack_rows:
        clean = clean_set(sets)   # refuse now, not after the long evaluation, if the attack rows cannot run
        check_rows_within_rmc(cfg.attack_rows, min(len(clean), args.n or len(clean)), args.rmc_n)
    layer = args.layer or default_layer(model)
    out = Path(args.out)
    feats_path = Path(args.features) if args.features else out / f"features-{args.name}.npy"
    if args.features:
        feats = load_features(feats_path, info.sha256, layer, store_source(store), mmap=True)[0].numpy()
    else:
        feats = ensure_features(model, info, layer, store, feats_path, cfg.features)
    base = BaseModel(args.name, model, info.sha256, layer, feats, feats_path, cfg.knn)
    dprime = store.dprime()
    with hold(args.ray, args.workers, args.ray_timeout):   # a cluster that does not answer fails here, in seconds
        results = evaluate([base], dprime, sets, cfg.rmc, out / "results", info.num_classes, n=args.n,
                           rmc_n=args.rmc_n, with_rmc=run_rmc, ray=args.ray, workers=args.workers,
                           shards=args.shards, block=args.block, batch=args.batch, dprime_via=args.dprime_via)
    for defense in batch_names:   # a batch-transductive defense's column (DENT): one pass per set, in its batches
        for s in sets:
            results[args.name][s.name][defense] = batch_defense.evaluate_set(
                defense, cfg.settings(defense), base, s, out / "results", args.n)
    notes = {s.name: "clean" if s.attack.get("kind") == "clean" else "transfer" for s in sets}
    table = Table.from_results(results, notes)
    if attack_rows:
        acfg = cfg.attack_rows
        if args.n is not None and (acfg.n is None or acfg.n > args.n):
            acfg = dataclasses.replace(acfg, n=args.n)   # the attack rows never use more inputs than the others
        rows = evaluate_attacks(base, dprime, sets, cfg.rmc, acfg, out / "results", info.num_classes,
                                results[args.name].get("clean"), defenses=cfg.defenses,
                                settings={d: cfg.settings(d) for d in batch_names}, brows=cfg.batch_rows)
        table.appendix.append(attack_table({args.name: rows}))
    write_json(out / "results.json", {"defenses": list(cfg.defenses), "rmc": to_dict(cfg.rmc),
                                      "attack_rows": to_dict(cfg.attack_rows),
                                      "model": dataclasses.asdict(info),
                                      "store": store.fingerprint, "layer": layer, "table": table.to_dict(),
                                      "online_streams": online_streams(cfg.rmc, args.shards),
                                      "compute": compute_paths(results),
                                      "ray": args.ray, "workers": args.workers, "batch": args.batch})
    write_text(out / "results.md", table.markdown())
    print(table.plain())
    print(f"results: {out}/results.md, {out}/results.json")
    return 0
