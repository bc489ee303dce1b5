from __future__ import annotations

import argparse
import time

from rmc.artifacts.dprime import ATTACK_LABELS, AugmentConfig, build_dprime_store
from rmc.artifacts.evalsets import parse_number
from rmc.cli.commands import (
    add_model_and_data_arguments,
    add_ray_arguments,
    check_ray_arguments,
    check_ray_device,
    model_and_split,
)
from rmc.scaleout.executors import hold

_D = AugmentConfig()


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_and_data_arguments(p)
    p.add_argument("--out", required=True, help="store directory to write (built in <out>.partial, then renamed)")
    p.add_argument("--steps", type=int, nargs="+", default=list(_D.steps), metavar="N",
                   help="PGD steps of each adversarial copy, one copy per number (default: %(default)s)")
    p.add_argument("--eps", default=str(_D.eps), help="L-inf radius, e.g. 0.1 or 16/255 (default: %(default)s)")
    p.add_argument("--step-size", default=str(_D.step_size), help="PGD step, e.g. 0.01 (default: %(default)s)")
    p.add_argument("--no-random-start", action="store_true", help="start PGD at the clean image")
    p.add_argument("--seed", type=int, default=_D.seed, help="random starts and subset (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=_D.chunk_size,
                   help="images per unit of work; resuming restarts at most one chunk (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=_D.batch_size, help="PGD batch size (default: %(default)s)")
    p.add_argument("--train-subset", type=int, default=None, help="use this many seeded-random training images only")
    p.add_argument("--per-class", type=int, default=None, metavar="N",
                   help="use at most N seeded-random training images of each class (before --train-subset)")
    p.add_argument("--label", choices=ATTACK_LABELS, default=_D.label,
                   help="what PGD attacks: the static model's prediction (the original) or the true label; copies "
                        "are stored with the true label either way (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ray_arguments(p)


def main(args) -> int:
    check_ray_arguments(args)
    check_ray_device(args.ray, args.device)
    config = AugmentConfig(steps=tuple(args.steps), eps=parse_number(args.eps, "--eps"),
                           step_size=parse_number(args.step_size, "--step-size"),
                           random_start=not args.no_random_start, seed=args.seed, chunk_size=args.chunk_size,
                           batch_size=args.batch_size, train_subset=args.train_subset, label=args.label,
                           per_class=args.per_class).validate()
    model, info, train = model_and_split(args, "train")
    started = time.perf_counter()
    with hold(args.ray, args.workers, args.ray_timeout):   # a cluster that does not answer fails here, in seconds
        store = build_dprime_store(model, info, train, args.out, config, progress=not args.quiet, ray=args.ray,
                                   workers=args.workers)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
    counts = ", ".join(f"{k} {v}" for k, v in store.manifest["counts"].items())
    print(f"D' of {len(store)} images ({counts}) in {store.path}: {size / 2**20:.1f} MiB, "
          f"{seconds:.0f} s, fingerprint {store.fingerprint[:12]}")
    return 0
