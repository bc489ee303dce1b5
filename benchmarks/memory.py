"""Peak resident memory of rmc evaluating against the 240k-image D' (run by bench.py in its own process).

Opens D' as the pipeline does (images memory-mapped uint8, features memory-mapped float32), builds the exact FAISS
index, searches all test inputs at once, then runs online RMC (default-run settings) on `--steps` inputs. Prints one
JSON line: resident memory (MB) after each stage and the peak (VmHWM), with the sizes of the files involved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from proc_status import status_mb


def rss_mb() -> float:
    return status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM; unlike ru_maxrss it does not inherit the parent's peak)."""
    return status_mb("VmHWM")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import faiss
    faiss.omp_set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import DEFAULT_RUN, LAYER, get_model, make_bank, run_cfg, test_inputs

    from rmc.defense import build_rmc
    from rmc.defense.knn import NeighbourIndex
    stages = {"start": rss_mb()}
    peaks = {}
    model, _ = get_model(args.workdir)
    images = np.load(args.workdir / "images.npy", mmap_mode="c")
    labels, copies = np.load(args.workdir / "labels.npy"), np.load(args.workdir / "copy.npy")
    feats = np.load(args.workdir / "features.npy", mmap_mode="c")
    dprime = make_bank(images, labels, copies)
    stages["opened"] = rss_mb()
    peaks["opened"] = peak_rss_mb()
    index = NeighbourIndex(feats)
    stages["index"] = rss_mb()
    peaks["index"] = peak_rss_mb()
    del feats                       # the index holds the only copy the search needs
    stages["index_features_unmapped"] = rss_mb()
    peaks["index_features_unmapped"] = peak_rss_mb()
    x, y, q = test_inputs(max(args.steps, 100), model, LAYER)
    rows = index.search(q, DEFAULT_RUN["k"])[1]
    stages["searched"] = rss_mb()
    peaks["searched"] = peak_rss_mb()
    rmc = build_rmc(model, dprime, index, run_cfg(), LAYER)
    for i in range(args.steps):
        rmc.step(x[i:i + 1], q[i:i + 1], key=i, rows=rows[i])
    stages["after_steps"] = rss_mb()
    peaks["after_steps"] = peak_rss_mb()
    out = {"dprime": len(images), "steps": args.steps, "rss_mb": {k: round(v, 1) for k, v in stages.items()},
           "peak_rss_mb": round(peak_rss_mb(), 1), "peak_after_mb": {k: round(v, 1) for k, v in peaks.items()},
           "images_file_mb": round(images.nbytes / 2 ** 20, 1),
           "features_mb": round(len(images) * 128 * 4 / 2 ** 20, 1)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
