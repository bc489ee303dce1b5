from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from rmc.cli.commands.augment import add_ray_arguments, check_ray_arguments
from rmc.cli.config import load_config, parse_override, to_dict
from rmc.defense.core import DPrime
from rmc.artifacts.evalsets import load_eval_sets
from rmc.evaluation.report import Table
from rmc.evaluation.driver import BaseModel, check_batch, evaluate, online_streams
from rmc.artifacts.features import load_features, store_source
from rmc.io import write_json, write_text
from rmc.models import default_layer, load_checkpoint
from rmc.cli.pipeline import ensure_features
from rmc.artifacts.dprime import open_dprime_store


def add_attack_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of the attack rows (shared with `rmc run`); they override the config's `adaptive` section."""
    g = p.add_argument_group("attack rows", "transfer PGD (always), transfer AutoAttack and the defense-aware "
                             "attacks FPA / GMSA-AVG / GMSA-MIN against RMC; the config's adaptive section")
    g.add_argument("--attacks", nargs="+", metavar="ATTACK",
                   choices=["fpa", "gmsa-avg", "gmsa-min", "autoattack", "none"],
                   help="rows beside transfer PGD: fpa gmsa-avg gmsa-min autoattack, or none (default: gmsa-min)")
    g.add_argument("--rounds", type=int, help="rounds per input of the defense-aware attacks (adaptive.rounds)")
    g.add_argument("--attack-n", type=int, help="inputs in the attack rows (adaptive.n; default: all)")
    g.add_argument("--attack-eps", help="L-inf eps of the attack rows, e.g. 0.1 or 8/255 (adaptive.eps)")
    g.add_argument("--no-attack-rows", action="store_true", help="skip the attack rows")


def add_batch_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, default=1, metavar="B",
                   help="episodic mode: adapt B inputs at once, with the same results (one worker per core on a "
                        "CPU, one vectorised model on a GPU; see rmc.defense.batched). Default: %(default)s")


def add_shared_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `rmc evaluate` and `rmc run` share: Ray, --batch, the attack rows."""
    add_ray_arguments(p, shards=True)
    add_batch_argument(p)
    add_attack_arguments(p)


def attack_overrides(args) -> list[tuple[str, object]]:
    from rmc.errors import RMCError
    from rmc.artifacts.evalsets import parse_number
    out: list[tuple[str, object]] = []
    if args.attacks:
        if "none" in args.attacks and len(args.attacks) > 1:
            raise RMCError("--attacks none means no rows beside transfer PGD; do not combine it with other attacks")
        out += [("adaptive.attacks", [a for a in args.attacks if a not in ("none", "autoattack")]),
                ("adaptive.autoattack", "autoattack" in args.attacks)]
    if args.rounds is not None:
        out.append(("adaptive.rounds", args.rounds))
    if args.attack_n is not None:
        out.append(("adaptive.n", args.attack_n))
    if args.attack_eps is not None:
        out.append(("adaptive.eps", parse_number(args.attack_eps, "--attack-eps")))
    if args.no_attack_rows:
        out += [("adaptive.attacks", []), ("adaptive.autoattack", False), ("adaptive.transfer_pgd", False)]
    return out


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
    add_shared_arguments(p)


def main(args) -> int:
    check_ray_arguments(args)
    overrides = [parse_override(s) for s in args.set] + ([("rmc.mode", args.mode)] if args.mode else [])
    overrides += attack_overrides(args)
    cfg = load_config(args.config, args.preset, overrides)
    check_batch(args.batch, cfg.rmc, args.ray, args.shards)   # before features are computed, not after
    store = open_dprime_store(args.store)
    model, info = load_checkpoint(args.model)
    sets = load_eval_sets(args.evalsets, args.sets)
    from rmc.evaluation.attack_rows import attack_table, clean_set, evaluate_attacks, wants_attack_rows
    attack_rows = not args.no_rmc and wants_attack_rows(cfg.adaptive)
    if attack_rows:
        clean_set(sets)   # refuse now, not after the long evaluation, if the attack rows cannot run
    layer = args.layer or default_layer(model)
    out = Path(args.out)
    if args.features:
        feats = load_features(args.features, info.sha256, layer, store_source(store))[0].numpy()
    else:
        feats = ensure_features(model, info, layer, store, out / f"features-{args.name}.npy")
    base = BaseModel(args.name, model, info.sha256, layer, feats)
    dprime = DPrime(store.images, store.labels, store.copy, store.copy_names)
    results = evaluate([base], dprime, sets, cfg.rmc, out / "results", info.num_classes, n=args.n,
                       with_rmc=not args.no_rmc, ray=args.ray, workers=args.workers, shards=args.shards,
                       batch=args.batch)
    notes = {s.name: "clean" if s.attack.get("kind") == "clean" else "transfer" for s in sets}
    table = Table.from_results(results, notes)
    if attack_rows:
        acfg = cfg.adaptive
        if args.n is not None and (acfg.n is None or acfg.n > args.n):
            acfg = dataclasses.replace(acfg, n=args.n)   # the attack rows never use more inputs than the others
        rows = evaluate_attacks(base, dprime, sets, cfg.rmc, acfg, out / "results", info.num_classes,
                                results[args.name].get("clean"))
        table.appendix.append(attack_table({args.name: rows}))
    write_json(out / "results.json", {"rmc": to_dict(cfg.rmc), "adaptive": to_dict(cfg.adaptive),
                                      "model": dataclasses.asdict(info),
                                      "store": store.fingerprint, "layer": layer, "table": table.to_dict(),
                                      "online_streams": online_streams(cfg.rmc, args.shards),
                                      "ray": args.ray, "workers": args.workers, "batch": args.batch})
    write_text(out / "results.md", table.markdown())
    print(table.plain())
    print(f"results: {out}/results.md, {out}/results.json")
    return 0
