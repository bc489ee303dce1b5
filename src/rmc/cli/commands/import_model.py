from __future__ import annotations

import argparse

from rmc.errors import RMCError
from rmc.models import save_checkpoint
from rmc.models.importing import SUFFIXES, Preprocessing, import_weights
from rmc.models.registry import BUILTIN


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", help=f"the pretrained weights: a state dict ({', '.join(sorted(SUFFIXES))}); .pt / .pth "
                                   "/ .bin are read with torch.load(weights_only=True), .h5 is Keras' ResNet152V2")
    p.add_argument("--arch", required=True,
                   help=f"architecture: built in ({', '.join(BUILTIN)}), timm:NAME (needs timm) or "
                        "package.module:factory")
    p.add_argument("--out", required=True, help="rmc checkpoint to write (.safetensors; metadata beside it as .json)")
    p.add_argument("--input-size", type=int, required=True, metavar="N",
                   help="the model's input images are N x N (e.g. 224 for ImageNet models)")
    p.add_argument("--channels", type=int, default=3, help="input channels (default: %(default)s)")
    p.add_argument("--mean", type=float, nargs="+", metavar="M",
                   help="per-channel mean the model normalises [0, 1] images with, e.g. 0.485 0.456 0.406 (default: "
                        "the architecture's: ImageNet statistics for resnet50/101/152, Keras' (0.5, 0.5) for "
                        "resnet152v2; a factory normalises inside its own model)")
    p.add_argument("--std", type=float, nargs="+", metavar="S", help="per-channel std, with --mean")
    p.add_argument("--num-classes", type=int, help="number of classes (default: read from the classifier's weight)")
    p.add_argument("--dataset", default="",
                   help="the data set the weights were trained for, as rmc names it (e.g. imagefolder); recorded, and "
                        "checked against the data the model is later used on")
    p.add_argument("--adversarial", action="store_true", help="record that the weights were adversarially trained")
    p.add_argument("--ignore-unexpected", action="store_true",
                   help="drop entries the architecture does not have (recorded); missing entries are always refused")


def main(args) -> int:
    if not args.out.endswith(".safetensors"):
        raise RMCError(f"--out {args.out!r} must end in .safetensors (the metadata is written beside it as .json)")
    pre = Preprocessing(args.input_size, args.channels, args.mean, args.std)
    model, info = import_weights(args.weights, args.arch, pre, num_classes=args.num_classes, dataset=args.dataset,
                                 adversarial=args.adversarial, ignore_unexpected=args.ignore_unexpected)
    info = save_checkpoint(model, info, args.out)
    src = info.imported
    dropped = f"; dropped {len(src['ignored_keys'])} unexpected entries" if src["ignored_keys"] else ""
    norm = (f"mean {[round(v, 4) for v in info.mean]}, std {[round(v, 4) for v in info.std]}"
            if info.mean is not None and info.std is not None else "normalised by the factory's own model")
    print(f"imported {src['source_name']} ({src['format']}, sha256 {src['source_sha256'][:12]}) as {info.arch}: "
          f"{info.num_classes} classes ({src['num_classes']}), input {' x '.join(map(str, info.input_shape))}, "
          f"{norm}{dropped}; wrote {args.out} (sha256 {info.sha256[:12]})")
    return 0
