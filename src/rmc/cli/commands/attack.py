from __future__ import annotations

import argparse
import sys
import time

from rmc.artifacts.evalsets import AttackSpec, make_eval_sets, parse_number, save_eval_sets
from rmc.cli.commands import add_model_and_data_arguments, model_and_split
from rmc.cli.config import AttackConfig
from rmc.errors import RMCError
from rmc.training import predict

_D = AttackConfig()   # the defaults of `rmc run`'s attack section


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_data_arguments(p)
    p.add_argument("--out", required=True, help="directory to write the sets and index.json into")
    p.add_argument("--n", type=int, default=_D.n,
                   help="number of test inputs, a seeded random sample (default: %(default)s)")
    p.add_argument("--eps", nargs="*", default=[f"{e:g}" for e in _D.fgsm_eps], metavar="EPS",
                   help="FGSM budgets, e.g. 0.1 or 8/255; --eps alone for none (default: %(default)s)")
    p.add_argument("--pgd", nargs="*", default=[f"{int(s)}:{e:g}" for s, e in _D.pgd], metavar="STEPS:EPS[:STEP]",
                   help="PGD settings; step defaults to 2.5*eps/steps; --pgd alone for none (default: %(default)s)")
    p.add_argument("--targeted", action="store_true", help="write targeted sets (random wrong class)")
    p.add_argument("--untargeted", action="store_true",
                   help="write untargeted sets; with neither flag, both are written")
    p.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    p.add_argument("--seed", type=int, default=_D.seed,
                   help="chooses test inputs, targets and PGD starts (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=500, help="attack batch size (default: %(default)s)")


def attack_specs(args) -> list[AttackSpec]:
    modes = [m for m, on in ((False, args.untargeted), (True, args.targeted)) if on] or [False, True]
    specs = [AttackSpec("clean")]
    for targeted in modes:
        specs += [AttackSpec("fgsm", parse_number(e, "--eps"), targeted=targeted).resolved() for e in args.eps]
        specs += [AttackSpec.parse_pgd(t, targeted, not args.no_random_start) for t in args.pgd]
    return specs


def main(args) -> int:
    if args.seed < 0:
        raise RMCError(f"--seed must be >= 0, got {args.seed}")
    if args.batch_size <= 0:
        raise RMCError(f"--batch-size must be > 0, got {args.batch_size}")
    specs = attack_specs(args)   # validate settings before loading anything
    model, info, test = model_and_split(args, "test")
    started = time.perf_counter()
    sets = make_eval_sets(model, info, test, args.n, specs, seed=args.seed, batch_size=args.batch_size,
                          progress=lambda name: print(f"making {name} ...", file=sys.stderr, flush=True))
    save_eval_sets(args.out, sets)
    print(f"{len(sets)} sets of {args.n} {test.name} test inputs against {args.model} "
          f"({time.perf_counter() - started:.0f} s), written to {args.out}")
    print(f"{'set':36s} {'accuracy':>9s} {'target hit':>10s}")
    for s in sets:
        pred = predict(model, s.images, args.batch_size)
        acc = (pred == s.labels).float().mean().item()
        hit = f"{(pred == s.targets).float().mean().item():10.4f}" if s.targets is not None else f"{'-':>10s}"
        print(f"{s.name:36s} {acc:9.4f} {hit}")
    return 0
