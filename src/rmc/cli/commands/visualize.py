from __future__ import annotations

import argparse
from pathlib import Path

from rmc.artifacts.evalsets import load_eval_sets
from rmc.artifacts.features import load_features, store_source
from rmc.artifacts.provenance import check_together
from rmc.cli.commands import add_device_argument, add_trust_arch_argument, add_verify_argument, load_model, open_store
from rmc.cli.config import VisualizeConfig
from rmc.errors import RMCError
from rmc.evaluation.common import BaseModel
from rmc.evaluation.visualize import neighbour_grid
from rmc.models import default_layer


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="static model (.safetensors)")
    add_trust_arch_argument(p)
    p.add_argument("--store", required=True, help="augmented dataset D'")
    p.add_argument("--features", required=True, help="D' features of this model (`rmc features`)")
    p.add_argument("--evalsets", required=True, help="evaluation sets (`rmc attack`)")
    p.add_argument("--sets", nargs="+", help="sets to show (default: the first two, clean first)")
    p.add_argument("--layer", help="feature layer (default: the model's)")
    p.add_argument("--inputs", type=int, default=VisualizeConfig.inputs, help="inputs per set (default: %(default)s)")
    p.add_argument("--neighbours", type=int, default=VisualizeConfig.neighbours,
                   help="neighbours per input (default: %(default)s)")
    p.add_argument("--out", default="neighbours.png", help="PNG to write (default: %(default)s)")
    add_device_argument(p)
    add_verify_argument(p)


def main(args) -> int:
    from rmc.checks import check_positive
    check_positive(args.inputs, "--inputs", integer=True)
    check_positive(args.neighbours, "--neighbours", integer=True)
    if not args.out.lower().endswith(".png"):
        raise RMCError(f"--out {args.out!r} must end in .png")
    from rmc.training import resolve_device
    device = resolve_device(args.device)
    store = open_store(args)
    model, info = load_model(args, device)
    sets = load_eval_sets(args.evalsets, args.sets)
    check_together(info, store, sets)
    layer = args.layer or default_layer(model)
    feats = load_features(args.features, info.sha256, layer, store_source(store), mmap=True)[0].numpy()
    from rmc.data import class_names
    names = class_names(info.dataset)
    path = neighbour_grid(BaseModel("standard", model, info.sha256, layer, feats, Path(args.features)),
                          store.dprime(), sets, args.out,
                          VisualizeConfig(args.inputs, args.neighbours), class_names=names,
                          max_sets=len(sets) if args.sets else 2)
    print(f"wrote {path}")
    return 0
