from __future__ import annotations

import argparse
from dataclasses import fields

from rmc.artifacts.evalsets import parse_number
from rmc.data import DATASETS, DEFAULT_DATASET, load_dataset
from rmc.errors import RMCError
from rmc.models import BUILTIN, save_checkpoint
from rmc.training import TrainConfig, train_model

_D = {f.name: f.default for f in fields(TrainConfig)}   # defaults live in TrainConfig only


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help=f"data set: {', '.join(DATASETS.names())} (default: %(default)s)")
    p.add_argument("--data-dir", help="directory holding the data set (default: its standard location)")
    p.add_argument("--out", required=True, help="weights file to write (.safetensors; metadata goes beside as .json)")
    p.add_argument("--arch", default=_D["arch"],
                   help=f"{', '.join(BUILTIN)}, timm:NAME or package.module:factory (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=_D["epochs"], help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=_D["batch_size"], help="default: %(default)s")
    p.add_argument("--lr", type=float, default=_D["lr"],
                   help="peak one-cycle learning rate of Adam (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=_D["weight_decay"], help="default: %(default)s")
    p.add_argument("--augment", action="store_true", help="random flips and 2-pixel shifts")
    p.add_argument("--seed", type=int, default=_D["seed"], help="default: %(default)s")
    p.add_argument("--adversarial", action="store_true", help="Madry-style PGD adversarial training")
    p.add_argument("--denoise", choices=["nonlocal", "mean", "median"],
                   help="feature-denoising blocks after each feature stage (Xie et al. 2019; use with --adversarial)")
    p.add_argument("--adv-eps", default=str(_D["adv_eps"]),
                   help="PGD training eps, e.g. 0.1 or 8/255 (default: %(default)s)")
    p.add_argument("--adv-step-size", default=str(_D["adv_step_size"]), help="PGD training step (default: %(default)s)")
    p.add_argument("--adv-steps", type=int, default=_D["adv_steps"], help="PGD training steps (default: %(default)s)")
    p.add_argument("--train-subset", type=int, default=None, help="train on this many seeded-random images only")
    p.add_argument("--device", default=_D["device"], help="cpu or cuda (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def main(args) -> int:
    if not args.out.endswith(".safetensors"):
        raise RMCError(f"--out {args.out!r} must end in .safetensors (the metadata is written beside it as .json)")
    config = TrainConfig(arch=args.arch, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         weight_decay=args.weight_decay, augment=args.augment, seed=args.seed,
                         adversarial=args.adversarial, adv_eps=parse_number(args.adv_eps, "--adv-eps"),
                         adv_step_size=parse_number(args.adv_step_size, "--adv-step-size"),
                         adv_steps=args.adv_steps, denoise=args.denoise, train_subset=args.train_subset,
                         device=args.device).validate()
    train = load_dataset(args.dataset, "train", args.data_dir)
    test = load_dataset(args.dataset, "test", args.data_dir)
    model, info = train_model(train, test, config, progress=not args.quiet)
    info = save_checkpoint(model.cpu(), info, args.out)
    kind = "adversarially trained" if info.adversarial else "trained"
    arch = info.arch + (f" with {info.denoise} denoising blocks" if info.denoise else "")
    print(f"{kind} {arch} on {info.dataset}: clean test accuracy {info.test_accuracy:.4f} "
          f"({info.config['train_seconds']:.0f} s); wrote {args.out} (sha256 {info.sha256[:12]})")
    return 0
