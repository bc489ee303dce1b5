from __future__ import annotations

import argparse
import time

from rmc.artifacts.features import (
    compute_features,
    evalset_features_path,
    evalset_source,
    make_provenance,
    save_features,
    store_features_path,
    store_source,
)
from rmc.artifacts.provenance import check_together
from rmc.cli.commands import add_device_argument, add_trust_arch_argument, add_verify_argument, load_model, open_store
from rmc.errors import RMCError
from rmc.models import default_layer
from rmc.models.features import get_layer
from rmc.training import resolve_device


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="static model written by `rmc train` (.safetensors)")
    add_trust_arch_argument(p)
    p.add_argument("--store", required=True, help="augmented dataset D' written by `rmc augment`")
    p.add_argument("--layer", help="feature layer (default: the model's; `rmc layers` lists them)")
    p.add_argument("--evalsets", help="directory of evaluation sets written by `rmc attack` (also embedded)")
    p.add_argument("--out", required=True, help="directory for dprime.npy and evalsets/<name>.npy (+ .json sidecars)")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass (default: %(default)s)")
    add_device_argument(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_verify_argument(p)


def main(args) -> int:
    if args.batch_size <= 0:
        raise RMCError(f"--batch-size must be > 0, got {args.batch_size}")
    device = resolve_device(args.device)
    store = open_store(args)   # cheap checks first: the device, the store and eval sets before the model runs
    sets = []
    if args.evalsets:
        from rmc.artifacts.evalsets import load_eval_sets
        sets = load_eval_sets(args.evalsets)
    model, info = load_model(args, device)
    layer = args.layer or default_layer(model)
    get_layer(model, layer)
    check_together(info, store, sets)
    started = time.perf_counter()
    feats = compute_features(model, info, layer, store.images, args.batch_size, progress=not args.quiet,
                             desc="features D'")
    path = save_features(store_features_path(args.out), feats,
                         make_provenance(info, layer, store_source(store), feats, store=str(store.path)))
    print(f"{path}: {feats.shape[0]} x {feats.shape[1]} from layer {layer}")
    for s in sets:
        f = compute_features(model, info, layer, s.images, args.batch_size, progress=not args.quiet,
                             desc=f"features {s.name}")
        p = save_features(evalset_features_path(args.out, s.name), f,
                          make_provenance(info, layer, evalset_source(s), f, evalsets=str(args.evalsets)))
        print(f"{p}: {f.shape[0]} x {f.shape[1]}")
    print(f"done in {time.perf_counter() - started:.0f} s")
    return 0
