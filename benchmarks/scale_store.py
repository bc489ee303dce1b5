"""D' at scale on disk: build a synthetic 224-px D' of >= 100,000 images as shards, then gather K rows of one query.

    nice -n 10 python benchmarks/scale_store.py --dir /work/scratch/store/bench [--train 50000] [--chunk-size 2048]

The training set is a lazy synthetic one (50,000 images of 3 x 224 x 224 by default, made per read from a fixed bank
of random images: never whole in memory), the model a linear probe (average pooling to 8 x 8, one linear layer), and
D' is built by `build_dprime_store` itself: the clean copy plus one adversarial copy, 100,000 rows, about 15 GB. The
adversarial copy's pixels are the clean ones XOR 0x55 unless --pgd (then PGD-1 against the probe: on a CPU most of
the time is the attack's). Each phase runs in its own process, so its peak resident memory (VmHWM) is its own:

* build: peak RSS, wall time, the write rate of the shard writer (bytes / seconds inside StoreWriter.write_chunk:
  serialising, hashing, writing and fsync of each shard) and of the whole build;
* gather: K = 2048 rows drawn uniformly from D' (what the neighbours of one query cost when they are spread over
  D'), in a fresh process with nothing open: read as uint8 cold (the shards' pages evicted from the page cache by
  posix_fadvise(DONTNEED) on every shard: it evicts those files' clean pages and no other process's, where
  `echo 3 > /proc/sys/vm/drop_caches` would empty the whole machine's cache), then warm (the same rows again),
  then by `DPrime.gather` (warm, with the conversion to float that RMC's fine-tuning takes); with the number of
  shard files each read opened.

Prints one JSON object; deletes the store afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from proc_status import status_mb
from torch import nn

K = 2048


def _cpu_seconds() -> float:
    """CPU time this process has used (user + system): beside wall time, it shows how much of a shared machine the
    phase got."""
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return round(r.ru_utime + r.ru_stime, 1)


def synthetic_train(n: int, size: int = 224):
    """`n` images of 3 x size x size made per read: one of a bank of 64 random images, shifted by a per-row offset."""
    from rmc.data import ImageDataset, LazyImages

    class SyntheticImages(LazyImages):
        def __init__(self):
            super().__init__((n, 3, size, size))
            self.bank = np.random.default_rng(0).integers(0, 256, (64, 3, size, size), dtype=np.uint8)

        def _read(self, rows: np.ndarray) -> np.ndarray:
            return self.bank[rows % 64] + (rows // 64 % 251).astype(np.uint8)[:, None, None, None]

        def identity(self) -> str:
            return hashlib.sha256(f"synthetic:{n}:{size}".encode()).hexdigest()

    labels = torch.arange(n, dtype=torch.int64) % 10
    return ImageDataset(SyntheticImages(), labels, [str(i) for i in range(10)], "synthetic-224")


def build(args) -> dict:
    from rmc.artifacts import dprime as dprime_mod
    from rmc.artifacts.dprime import AugmentConfig, StoreWriter, build_dprime_store
    from rmc.models import ModelInfo
    torch.manual_seed(0)
    model = nn.Sequential(nn.AvgPool2d(28), nn.Flatten(), nn.Linear(3 * 8 * 8, 10)).eval()
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    info = ModelInfo("linear-probe", 10, (3, 224, 224), dataset="synthetic-224",
                     sha256=hashlib.sha256(weights).hexdigest())
    train = synthetic_train(args.train)
    cfg = AugmentConfig(steps=(1,), eps=8 / 255, step_size=2 / 255, chunk_size=args.chunk_size)
    spent = {"seconds": 0.0, "bytes": 0}
    real = StoreWriter.write_chunk

    def timed(self, task, data):
        t0 = time.perf_counter()
        real(self, task, data)
        spent["seconds"] += time.perf_counter() - t0
        spent["bytes"] += data.numel()

    StoreWriter.write_chunk = timed
    if not args.pgd:   # the store's work is measured: the adversarial copy's pixels are made without an attack
        dprime_mod.run_chunk = lambda model, task, images, labels, config: images ^ 0x55 if task.steps else images
    t0 = time.perf_counter()
    store = build_dprime_store(model, info, train, args.dir / "dprime", cfg, progress=not args.quiet)
    wall = time.perf_counter() - t0
    on_disk = sum(f.stat().st_size for f in store.path.rglob("*") if f.is_file())
    return {"pgd": args.pgd, "rows": len(store), "shards": store.manifest["shards"]["count"],
            "chunk_size": args.chunk_size, "bytes_on_disk": on_disk, "build_seconds": round(wall, 1),
            "build_cpu_seconds": _cpu_seconds(), "load_average_1min": round(os.getloadavg()[0], 1),
            "peak_rss_mb": round(status_mb("VmHWM")),
            "shard_writer_mb_per_s": round(spent["bytes"] / 2**20 / spent["seconds"], 1),
            "build_mb_per_s": round(on_disk / 2**20 / wall, 1), "format_version": dprime_mod.FORMAT_VERSION}


def evict(store: Path) -> str:
    """Drop the store's pages from the page cache, and only them (a global `drop_caches` would also empty the cache of
    every other process on a shared machine): posix_fadvise(DONTNEED) on each shard, which evicts a file's clean
    pages. Returns how much of the shards stayed cached, as `fincore` (util-linux) counts it where it is installed."""
    files = sorted((store / "shards").iterdir())
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if shutil.which("fincore") is None:
        return "posix_fadvise(DONTNEED) per shard"
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
                          capture_output=True, text=True)
    cached = sum(int(line.split()[0]) for line in done.stdout.splitlines() if line.strip())
    return f"posix_fadvise(DONTNEED) per shard; {cached} bytes of the shards still cached (fincore)"


def gather(args) -> dict:
    from rmc.artifacts import shards
    from rmc.artifacts.dprime import open_dprime_store
    path = args.dir / "dprime"
    how = evict(path)
    opened = []
    real = shards.open_shard
    shards.open_shard = lambda p, shape: opened.append(p.name) or real(p, shape)
    t0 = time.perf_counter()
    store = open_dprime_store(path)   # structure and small arrays; shards re-hashed only if they changed
    open_seconds = time.perf_counter() - t0
    dprime = store.dprime()
    rows = np.random.default_rng(1).choice(len(store), min(K, len(store)), replace=False)
    timed = {}
    for name, read in (("read_cold", lambda: store.images[rows]), ("read_warm", lambda: store.images[rows]),
                       ("gather_warm", lambda: dprime.gather(rows)[0])):
        t0 = time.perf_counter()
        x = read()
        timed[name] = round(time.perf_counter() - t0, 3)
        timed[f"files_opened_{name}"] = len(opened) - sum(v for k, v in timed.items() if k.startswith("files"))
    assert x.shape == (len(rows), 3, 224, 224) and x.dtype == torch.float32
    mb = len(rows) * 3 * 224 * 224 / 2**20
    return {"evicted_by": how, "open_seconds": round(open_seconds, 3), "k": len(rows), "mb_read": round(mb, 1), **timed,
            "read_cold_mb_per_s": round(mb / timed["read_cold"], 1),
            "shards_in_store": store.manifest["shards"]["count"], "load_average_1min": round(os.getloadavg()[0], 1),
            "gather_peak_rss_mb": round(status_mb("VmHWM"))}


def _child(phase: str, args) -> dict:
    cmd = [sys.executable, __file__, "--phase", phase, "--dir", str(args.dir), "--train", str(args.train),
           "--chunk-size", str(args.chunk_size)] + ["--quiet"] * args.quiet + ["--pgd"] * args.pgd
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{phase} failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, required=True, help="scratch folder for the store (deleted afterwards)")
    ap.add_argument("--train", type=int, default=50_000, help="synthetic training images (D' holds twice as many)")
    ap.add_argument("--chunk-size", type=int, default=2048, help="rows per chunk and shard (rmc augment's default)")
    ap.add_argument("--pgd", action="store_true",
                    help="make the adversarial copy by PGD-1 against the model (default: the clean pixels XOR 0x55, "
                         "so that the build measures the store, not the attack's CPU time)")
    ap.add_argument("--phase", choices=["build", "gather"], help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help="keep the store")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("RMC_CACHE_DIR", str(args.dir / "cache"))
    if args.phase:
        print(json.dumps(build(args) if args.phase == "build" else gather(args)))
        return
    need = args.train * 2 * 3 * 224 * 224
    free = shutil.disk_usage(args.dir if args.dir.exists() else args.dir.parent).free
    if free < need * 1.2:
        raise SystemExit(f"needs {need / 2**30:.1f} GiB free under {args.dir}, has {free / 2**30:.1f} GiB")
    args.dir.mkdir(parents=True, exist_ok=True)
    try:
        out = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
                          f"torch {torch.__version__}, load {os.getloadavg()[0]:.1f}",
               "build": _child("build", args), "gather": _child("gather", args)}
    finally:
        if not args.keep:
            shutil.rmtree(args.dir / "dprime", ignore_errors=True)
            shutil.rmtree(args.dir / "dprime.partial", ignore_errors=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
