"""Speed-up of episodic RMC evaluation from 1 to W local Ray workers, and Ray's fixed start-up cost.

    python benchmarks/ray_speedup.py --model M.safetensors --store DPRIME --features F.npy --evalsets SETS \
        [--n 40] [--k 256] [--max-epochs 2] [--workers 1 2] [--repeats 3]

Each repeat and worker count starts a fresh local Ray and times: ray.init ("init"), the first task on every worker
(process start-up, importing torch and rmc: "warm"), the evaluation itself ("evaluate": baselines on the driver,
shipping model/D'/features to the object store, every worker building its RMC, the RMC steps) and ray.shutdown.
"busy" is the sum of the per-input seconds the workers report: busy / evaluate is the parallelism achieved.
Every run's records must equal the first one's (episodic results do not depend on the split).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def _noop():
    import rmc.evaluation.driver  # noqa: F401 - what a worker imports before its first real task
    return os.getpid()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--store", required=True)
    ap.add_argument("--features", required=True)
    ap.add_argument("--evalsets", required=True)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--max-epochs", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import ray

    from rmc.artifacts.dprime import open_dprime_store
    from rmc.artifacts.evalsets import load_eval_sets
    from rmc.artifacts.features import load_features, store_source
    from rmc.cli.config import load_config
    from rmc.evaluation.common import BaseModel
    from rmc.evaluation.driver import evaluate
    from rmc.models import default_layer, load_checkpoint
    from rmc.scaleout.executors import connect

    cfg = load_config(None, "default", [("rmc.k", args.k), ("rmc.max_epochs", args.max_epochs),
                                        ("rmc.mode", "episodic")]).rmc
    store = open_dprime_store(args.store)
    model, info = load_checkpoint(args.model)
    layer = default_layer(model)
    feats = load_features(args.features, info.sha256, layer, store_source(store))[0].numpy()
    sets = load_eval_sets(args.evalsets)[:1]
    base = BaseModel("standard", model, info.sha256, layer, feats)
    dprime = store.dprime()
    work = Path(tempfile.mkdtemp(prefix="rmc-ray-bench-"))
    times: dict[int, list[float]] = {w: [] for w in args.workers}
    startup: list[float] = []
    reference = None
    print(f"load average at start: {os.getloadavg()}; {os.cpu_count()} CPUs; {sets[0].name}, n={args.n}, "
          f"k={args.k}, max_epochs={args.max_epochs}", flush=True)
    for rep in range(args.repeats):
        for w in args.workers:
            out = work / f"w{w}"
            shutil.rmtree(out, ignore_errors=True)
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            connect("local", workers=w)
            t1 = time.perf_counter()
            ray.get([ray.remote(_noop).remote() for _ in range(w)])
            t2 = time.perf_counter()
            res = evaluate([base], dprime, sets, cfg, out, info.num_classes, n=args.n, ray="local", workers=w,
                           progress=False)
            t3 = time.perf_counter()
            ray.shutdown()
            t4 = time.perf_counter()
            recs = res["standard"][sets[0].name]["rmc"]
            stripped = [{k: v for k, v in r.items() if k != "seconds"} for r in recs]
            reference = reference or stripped
            assert stripped == reference, "episodic records differ between worker counts"
            busy = sum(r["seconds"] for r in recs)
            times[w].append(t3 - t2)
            startup.append(t2 - t0)
            print(f"repeat {rep} workers {w}: init {t1 - t0:.1f} s, warm {t2 - t1:.1f} s, evaluate {t3 - t2:.1f} s "
                  f"(busy {busy:.1f} s, parallelism {busy / (t3 - t2):.2f}), shutdown {t4 - t3:.1f} s, "
                  f"load {load:.1f}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    med = {w: statistics.median(v) for w, v in times.items()}
    base_w = args.workers[0]
    for w in args.workers[1:]:
        pairs = [a / b for a, b in zip(times[base_w], times[w], strict=True)]
        print(f"speed-up {base_w} -> {w} workers: median times {med[base_w]:.1f} s -> {med[w]:.1f} s = "
              f"{med[base_w] / med[w]:.2f}x (per repeat: {', '.join(f'{p:.2f}' for p in pairs)})")
    print(f"Ray start-up (init + first task on each worker): median {statistics.median(startup):.1f} s, "
          f"range {min(startup):.1f}-{max(startup):.1f} s; load average now {os.getloadavg()}")


if __name__ == "__main__":
    main()
