"""One command for a user with a GPU: does RMC run there, and how fast (online latency, batched episodic)?

    python benchmarks/gpu_check.py                    # --device cuda (the point of it)
    python benchmarks/gpu_check.py --device cpu       # a smoke test anywhere (what CI-less machines can run)

Trains the small CNN briefly on Fashion-MNIST, builds a small D' (clean + one PGD-10 copy of `--dprime` training
images) on the device, then times, in one run:
  * online RMC at the default preset's settings (K, epochs, lr), per input, `--inputs` test inputs;
  * episodic RMC one input at a time against `BatchedEpisodic` with `--batch` inputs at once (vmap on a GPU),
    and whether their predictions agree.
Prints the figures (with the device's name) and writes them to `--out` as JSON. Nothing here has been measured on a
GPU by the project yet: the README says so, and this is how to measure it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from rmc.attacks.gradient import pgd  # noqa: E402
from rmc.cli.config import load_config  # noqa: E402
from rmc.data import load_dataset  # noqa: E402
from rmc.defense import DPrime, Mode, build_rmc  # noqa: E402
from rmc.defense.batched import BatchedEpisodic  # noqa: E402
from rmc.defense.forwards import compute_path  # noqa: E402
from rmc.defense.knn import NeighbourIndex  # noqa: E402
from rmc.models import extract_features  # noqa: E402
from rmc.training import TrainConfig, train_model  # noqa: E402

LAYER = "block3"   # the small CNN's feature layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dprime", type=int, default=4000, help="training images in D' (x2 with the PGD copy)")
    p.add_argument("--inputs", type=int, default=20, help="test inputs timed per measurement")
    p.add_argument("--batch", type=int, default=16, help="episodic inputs adapted at once")
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; pass --device cpu for the smoke test")
    rmc_cfg = load_config(preset="default").rmc
    train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
    t0 = time.perf_counter()
    model, info = train_model(train, test, TrainConfig(epochs=1, train_subset=10000, device=str(device)),
                              progress=False)
    log = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "train_seconds": round(time.perf_counter() - t0, 1), "test_accuracy": info.test_accuracy}
    x = train.float_images()[:args.dprime].to(device)
    y = train.labels[:args.dprime].to(device)
    adv = pgd(model, x, y, 0.1, 0.01, 10, generator=torch.Generator().manual_seed(0))
    images = (torch.cat([x, adv]) * 255).round().byte().cpu()
    dprime = DPrime(images, torch.cat([y, y]).cpu(), torch.cat([torch.zeros(len(x)), torch.ones(len(x))]).long(),
                    ["clean", "pgd10"])
    index = NeighbourIndex(extract_features(model, LAYER, images.to(device)).cpu().numpy())
    xs = test.float_images()[:max(args.inputs, args.batch)].to(device)
    feats = extract_features(model, LAYER, xs).cpu().numpy()

    online = build_rmc(model, dprime, index, rmc_cfg, LAYER)
    log["compute"] = compute_path(rmc_cfg, device)
    _sync(device)
    t0 = time.perf_counter()
    preds = [online.step(xs[i:i + 1], feats[i:i + 1]).prediction for i in range(args.inputs)]
    _sync(device)
    log["online_s_per_input"] = round((time.perf_counter() - t0) / args.inputs, 4)
    hits = sum(int(p == int(t)) for p, t in zip(preds, test.labels[:args.inputs], strict=True))
    log["online_accuracy"] = hits / args.inputs

    epi_cfg = type(rmc_cfg)(**{**rmc_cfg.__dict__, "mode": Mode.EPISODIC})
    one = build_rmc(model, dprime, index, epi_cfg, LAYER)
    b = args.batch
    t0 = time.perf_counter()
    single = [one.step(xs[i:i + 1], feats[i:i + 1], key=i).prediction for i in range(b)]
    _sync(device)
    t_one = time.perf_counter() - t0
    batched = BatchedEpisodic(build_rmc(model, dprime, index, epi_cfg, LAYER))
    t0 = time.perf_counter()
    together = [r.prediction for r in batched.run(xs[:b], feats[:b], list(range(b)))]
    _sync(device)
    t_batch = time.perf_counter() - t0
    log.update(episodic_one_at_a_time_s_per_input=round(t_one / b, 4),
               episodic_batched_s_per_input=round(t_batch / b, 4), batched_speedup=round(t_one / t_batch, 2),
               batched_agreement=sum(map(int.__eq__, single, together)) / b)
    args.out.write_text(json.dumps(log, indent=2) + "\n")
    for k, v in log.items():
        print(f"{k:34s} {v}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
