from __future__ import annotations

import argparse
import sys

from rmc.cli.commands import (
    add_device_argument,
    add_shared_arguments,
    attack_overrides,
    check_ray_arguments,
    check_ray_device,
)
from rmc.cli.config import PRESETS, documented_yaml, load_config, parse_override
from rmc.cli.pipeline import run_pipeline
from rmc.defense.registry import DEFAULT_DEFENSES, selectable
from rmc.errors import RMCError

DEFAULT_SWEEP_STEPS = 10   # PGD steps of --eps-sweep when attack.pgd is empty


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML configuration (see --print-config); omitted: the defaults")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS),
                   help="default: fits <= 15 min on 2 CPU cores; paper: the original's values (needs a GPU)")
    p.add_argument("--out", default="runs/default", help="run directory (re-run the same command to resume)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config entry, e.g. --set rmc.k=256 (repeatable)")
    p.add_argument("--seed", type=int, help="set every seed of the run (train, augment, attack, rmc, attack_rows)")
    p.add_argument("--n", type=int, help="test inputs per evaluation set (attack.n)")
    p.add_argument("--rmc-n", type=int, help="RMC on the first N of them (attack.rmc_n; default: all)")
    p.add_argument("--mode", choices=["online", "episodic"], help="RMC mode (rmc.mode)")
    p.add_argument("--defenses", nargs="+", choices=selectable(), metavar="DEFENSE",
                   help=f"defenses evaluated beside the static model and the kNN votes, each a column of every table: "
                        f"{', '.join(selectable())} (defenses; default: {' '.join(DEFAULT_DEFENSES)})")
    p.add_argument("--bases", nargs="+", choices=["standard", "adversarial", "denoising"],
                   help="base models, each alone and + RMC with its own D' (model.bases; default: standard)")
    p.add_argument("--adversarial-base", action="store_true",
                   help="add the adversarially trained base model to model.bases")
    p.add_argument("--weights", action="append", default=[], metavar="BASE=CHECKPOINT",
                   help="use an imported rmc checkpoint (`rmc import-model`) as base model BASE instead of training "
                        "it, e.g. --weights standard=resnet50.safetensors (model.weights.BASE; repeatable)")
    p.add_argument("--eps-sweep", nargs="+", metavar="EPS",
                   help="evaluate PGD at each of these L-inf eps (e.g. 0.05 0.1 0.15 0.2 or 8/255), replacing "
                        "attack.pgd's eps values (steps: its first entry's), so `rmc report` draws a curve with "
                        "that many points; each eps costs one more set per attack direction (opt-in)")
    add_device_argument(p, default=None)
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    add_shared_arguments(p)


def eps_sweep(pgd: list, values: list[str]) -> list[list[float]]:
    """attack.pgd for --eps-sweep: [steps, eps] per eps, steps from the configured first entry (10 if none)."""
    from rmc.artifacts.evalsets import parse_number
    steps = int(pgd[0][0]) if pgd else DEFAULT_SWEEP_STEPS
    eps = sorted({parse_number(v, "--eps-sweep") for v in values})
    bad = [e for e in eps if not 0 < e <= 1]
    if bad:
        raise RMCError(f"--eps-sweep values are L-inf radii in (0, 1] pixel units, got {bad}")
    return [[steps, e] for e in eps]


def main(args) -> int:
    check_ray_arguments(args)
    flags = []
    if args.seed is not None:
        flags += [(f"{section}.seed", args.seed)
                  for section in ("train", "augment", "attack", "rmc", "attack_rows")]
    if args.n is not None:
        flags.append(("attack.n", args.n))
    if args.rmc_n is not None:
        flags.append(("attack.rmc_n", args.rmc_n))
    if args.mode:
        flags.append(("rmc.mode", args.mode))
    if args.bases:
        flags.append(("model.bases", args.bases))
    if args.defenses:
        flags.append(("defenses", args.defenses))
    if args.device:
        flags.append(("train.device", args.device))
    for given in args.weights:
        base, _, path = given.partition("=")
        if not base or not path:
            raise RMCError(f"--weights {given!r}: write BASE=CHECKPOINT, e.g. --weights standard=model.safetensors")
        flags.append((f"model.weights.{base}", path))
    flags += attack_overrides(args)
    cfg = load_config(args.config, args.preset, [parse_override(s) for s in args.set], flags)
    check_ray_device(args.ray, cfg.train.device)
    if args.adversarial_base and "adversarial" not in cfg.model.bases:
        cfg.model.bases.append("adversarial")
    if args.eps_sweep:
        cfg.attack.pgd = eps_sweep(cfg.attack.pgd, args.eps_sweep)
    if args.print_config:
        sys.stdout.write(documented_yaml(cfg))
        return 0
    table = run_pipeline(cfg, args.out, ray=args.ray, workers=args.workers, shards=args.shards, batch=args.batch,
                         block=args.block, dprime_via=args.dprime_via, ray_timeout=args.ray_timeout)
    print()
    print(table.plain())
    print(f"results: {args.out}/results.md, {args.out}/results.json; neighbours: {args.out}/neighbours.png; "
          f"report: {args.out}/report.html")
    return 0
