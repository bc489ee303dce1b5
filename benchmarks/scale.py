"""D''s features and neighbour index at the seed's scale: a synthetic 5.1 M x 1024 feature matrix streamed to disk,
an IVF index built in batches from it, queries, and recall against exact search.

    nice -n 10 python benchmarks/scale.py --dir /work/scratch/index                       # 5.1 M rows, ivfpq
    nice -n 10 python benchmarks/scale.py --rows 1000000 --kinds ivf ivfpq --dir ...     # 1 M rows, both kinds
    python benchmarks/scale.py --quick --dir /tmp/scale                                  # a smoke test (~1 min)

Every phase runs in its own process, so each peak is its own: the feature write (rmc.artifacts.features.
FeatureWriter, the writer `rmc features` streams D' with), the index build (rmc.artifacts.index.open_index: trained on
a seeded sample, filled 100,000 rows at a time), a query (the saved index read back memory-mapped, the K = 2048
candidates re-ranked from the memory-mapped features), recall on a `--subset` row matrix (the index against exact
flat search over the same rows) and recall on all rows (exact top-K by one streaming pass over the file).

Memory is reported two ways: the peak of anonymous memory (sampled every 20 ms: what the process itself holds) and
VmHWM (the kernel's peak resident set, which also counts the pages of memory-mapped files, i.e. page cache the
kernel can drop at any time). The bound (`--bound-gb`, 4 GB) is asserted on anonymous memory for the write, the
IVF-PQ build and the queries; an IVF-Flat build holds its index (N x d x 4 bytes, its lists grown geometrically while
adding: up to 1.5 times that) and is bounded by 1.5 x N x d x 4 bytes plus 1 GB.

The features are a Gaussian mixture with low intrinsic dimension: 1,000 clusters whose centres lie in a 16-d
subspace (so that some clusters are nearer each other than others, as classes are), each spread over a shared 64-d
subspace, plus small isotropic noise. Neighbours are then meaningful at every size, so recall says something (with
centres drawn at random in all 1024 dimensions every other cluster is equally far, and the K = 2048 neighbours of a
200,000-row matrix, 10 clusters' worth, are an arbitrary pick among near-ties). Real features are not this either:
measure recall on them (rmc records the index settings with every result).
Writes a JSON of the figures to `--out`. The files under `--dir` are deleted at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

import numpy as np  # noqa: E402
from proc_status import status_bytes  # noqa: E402

from rmc.errors import RMCError  # noqa: E402

# The mixture (see the docstring): cluster centres in a 16-d subspace (per-coordinate std 1), points spread over a
# 64-d subspace (std 0.7) plus isotropic noise (0.1).
CLUSTERS, CENTRE_DIM, INTRINSIC, SPREAD, NOISE = 1000, 16, 64, 0.7, 0.1
BLOCK = 65536                                               # rows generated and written per step
GB = 1 << 30


class PeakMemory:
    """Peak anonymous memory of this process (RssAnon, sampled) and VmHWM, in GB."""

    def __init__(self, every: float = 0.02):
        self.peak, self.every, self._stop = 0, every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status(key: str) -> int:
        return status_bytes(key) or 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.status("RssAnon"))
            time.sleep(self.every)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.status("RssAnon"))

    def report(self) -> dict:
        return {"peak_anon_gb": round(self.peak / GB, 3), "vmhwm_gb": round(self.status("VmHWM") / GB, 3)}


def mixture(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0])
    centre_space = rng.standard_normal((CENTRE_DIM, dim), dtype=np.float32) * np.float32(1 / np.sqrt(CENTRE_DIM))
    centers = rng.standard_normal((CLUSTERS, CENTRE_DIM), dtype=np.float32) @ centre_space
    basis = rng.standard_normal((INTRINSIC, dim), dtype=np.float32) * np.float32(SPREAD / np.sqrt(INTRINSIC))
    return centers, basis


def draw(centers: np.ndarray, basis: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    c = rng.integers(len(centers), size=n)
    x = centers[c] + rng.standard_normal((n, len(basis)), dtype=np.float32) @ basis
    x += np.float32(NOISE) * rng.standard_normal(x.shape, dtype=np.float32)
    return x


def queries(dim: int, n: int) -> np.ndarray:
    centers, basis = mixture(dim)
    return draw(centers, basis, n, np.random.default_rng([1, 1]))   # not rows of the matrix: fresh draws


# ---------------------------------------------------------------- phases (each in its own process)

def cpu_seconds() -> float:
    """CPU time of this process so far (all its threads), which the other processes on a shared machine do not
    inflate the way they inflate wall time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return round(r.ru_utime + r.ru_stime, 1)


