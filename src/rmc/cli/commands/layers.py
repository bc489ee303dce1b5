from __future__ import annotations

import argparse

from rmc.models import build_model, list_layers, load_checkpoint


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="weights file written by `rmc train` (.safetensors)")
    src.add_argument("--arch", help="architecture: small_cnn, resnet18 or package.module:factory")
    p.add_argument("--num-classes", type=int, default=10, help="with --arch: number of classes")
    p.add_argument("--in-channels", type=int, default=1, help="with --arch: input channels")


def main(args) -> int:
    model = load_checkpoint(args.model)[0] if args.model else build_model(args.arch, args.num_classes, args.in_channels)
    default = getattr(model, "default_feature_layer", None)
    for name, kind in list_layers(model):
        mark = "  (default feature layer)" if name == default else ""
        print(f"{name:40s} {kind}{mark}")
    return 0
