"""The seed's full experiment in GPU-hours and bytes, from FLOPs counted on rmc's own ResNet-152 v2.

The seed (ImageNet, ResNet-152 v2, 224 px) cannot run on this project's machines. This script counts the floating
point operations of one 224-px image through the built-in `resnet152v2` (torch.utils.flop_counter, via
benchmarks/model_cost.py), multiplies them by the work RMC's protocol does, and divides by a stated sustained GPU
throughput. Every count and setting is printed, so each assumption can be changed here.

    python benchmarks/cost_model.py                     # the table (docs/scale.md quotes it)
    python benchmarks/cost_model.py --tflops 400 150    # other sustained throughputs (TFLOP/s)
    python benchmarks/cost_model.py --json              # the same as JSON
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass

from model_cost import flops  # benchmarks/model_cost.py: FLOPs counted by torch.utils.flop_counter

from rmc.models import build_model


@dataclass(frozen=True)
class Seed:
    """The seed's experiment (SPEC section 6 and the original's code); each value is what the original used."""
    train_images: int = 1_281_167      # ImageNet-1k training set
    pgd_copies: tuple[int, ...] = (10, 30, 100)   # D''s PGD copies (steps each)
    eval_inputs: int = 10_000          # evaluation images (the original sampled 10,000 of the validation set)
    eval_sets: int = 4                 # clean, targeted PGD-10 at 8/255, PGD-10 and PGD-100 at 16/255
    eval_pgd_steps: tuple[int, ...] = (10, 10, 100)   # PGD steps of the three attacked sets
    k: int = 2048                      # neighbours per input
    closest_fraction: float = 0.2      # the closest int(0.2 K) are split ...
    val_fraction: float = 0.25         # ... ceil(25%) of them validate
    adapt_epochs: int = 100            # at most; the reproduction here ran all 100 on most inputs (median 100)
    calib_epochs: int = 14             # calibration's median epoch count in the reproduction here
    calib_holdout: float = 0.125       # of the K calibration examples
    image_px: int = 224
    feature_dim: int = 1024            # conv5_block1_preact_bn, pooled


def count_flops(arch: str = "resnet152v2", px: int = 224) -> dict[str, float]:
    """FLOPs per image (one multiply-add = 2 FLOPs): forward; forward + backward to the weights (a fine-tuning
    step); forward + backward to the input only (a PGD step)."""
    model = build_model(arch, 1000, 3).eval()
    return {"forward": flops(model, px, backward=False), "train_step": flops(model, px, backward=True),
            "input_gradient": flops(model, px, backward=False, to_input=True),
            "parameters": sum(p.numel() for p in model.parameters())}


def cost(flops: dict[str, float], s: Seed) -> dict[str, dict[str, float]]:
    """FLOPs and bytes of each stage of the seed's experiment."""
    fwd, step, grad = flops["forward"], flops["train_step"], flops["input_gradient"]
    dprime_rows = s.train_images * (1 + len(s.pgd_copies))
    closest = int(s.closest_fraction * s.k)
    val = math.ceil(s.val_fraction * closest)
    calib_val = math.ceil(s.calib_holdout * s.k)
    per_input = (s.adapt_epochs * ((s.k - val) * step + val * fwd)
                 + s.calib_epochs * ((s.k - calib_val) * step + calib_val * fwd) + fwd)
    inputs = s.eval_inputs * s.eval_sets
    state_bytes = 3 * 4 * flops["parameters"]   # weights + Adam's two moments, float32
    return {
        "D' (PGD copies + predictions)": {
            "flops": s.train_images * (sum(s.pgd_copies) * grad + len(s.pgd_copies) * fwd),
            "bytes": dprime_rows * 3 * s.image_px ** 2},
        "features of D' and inputs": {
            "flops": (dprime_rows + inputs) * fwd,
            "bytes": dprime_rows * s.feature_dim * 2},   # float16 on disk
        "evaluation sets (transfer PGD)": {
            "flops": s.eval_inputs * sum(n * grad for n in s.eval_pgd_steps),
            "bytes": inputs * 3 * s.image_px ** 2},
        "RMC, every input of every set": {
            "flops": inputs * per_input,
            "bytes": s.eval_sets * state_bytes},         # one online state per stream
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tflops", type=float, nargs="+", default=[400.0, 150.0],
                    help="sustained throughputs to price the work at, TFLOP/s (default: 400, about 40%% of an "
                         "H100's dense bf16 peak; 150, about half of an A100's)")
    ap.add_argument("--arch", default="resnet152v2")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    seed = Seed()
    flops = count_flops(args.arch, seed.image_px)
    stages = cost(flops, seed)
    total = sum(v["flops"] for v in stages.values())
    if args.json:
        print(json.dumps({"seed": asdict(seed), "per_image": flops, "stages": stages, "total_flops": total,
                          "gpu_hours": {str(t): total / (t * 1e12) / 3600 for t in args.tflops}}, indent=1))
        return 0
    print(f"{args.arch} at {seed.image_px} px, per image: forward {flops['forward'] / 1e9:.1f} GFLOP, "
          f"fine-tuning step {flops['train_step'] / 1e9:.1f} GFLOP, PGD step {flops['input_gradient'] / 1e9:.1f} "
          f"GFLOP; {flops['parameters'] / 1e6:.1f} M parameters")
    heads = " | ".join(f"GPU-hours at {t:g} TFLOP/s" for t in args.tflops)
    print(f"\n| stage | PFLOP | {heads} | storage |\n|---|---|" + "---|" * len(args.tflops) + "---|")
    for name, v in stages.items():
        hours = " | ".join(f"{v['flops'] / (t * 1e12) / 3600:,.1f}" for t in args.tflops)
        print(f"| {name} | {v['flops'] / 1e15:,.0f} | {hours} | {v['bytes'] / 1e9:,.1f} GB |")
    hours = " | ".join(f"**{total / (t * 1e12) / 3600:,.0f}**" for t in args.tflops)
    print(f"| **total** | {total / 1e15:,.0f} | {hours} | |")
    rmc = stages["RMC, every input of every set"]["flops"] / (seed.eval_inputs * seed.eval_sets)
    for t in args.tflops:
        per = rmc / (t * 1e12)
        print(f"\nAt {t:g} TFLOP/s one RMC input takes {per:.0f} s; an online stream is sequential, so one set's "
              f"{seed.eval_inputs:,} inputs take {per * seed.eval_inputs / 86400:.1f} days on one GPU (the "
              f"{seed.eval_sets} sets run as {seed.eval_sets} streams side by side, one GPU each).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
