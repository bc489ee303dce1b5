"""Do feature-denoising blocks do what Xie et al. (CVPR 2019) say, here, and what do they cost?

Trains (adversarially, PGD-7) the small CNN without and with denoising blocks of each kind on a seeded subset of
Fashion-MNIST, then, for test images and their PGD-10 copies made against each model:
  * feature noise: ||f(x') - f(x)|| / ||f(x)|| at each stage, measured at the denoising block's input, after its
    denoising operation and at its output (the paper: adversarial perturbations make feature maps noisy, and the
    operation removes much of that noise);
  * clean and PGD-10 accuracy, and seconds per training epoch (same machine, same run).

    python studies/denoising.py [--train-subset 10000] [--epochs 2] [--n 500] [--out studies/denoising]

Writes <out>/summary.json (the figures) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rmc.attacks.gradient import pgd
from rmc.data import load_dataset
from rmc.io import write_json
from rmc.models.denoising import OPS, DenoiseBlock
from rmc.training import TrainConfig, train_model

EPS = 0.1          # the attack radius of training and test (Fashion-MNIST's usual 0.1)
TEST_STEPS = 10    # PGD steps of the test attack
KINDS = [None, "nonlocal", "mean", "median"]


def relative_noise(clean: torch.Tensor, adv: torch.Tensor) -> float:
    """Mean over images of ||adv - clean|| / ||clean|| (per image, over the whole map)."""
    diff = (adv - clean).flatten(1).norm(dim=1)
    return float((diff / clean.flatten(1).norm(dim=1).clamp_min(1e-12)).mean())


@torch.no_grad()
def stage_maps(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """{where: map} for every denoising block (its input, after the operation, its output) or, without blocks, every
    feature stage's output."""
    maps, hooks = {}, []
    for name in type(model).denoise_stages:
        stage = getattr(model, name)
        block = next((m for m in stage.modules() if isinstance(m, DenoiseBlock)), None)
        if block is None:
            hooks.append(stage.register_forward_hook(lambda m, i, o, n=name: maps.__setitem__(f"{n} out", o)))
        else:
            def grab(m, inp, out, n=name):
                maps[f"{n} in"] = inp[0]
                maps[f"{n} denoised"] = OPS[m.op](inp[0])
                maps[f"{n} out"] = out
            hooks.append(block.register_forward_hook(grab))
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return maps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-subset", type=int, default=10000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--n", type=int, default=500, help="test images attacked")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("studies/denoising"))
    args = p.parse_args()
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    x, y = test.float_images()[:args.n], test.labels[:args.n]
    rows = []
    for kind in KINDS:
        cfg = TrainConfig(epochs=args.epochs, adversarial=True, adv_eps=EPS, denoise=kind,
                          train_subset=args.train_subset, seed=args.seed).validate()
        t0 = time.perf_counter()
        model, info = train_model(train, test, cfg, progress=False)
        seconds = time.perf_counter() - t0
        adv = pgd(model, x, y, EPS, 2.5 * EPS / TEST_STEPS, TEST_STEPS, random_start=True,
                  generator=torch.Generator().manual_seed(args.seed))
        with torch.no_grad():
            robust = float((model(adv).argmax(1) == y).float().mean())
        clean_maps, adv_maps = stage_maps(model, x), stage_maps(model, adv)
        noise = {where: round(relative_noise(clean_maps[where], adv_maps[where]), 4) for where in clean_maps}
        rows.append({"denoise": kind or "none", "epoch_seconds": round(seconds / args.epochs, 1),
                     "clean_accuracy": round(info.test_accuracy, 4), "pgd10_accuracy": round(robust, 4),
                     "feature_noise": noise})
        print(json.dumps(rows[-1]), flush=True)
    write_json(args.out / "summary.json", {"settings": vars(args) | {"out": str(args.out), "eps": EPS,
                                                                        "test_steps": TEST_STEPS,
                                                                        "threads": torch.get_num_threads()},
                                           "rows": rows})
    print("\n| denoise | s / epoch | clean | PGD-10 | " + " | ".join(
        f"{s}: in -> denoised -> out" for s in ("block1", "block2", "block3")) + " |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        n = r["feature_noise"]
        cells = [f"{n[f'{s} in']:.3f} -> {n[f'{s} denoised']:.3f} -> {n[f'{s} out']:.3f}" if f"{s} in" in n
                 else f"out {n[f'{s} out']:.3f}" for s in ("block1", "block2", "block3")]
        print(f"| {r['denoise']} | {r['epoch_seconds']} | {100 * r['clean_accuracy']:.1f} | "
              f"{100 * r['pgd10_accuracy']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
