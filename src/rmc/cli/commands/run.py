from __future__ import annotations

import argparse
import sys

from rmc.cli.commands import add_shared_arguments, attack_overrides, check_ray_arguments
from rmc.cli.config import PRESETS, documented_yaml, load_config, parse_override
from rmc.cli.pipeline import run_pipeline


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration (see --print-config); omitted: the defaults")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="default: fits <= 15 min on 2 CPU cores; paper: the original's values (needs a GPU)")
    p.add_argument("--out", default="runs/default", help="run directory (re-run the same command to resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config entry, e.g. --set rmc.k=256 (repeatable)")
    p.add_argument("--seed", type=int, help="set every seed of the run (train, augment, attack, rmc, attack_rows)")
    p.add_argument("--n", type=int, help="test inputs per evaluation set (attack.n)")
    p.add_argument("--mode", choices=["online", "episodic"], help="RMC mode (rmc.mode)")
    p.add_argument("--bases", nargs="+", choices=["standard", "adversarial", "denoising"],
                   help="base models, each alone and + RMC with its own D' (model.bases; default: standard)")
    p.add_argument("--adversarial-base", action="store_true",
                   help="add the adversarially trained base model to model.bases")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    add_shared_arguments(p)


def main(args) -> int:
    check_ray_arguments(args)
    overrides = [parse_override(s) for s in args.set]
    if args.seed is not None:
        overrides += [(f"{section}.seed", args.seed) for section in ("train", "augment", "attack", "rmc", "attack_rows")]
    if args.n is not None:
        overrides.append(("attack.n", args.n))
    if args.mode:
        overrides.append(("rmc.mode", args.mode))
    if args.bases:
        overrides.append(("model.bases", args.bases))
    overrides += attack_overrides(args)
    cfg = load_config(args.config, args.preset, overrides)
    if args.adversarial_base and "adversarial" not in cfg.model.bases:
        cfg.model.bases.append("adversarial")
    if args.print_config:
        sys.stdout.write(documented_yaml(cfg))
        return 0
    table = run_pipeline(cfg, args.out, ray=args.ray, workers=args.workers, shards=args.shards, batch=args.batch,
                         block=args.block)
    print()
    print(table.plain())
    print(f"results: {args.out}/results.md, {args.out}/results.json; neighbours: {args.out}/neighbours.png")
    return 0