def phase_write(a: dict) -> dict:
    from rmc.artifacts.features import FORMAT, FeatureWriter, load_features
    centers, basis = mixture(a["dim"])
    identity = {"model_sha256": "synthetic", "layer": "synthetic", "source": f"synthetic:{a['dim']}",
                "batch_size": BLOCK}
    try:
        prov = load_features(a["path"], "synthetic", "synthetic", f"synthetic:{a['dim']}", expect_dtype=a["dtype"],
                             mmap=True)[1]
        if prov["count"] == a["rows"]:
            return {"reused": True}       # written by an earlier run (--keep): its figures are in that run's output
    except RMCError:
        pass
    t0 = time.perf_counter()
    writing = 0.0                       # time in the writer (the rest makes the synthetic rows)
    with PeakMemory() as mem:
        with FeatureWriter(a["path"], a["rows"], a["dtype"], identity) as w:
            for first in range(w.start, a["rows"], BLOCK):
                n = min(BLOCK, a["rows"] - first)
                block = draw(centers, basis, n, np.random.default_rng([0, 2, first]))
                t1 = time.perf_counter()
                w.write(first, block)
                writing += time.perf_counter() - t1
        t1 = time.perf_counter()
        w.finish({"format": FORMAT, **identity})   # hashes the file (its sha256 goes in the sidecar)
        finish = time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    size = Path(a["path"]).stat().st_size
    return {"seconds": round(seconds, 1), "cpu_seconds": cpu_seconds(), "bytes": size,
            "writer_seconds": round(writing, 1), "writer_mb_s": round(size / 2 ** 20 / writing, 1),
            "finish_hash_seconds": round(finish, 1), **mem.report()}


def _config(a: dict):
    from rmc.defense.knn import IndexConfig
    return IndexConfig(index=a["kind"], nprobe=a["nprobe"], rerank=a["rerank"], pq_m=a["pq_m"])


class OutOfBudget(Exception):
    pass


def phase_build(a: dict) -> dict:
    """open_index's build, timed: training, then each batch added; stopped after `budget` seconds of wall time (the
    figures so far are returned: how far it went, and its rate)."""
    import faiss

    from rmc.artifacts import index as index_mod
    cfg = _config(a)
    t0, marks = time.perf_counter(), []       # (seconds since start, rows added, CPU seconds) after each step
    real_build = index_mod.build_ivf

    def build(vectors, settings, add_batch, progress):
        def step(rows):
            progress(rows)
            marks.append((time.perf_counter() - t0, rows, cpu_seconds()))
            if a.get("budget") and marks[-1][0] > a["budget"]:
                raise OutOfBudget
        return real_build(vectors, settings, add_batch, step)
    index_mod.build_ivf = build
    out: dict = {"threads": faiss.omp_get_max_threads()}
    with PeakMemory() as mem:
        try:
            index = index_mod.open_index(a["path"], cfg)
            settings = cfg.build_settings(index.size, index.dim)
            out.update(complete=True, index_bytes=index_mod.index_path(a["path"], settings).stat().st_size,
                       settings=settings)
        except OutOfBudget:
            out.update(complete=False)
    seconds = time.perf_counter() - t0
    if marks:
        (t_train, _, c_train), added = marks[0], sum(r for _, r, _ in marks)
        t_add, c_add = marks[-1][0] - t_train, marks[-1][2] - c_train
        out.update(train_seconds=round(t_train, 1), train_cpu_seconds=c_train, rows_added=added,
                   add_seconds=round(t_add, 1), add_cpu_seconds=round(c_add, 1),
                   add_rows_per_cpu_second=round(added / c_add, 1) if c_add else None)
    return {"seconds": round(seconds, 1), "cpu_seconds": cpu_seconds(), **out, **mem.report()}


def phase_query(a: dict) -> dict:
    from rmc.artifacts.index import open_index
    q = queries(a["dim"], 256)
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        index = open_index(a["path"], _config(a))          # the saved index: verified, read back memory-mapped
        opened = time.perf_counter() - t0
        index.search(q[:1], a["k"])                        # first touch of the lists and the feature pages
        one = []
        for i in range(1, 21):
            t0 = time.perf_counter()
            index.search(q[i:i + 1], a["k"])
            one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        index.search(q[:256], a["k"])
        batch = (time.perf_counter() - t0) / 256
    return {"open_seconds": round(opened, 2), "one_query_s": round(float(np.median(one)), 4),
            "batch_256_s_per_query": round(batch, 4), "cpu_seconds": cpu_seconds(), **mem.report()}


