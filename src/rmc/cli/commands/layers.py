from __future__ import annotations

import argparse

from rmc.errors import RMCError
from rmc.models import BUILTIN, build_model, list_layers, load_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="weights file written by `rmc train` or `rmc import-model` (.safetensors)")
    p.add_argument("--arch", help=f"architecture: {', '.join(BUILTIN)}, timm:NAME or package.module:factory (with "
                                  "--model: the factory its JSON names, which is built only when you name it here)")
    p.add_argument("--num-classes", type=int, default=10, help="with --arch: number of classes")
    p.add_argument("--in-channels", type=int, default=1, help="with --arch: input channels")


def main(args) -> int:
    if not args.model and not args.arch:
        raise RMCError("name a model: --model FILE.safetensors, or --arch NAME to list an untrained "
                       "architecture's layers")
    if args.model:
        model = load_checkpoint(args.model, trust_arch=args.arch)[0]
    else:
        model = build_model(args.arch, args.num_classes, args.in_channels)
    default = getattr(model, "default_feature_layer", None)
    for name, kind in list_layers(model):
        mark = "  (default feature layer)" if name == default else ""
        print(f"{name:40s} {kind}{mark}")
    return 0
