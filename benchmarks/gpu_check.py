"""One command for a user with a GPU: does RMC run there, and how fast (every GPU-facing part in one run)?

    python benchmarks/gpu_check.py                    # --device cuda (the point of it)
    python benchmarks/gpu_check.py --dry              # the whole script on the CPU at toy sizes (~30 s; tests run it)
    python benchmarks/gpu_check.py --device cpu       # the same sizes as on the GPU, on the CPU (slow)

Trains the small CNN briefly (Fashion-MNIST; the sklearn digits or random images where it is missing), then times:
  * the D' build: clean + one PGD-10 copy of `--dprime` training images, crafted on the device;
  * D''s features, fp32 NCHW against the device's defaults (`features.precision: auto`, `features.channels_last`:
    bf16 autocast and channels-last on a GPU, fp32 NCHW on a CPU): images per second, the largest relative
    difference, and how many of each input's K neighbours the two agree on;
  * online RMC at the default preset's settings (K, epochs, lr), per input, `--inputs` test inputs, under
    `rmc.precision: fp32` and `auto` (bf16 on a GPU with native bfloat16);
  * episodic RMC one input at a time against `BatchedEpisodic` with `--batch` inputs at once (vmap on a GPU),
    and whether their predictions agree;
  * the neighbour index on the machine's CPUs: an IVF-PQ index over `--index-rows` synthetic 1024-d features built
    in batches, one query, and its recall against exact search (benchmarks/scale.py does this at 5.1 M rows).
Prints the figures (with the device's name) and writes them to `--out` as JSON. Nothing here has been measured on a
GPU by the project yet: docs/scale.md says so, and this is how to measure it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from rmc.artifacts.features import FeatureConfig, compute_features  # noqa: E402
from rmc.attacks.gradient import pgd  # noqa: E402
from rmc.cli.config import load_config  # noqa: E402
from rmc.data import load_dataset  # noqa: E402
from rmc.data.base import ImageDataset  # noqa: E402
from rmc.defense import DPrime, Mode, build_rmc  # noqa: E402
from rmc.defense.batched import BatchedEpisodic  # noqa: E402
from rmc.defense.forwards import compute_path  # noqa: E402
from rmc.defense.knn import NeighbourIndex  # noqa: E402
from rmc.errors import RMCError  # noqa: E402
from rmc.models import extract_features  # noqa: E402
from rmc.training import TrainConfig, train_model  # noqa: E402

LAYER = "block3"   # the small CNN's feature layer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn, *args, **kwargs):
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    _sync(device)
    return out, time.perf_counter() - t0


def _data(name: str) -> tuple[ImageDataset, ImageDataset, str]:
    """The training and test sets (`name`, else the digits, else random images: timings only)."""
    for candidate in ([name, "digits"] if name != "synthetic" else []):
        try:
            return load_dataset(candidate, "train"), load_dataset(candidate, "test"), candidate
        except (RMCError, ImportError, OSError):
            continue
    gen = torch.Generator().manual_seed(0)
    make = lambda n: ImageDataset(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen),  # noqa: E731
                                  torch.randint(0, 10, (n,), generator=gen), "synthetic", [str(c) for c in range(10)])
    return make(12000), make(1000), "synthetic"


def _index_check(rows: int, dim: int, k: int, pq_bits: int = 8) -> dict:
    """IVF-PQ over a synthetic Gaussian mixture on this machine's CPUs: build, one query, recall@k vs exact."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((100, dim), dtype=np.float32)
    def draw(n):  # noqa: E306
        return centers[rng.integers(100, size=n)] + 0.5 * rng.standard_normal((n, dim), dtype=np.float32)
    x, q = draw(rows), draw(16)
    exact = NeighbourIndex(x).search(q, k)[1]
    t0 = time.perf_counter()
    index = NeighbourIndex(x, "ivfpq", nlist=max(16, int(2 * np.sqrt(rows))), nprobe=64, rerank=k,
                           pq_m=64 if dim % 64 == 0 else 8, pq_bits=pq_bits)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx = index.search(q[:1], k)[1]
    one = time.perf_counter() - t0
    approx = index.search(q, k)[1]
    recall = float(np.mean([len(np.intersect1d(a, e)) / k for a, e in zip(approx, exact, strict=True)]))
    return {"rows": rows, "dim": dim, "k": k, "build_s": round(build, 2), "one_query_s": round(one, 4),
            "recall": round(recall, 4), "cpu_threads": os.cpu_count()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--data", default="fashion-mnist", help="training data (fashion-mnist | digits | synthetic)")
    p.add_argument("--dprime", type=int, default=4000, help="training images in D' (x2 with the PGD copy)")
    p.add_argument("--inputs", type=int, default=20, help="test inputs timed per measurement")
    p.add_argument("--batch", type=int, default=16, help="episodic inputs adapted at once")
    p.add_argument("--index-rows", type=int, default=200_000, help="rows of the synthetic index check")
    p.add_argument("--dry", action="store_true", help="the whole check on the CPU at toy sizes (a smoke test)")
    p.add_argument("--out", type=Path, default=Path("gpu-check.json"))
    args = p.parse_args()
    if args.dry:
        args.device, args.data, args.dprime, args.inputs, args.batch, args.index_rows = "cpu", "digits", 300, 2, 2, 3000
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available here; pass --dry (or --device cpu) for the smoke test")
    rmc_cfg = load_config(preset="default").rmc
    if args.dry:
        rmc_cfg = dataclasses.replace(rmc_cfg, k=32, calib_k=16, max_epochs=1)
    train, test, data = _data(args.data)
    model, info = _timed(device, train_model, train, test,
                         TrainConfig(epochs=1, train_subset=min(10000, len(train)), device=str(device)),
                         progress=False)[0]
    log = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "data": data, "torch": torch.__version__, "test_accuracy": info.test_accuracy}

    n = min(args.dprime, len(train))
    x = train.float_images()[:n].to(device)
    y = train.labels[:n].to(device)
    adv, t = _timed(device, pgd, model, x, y, 0.1, 0.01, 10, generator=torch.Generator().manual_seed(0))
    log["dprime_pgd10_img_per_s"] = round(n / t, 1)
    images = (torch.cat([x, adv]) * 255).round().byte().cpu()
    dprime = DPrime(images, torch.cat([y, y]).cpu(), torch.cat([torch.zeros(n), torch.ones(n)]).long(),
                    ["clean", "pgd10"])

    fp32, t32 = _timed(device, compute_features, model, info, LAYER, images,
                       config=FeatureConfig(precision="fp32", channels_last=False))
    fast_cfg = FeatureConfig()
    fast, tfast = _timed(device, compute_features, model, info, LAYER, images, config=fast_cfg)
    k = min(rmc_cfg.k, len(images))
    q = fp32[:min(64, len(fp32))]
    agree = [len(np.intersect1d(a, b)) / k for a, b in
             zip(NeighbourIndex(fp32).search(q, k)[1], NeighbourIndex(fast).search(q, k)[1], strict=True)]
    rel = ((fast - fp32).norm(dim=1) / fp32.norm(dim=1).clamp_min(1e-12)).max()
    log.update(features_fp32_img_per_s=round(len(images) / t32, 1),
               features_default_img_per_s=round(len(images) / tfast, 1),
               features_default=f"{'bf16' if device.type == 'cuda' and fast_cfg.precision == 'auto' else 'fp32'}"
                                f"/{'nhwc' if device.type == 'cuda' else 'nchw'}",
               features_max_rel_diff=float(f"{float(rel):.3g}"), features_knn_agreement=round(float(np.mean(agree)), 4))

    index = NeighbourIndex(fp32.numpy())
    xs = test.float_images()[:max(args.inputs, args.batch)].to(device)
    feats = extract_features(model, LAYER, xs).cpu().numpy()
    for precision in ("fp32", "auto"):
        cfg = dataclasses.replace(rmc_cfg, precision=precision)
        online = build_rmc(model, dprime, index, cfg, LAYER)
        log[f"compute_{precision}"] = compute_path(cfg, device)
        preds, t = _timed(device, lambda rmc: [rmc.step(xs[i:i + 1], feats[i:i + 1]).prediction
                                               for i in range(args.inputs)], online)
        log[f"online_{precision}_s_per_input"] = round(t / args.inputs, 4)
        hits = sum(int(p == int(label)) for p, label in zip(preds, test.labels[:args.inputs], strict=True))
        log[f"online_{precision}_accuracy"] = hits / args.inputs

    epi_cfg = dataclasses.replace(rmc_cfg, mode=Mode.EPISODIC)
    one = build_rmc(model, dprime, index, epi_cfg, LAYER)
    b = args.batch
    single, t_one = _timed(device, lambda: [one.step(xs[i:i + 1], feats[i:i + 1], key=i).prediction for i in range(b)])
    batched = BatchedEpisodic(build_rmc(model, dprime, index, epi_cfg, LAYER))
    together, t_batch = _timed(device, lambda: [r.prediction for r in batched.run(xs[:b], feats[:b], list(range(b)))])
    log.update(episodic_one_at_a_time_s_per_input=round(t_one / b, 4),
               episodic_batched_s_per_input=round(t_batch / b, 4), batched_speedup=round(t_one / t_batch, 2),
               batched_agreement=sum(map(int.__eq__, single, together)) / b)
    log["index"] = _index_check(args.index_rows, *((64, 64, 5) if args.dry else (1024, 2048, 8)))
    args.out.write_text(json.dumps(log, indent=2) + "\n")
    for key, v in log.items():
        print(f"{key:36s} {v}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