def _exact_topk(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows per query by one streaming pass over `vectors` (ties: lower row), float32 distances."""
    best_d = np.full((len(q), 0), np.inf, np.float32)
    best_r = np.empty((len(q), 0), np.int64)
    qq = (q * q).sum(1)[:, None]
    for start in range(0, len(vectors), BLOCK):
        v = np.asarray(vectors[start:start + BLOCK], dtype=np.float32)
        d = qq - 2 * q @ v.T + (v * v).sum(1)[None]
        rows = np.broadcast_to(np.arange(start, start + len(v)), d.shape)
        d, rows = np.concatenate([best_d, d], 1), np.concatenate([best_r, rows], 1)
        keep = np.argpartition(d, min(k, d.shape[1] - 1), axis=1)[:, :k]
        best_d, best_r = np.take_along_axis(d, keep, 1), np.take_along_axis(rows, keep, 1)
    return best_r


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(a, e)) / len(e) for a, e in zip(approx, exact, strict=True)]))


def phase_recall(a: dict) -> dict:
    """Recall of the index's K neighbours against exact flat search over the same rows (the --subset file), and the
    flat index's own latency there (what `knn.index: auto` weighs)."""
    from rmc.artifacts.features import load_features
    from rmc.artifacts.index import open_index
    from rmc.defense.knn import NeighbourIndex
    q = queries(a["dim"], a["queries"])
    feats = load_features(a["path"], mmap=True)[0].numpy()
    t0 = time.perf_counter()
    flat = NeighbourIndex(feats)
    flat_build = time.perf_counter() - t0
    exact = flat.search(q, a["k"])[1]
    t0 = time.perf_counter()
    for i in range(5):
        flat.search(q[i:i + 1], a["k"])
    flat_one = (time.perf_counter() - t0) / 5
    del flat
    t0 = time.perf_counter()
    index = open_index(a["path"], _config(a))
    build = time.perf_counter() - t0
    approx = index.search(q, a["k"])[1]
    return {"rows": len(feats), "queries": len(q), "recall": round(_recall(approx, exact), 4),
            "index_build_seconds": round(build, 1), "flat_build_seconds": round(flat_build, 1),
            "flat_one_query_s": round(flat_one, 4)}


def phase_recall_full(a: dict) -> dict:
    """Recall on all rows, for a few queries: exact top-K by a streaming pass over the memory-mapped file."""
    from rmc.artifacts.features import load_features
    from rmc.artifacts.index import open_index
    q = queries(a["dim"], a["queries"])
    with PeakMemory() as mem:
        feats = load_features(a["path"], mmap=True)[0].numpy()
        t0 = time.perf_counter()
        exact = _exact_topk(feats, q, a["k"])
        scan = time.perf_counter() - t0
        approx = open_index(a["path"], _config(a)).search(q, a["k"])[1]
    return {"queries": len(q), "recall": round(_recall(approx, exact), 4), "exact_scan_seconds": round(scan, 1),
            **mem.report()}


def phase_flat(a: dict) -> dict:
    """The exact flat index over the first `rows` rows (what `knn.index: auto` picks below knn.flat_max_mb): its
    memory (a float32 copy) and query time, one query and a batch of 64."""
    from rmc.artifacts.features import load_features
    from rmc.defense.knn import NeighbourIndex
    q = queries(a["dim"], 65)
    with PeakMemory() as mem:
        feats = load_features(a["path"], mmap=True)[0].numpy()[:a["rows"]]
        t0 = time.perf_counter()
        flat = NeighbourIndex(feats)
        build = time.perf_counter() - t0
        flat.search(q[:1], a["k"])
        t0 = time.perf_counter()
        for i in range(1, 6):
            flat.search(q[i:i + 1], a["k"])
        one = (time.perf_counter() - t0) / 5
        t0 = time.perf_counter()
        flat.search(q[1:], a["k"])
        batch = (time.perf_counter() - t0) / 64
    return {"rows": a["rows"], "float32_gb": round(a["rows"] * a["dim"] * 4 / GB, 2), "build_seconds": round(build, 1),
            "one_query_s": round(one, 4), "batch_64_s_per_query": round(batch, 4), **mem.report()}


PHASES = {"flat": phase_flat, "write": phase_write, "build": phase_build, "query": phase_query, "recall": phase_recall,
          "recall_full": phase_recall_full}


def run_phase(name: str, a: dict, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, __file__, "--phase", name, json.dumps(a)], env=env, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"  {name:12s} {json.dumps(result)}", flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=5_100_000, help="rows of the feature matrix (the seed's D': 5.1 M)")
    p.add_argument("--dim", type=int, default=1024, help="feature dimension (ResNet-152 v2's feature layer: 1024)")
    p.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    p.add_argument("--kinds", nargs="+", default=["ivfpq"], choices=("ivf", "ivfpq"))
    p.add_argument("--subset", type=int, default=200_000, help="rows of the recall matrix (exact flat search there)")
    p.add_argument("--k", type=int, default=2048)
    p.add_argument("--queries", type=int, default=64, help="queries of the subset recall (16 on all rows)")
    p.add_argument("--nprobe", type=int, default=64)
    p.add_argument("--rerank", type=int, default=2048)
    p.add_argument("--pq-m", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bound-gb", type=float, default=4.0, help="asserted peak anonymous memory per phase")
    p.add_argument("--dir", type=Path, default=Path("/tmp/rmc-scale"))
    p.add_argument("--out", type=Path, default=Path("scale-results.json"))
    p.add_argument("--skip-full-recall", action="store_true", help="no exact pass over all rows")
    p.add_argument("--flat-rows", type=int, nargs="*", default=[200_000, 500_000],
                   help="rows of the exact flat index measured (the first rows of the matrix)")
    p.add_argument("--build-budget", type=float, help="stop an index build after this many seconds (its rate so far "
                   "is reported, the later phases of that kind skipped)")
    p.add_argument("--keep", action="store_true", help="keep the files under --dir")
    p.add_argument("--quick", action="store_true", help="a smoke test: 60,000 x 256 rows, subset 20,000, K 256")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.phase:
        print(json.dumps(PHASES[args.phase](json.loads(rest[0]))))
        return
    if args.quick:
        args.rows, args.dim, args.subset, args.k = 60_000, 256, 20_000, 256
        args.queries, args.rerank, args.pq_m, args.flat_rows = 16, 256, 32, [20_000]
    need = args.rows * args.dim * np.dtype(args.dtype).itemsize
    free = shutil.disk_usage(args.dir if args.dir.exists() else args.dir.parent).free
    if free < 1.6 * need:
        raise SystemExit(f"{args.dir}: {free / GB:.1f} GB free, the run needs about {1.6 * need / GB:.1f} GB")
    args.dir.mkdir(parents=True, exist_ok=True)
    import torch
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "load_before": os.getloadavg()[0]}
    results: dict = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items() if k != "phase"}}
    common = {"dim": args.dim, "k": args.k, "nprobe": args.nprobe, "rerank": args.rerank, "pq_m": args.pq_m}
    full, sub = args.dir / "full.npy", args.dir / "subset.npy"
    try:
        print(f"{args.rows:,} x {args.dim} {args.dtype} ({need / GB:.1f} GB) under {args.dir}", flush=True)
        results["write"] = run_phase("write", {**common, "path": str(full), "rows": args.rows, "dtype": args.dtype},
                                     args.threads)
        results["write_subset"] = run_phase("write", {**common, "path": str(sub), "rows": args.subset,
                                                      "dtype": args.dtype}, args.threads)
        assert results["write"].get("peak_anon_gb", 0) < args.bound_gb, results["write"]
        results["flat"] = [run_phase("flat", {**common, "path": str(full), "rows": min(r, args.rows)}, args.threads)
                           for r in args.flat_rows]
        for kind in args.kinds:
            a = {**common, "path": str(full), "kind": kind, "queries": 16, "budget": args.build_budget}
            r = results[kind] = {"build": run_phase("build", a, args.threads)}
            # IVF-Flat holds its lists, the float32 vectors, and FAISS grows each list geometrically while adding
            bound = args.bound_gb if kind == "ivfpq" else 1.5 * args.rows * args.dim * 4 / GB + 1
            r["build_bound_gb"] = round(bound, 2)
            assert r["build"]["peak_anon_gb"] < bound, (kind, r["build"], bound)
            if not r["build"]["complete"]:
                continue
            r["query"] = run_phase("query", a, args.threads)
            assert r["query"]["peak_anon_gb"] < args.bound_gb, (kind, r["query"])
            r["recall_subset"] = run_phase("recall", {**a, "path": str(sub), "queries": args.queries}, args.threads)
            if not args.skip_full_recall:
                r["recall_full"] = run_phase("recall_full", a, args.threads)
        machine["load_after"] = os.getloadavg()[0]
    finally:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep:
            for f in list(args.dir.iterdir()):
                if f.name.startswith(("full", "subset", ".full", ".subset")):
                    f.unlink()
    print(f"written to {args.out}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
