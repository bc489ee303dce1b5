"""Scale-out on Ray: sharded augmentation and evaluation that survive worker failures.

Ray is an optional extra (`pip install rmc[ray]`); nothing here imports it until `--ray` is used.

* `connect(address)` starts a local Ray (address None or "local") or joins an existing cluster ("auto",
  "HOST:6379", "ray://HOST:10001"). `session()` does the same and shuts down a Ray it started.
* Augmentation: every PGD chunk of `rmc.artifacts.dprime.chunk_tasks` is a Ray task that runs `run_chunk` on a worker and
  returns the chunk's uint8 images; the DRIVER writes them through `StoreWriter`, so the store, its manifest and
  its resume points are exactly those of the single-process `build_dprime_store` (byte-identical for the same seed).
* Evaluation: the baselines are computed on the driver (one batched neighbour search). RMC's per-input work is cut
  into tasks. Episodic mode: a task is a block of input positions; every input's randomness comes from its own key,
  so any split gives the single-process results. Online mode: the test stream of each evaluation set is cut into S
  contiguous streams (`shards`), each with its own RMC state and its own record stream on disk; a stream is
  processed in sequential segments (the state travels with the segment), the streams and the sets in parallel.
  Online results depend on S (S = 1 gives the single-process results); S is recorded in the stream files' names,
  fingerprints and records, and by the commands in results.json.
* Fault tolerance: tasks are retried by Ray (`max_retries`) when their worker dies; a task's result reaches the
  driver once, and only the driver writes, so no example is lost or counted twice. The driver appends results in
  input order through `RecordStream` (episodic blocks that finish early wait in memory), so an interrupted driver
  resumes from what is on disk, with or without Ray.

Test-only hook: when the environment variable RMC_TEST_CRASH_DIR names a folder holding a file `augment` or
`evaluate`, the first task of that kind to see it renames it and kills its own worker process mid-task.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from rmc.defense.core import RMC, DPrime, Mode, RMCConfig
from rmc.data.base import ImageDataset
from rmc.errors import RMCError
from rmc.evaluation.records import RecordStream
from rmc.evaluation.driver import BaseModel, NeighbourSearch, _digest, evaluate_set, stream_fingerprint
from rmc.defense.knn import NeighbourIndex
from rmc.models import extract_features
from rmc.models.checkpoint import ModelInfo
from rmc.artifacts.dprime import AugmentConfig, DPrimeStore, ChunkTask, StoreWriter, run_chunk

LOCAL = "local"            # --ray with no address: start a Ray on this machine
MAX_RETRIES = 3            # Ray re-runs a task whose worker died this many times before giving up
CRASH_ENV = "RMC_TEST_CRASH_DIR"
MAX_BLOCK = 16             # inputs per evaluation task at most (the resume granularity of online streams)


def _ray():
    try:
        import ray
    except ImportError:
        raise RMCError("--ray needs Ray, an optional extra: pip install 'rmc[ray]'") from None
    return ray


# ---------------------------------------------------------------- connection

def connect(address: str | None = LOCAL, workers: int | None = None) -> int:
    """Join Ray and return the number of worker slots (CPUs, at most `workers`). A running connection is reused.

    address None or "local": start Ray on this machine with `workers` CPUs (default: all cores); anything else is
    passed to `ray.init(address=...)`: "auto" (a cluster started on this machine with `ray start --head`),
    "HOST:6379", or a Ray client address "ray://HOST:10001". Environment variables named RMC_* are forwarded to
    the workers.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise RMCError(f"--workers must be a whole number >= 1, got {workers!r}")
    ray = _ray()
    if not ray.is_initialized():
        env = {k: v for k, v in os.environ.items() if k.startswith("RMC_")}
        kwargs: dict[str, Any] = dict(log_to_driver=False, logging_level=logging.WARNING,
                                      runtime_env={"env_vars": env} if env else None)
        local = address in (None, "", LOCAL)
        try:
            if local:
                ray.init(num_cpus=workers or os.cpu_count() or 1, include_dashboard=False, **kwargs)
            else:
                ray.init(address=address, **kwargs)
        except ConnectionError as e:
            raise RMCError(f"cannot reach a Ray cluster at {address!r} ({e}); start one with `ray start --head` "
                           "and pass the address it prints, or use --ray alone for a local Ray. A cluster with token "
                           "authentication (the default of `ray start` in recent Ray) also needs RAY_AUTH_MODE=token "
                           "and its token (~/.ray/auth_token or RAY_AUTH_TOKEN) here") from None
    cpus = int(ray.cluster_resources().get("CPU", 0))
    if cpus < 1:
        raise RMCError("the Ray cluster has no CPUs available to run tasks")
    return min(cpus, workers) if workers else cpus


def is_connected() -> bool:
    """Whether this process is already connected to a Ray (False when Ray is not installed)."""
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


@contextlib.contextmanager
def session(address: str | None = LOCAL, workers: int | None = None) -> Iterator[int]:
    """`connect`, and on exit shut down the Ray this call started (a Ray already running is left alone)."""
    ray = _ray()
    started = not ray.is_initialized()
    try:
        yield connect(address, workers)
    finally:
        if started and ray.is_initialized():
            ray.shutdown()


# ---------------------------------------------------------------- executors

@dataclass(frozen=True)
class _Local:
    """An object handed to in-process tasks (the inline executor's stand-in for an object-store reference)."""
    obj: Any


def _get(handle):
    if isinstance(handle, _Local):
        return handle.obj
    return _ray().get(handle)


def _key(handle) -> Any:
    return ("local", id(handle.obj)) if isinstance(handle, _Local) else handle.hex()


def _entry(fn: Callable, *args):
    """What a Ray worker runs: one thread per task (each task holds one CPU), then the task."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
        try:
            import faiss
            faiss.omp_set_num_threads(1)
        except Exception:   # noqa: BLE001 - only a thread setting
            pass
    return fn(*args)


_REMOTE = None


class RayExecutor:
    """Runs tasks as Ray tasks (retried when their worker dies) and hands back results as they finish."""

    def __init__(self, slots: int, capacity: int | None = None):
        global _REMOTE
        self.ray = _ray()
        if _REMOTE is None:
            _REMOTE = self.ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(_entry)
        self.slots = max(1, slots)
        # Tasks queued beyond the slots keep every worker busy; an explicit --workers is a hard limit.
        self.capacity = capacity or 2 * self.slots
        self.refs: dict = {}

    def put(self, obj):
        return self.ray.put(obj)

    def has_room(self) -> bool:
        return len(self.refs) < self.capacity

    def submit(self, key, fn: Callable, *args) -> None:
        self.refs[_REMOTE.remote(fn, *args)] = key

    def __len__(self) -> int:
        return len(self.refs)

    def next(self):
        """(key, result) of a task that finished; raises what the task raised."""
        ready, _ = self.ray.wait(list(self.refs), num_returns=1)
        key = self.refs.pop(ready[0])
        try:
            return key, self.ray.get(ready[0])
        except self.ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, RMCError):
                raise cause from None   # a clear message about the user's input: no remote traceback
            raise   # anything else: Ray's exception (an instance of the task's exception class, with its traceback)
        except self.ray.exceptions.RayError as e:
            raise RMCError(f"a Ray task ({key}) failed {MAX_RETRIES + 1} times and was given up: "
                           f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    def cancel(self) -> None:
        for ref in list(self.refs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception:   # noqa: BLE001 - finished or already gone
                pass
        self.refs.clear()


class InlineExecutor:
    """The same tasks run in this process, one at a time (online shards without Ray; tests)."""
    slots = 1

    def __init__(self):
        self.done: deque = deque()

    def put(self, obj):
        return _Local(obj)

    def has_room(self) -> bool:
        return not self.done

    def submit(self, key, fn: Callable, *args) -> None:
        self.done.append((key, fn(*args)))

    def __len__(self) -> int:
        return len(self.done)

    def next(self):
        return self.done.popleft()

    def cancel(self) -> None:
        self.done.clear()


def _maybe_crash(kind: str) -> None:
    """Test-only: kill this worker process mid-task once per armed marker file (see the module docstring)."""
    folder = os.environ.get(CRASH_ENV)
    if not folder:
        return
    marker = Path(folder) / kind
    try:
        os.rename(marker, marker.with_name(f"{kind}.fired"))   # atomic: exactly one task wins
    except OSError:
        return
    os._exit(1)


def _cpu_model(model: nn.Module) -> nn.Module:
    """The model as shipped to workers: on the CPU (workers run on CPUs), never the caller's object moved."""
    try:
        on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    except AttributeError:
        on_cpu = True
    return model if on_cpu else copy.deepcopy(model).cpu()


# ---------------------------------------------------------------- augmentation

_WORKER_CACHE: dict[str, tuple[Any, Any]] = {}


def _cached(slot: str, key, build: Callable[[], Any]):
    """One object per slot per worker process, rebuilt when its key changes (workers run many tasks)."""
    hit = _WORKER_CACHE.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    _WORKER_CACHE.pop(slot, None)
    value = build()
    _WORKER_CACHE[slot] = (key, value)
    return value


def _augment_chunk(handles: tuple, task: ChunkTask, config: AugmentConfig) -> np.ndarray:
    """Worker side of one chunk: its uint8 images (no file I/O). `handles` (model, images, labels of the subset)
    come inside a tuple, so Ray passes the references rather than the objects (resolved once per worker)."""
    model_h, images_h, labels_h = handles
    model = _cached("augment-model", _key(model_h), lambda: _get(model_h))
    x = torch.from_numpy(np.array(_get(images_h)[task.start:task.stop]))
    y = torch.from_numpy(np.array(_get(labels_h)[task.start:task.stop]))
    out = run_chunk(model, task, x, y, config)
    _maybe_crash("augment")
    return out.numpy()


def build_dprime_store_distributed(model: nn.Module, model_info: ModelInfo, train: ImageDataset,
                                out_dir: str | Path, config: AugmentConfig = AugmentConfig(), progress: bool = True,
                                on_chunk: Callable[[ChunkTask], None] | None = None, ray: str | None = LOCAL,
                                workers: int | None = None) -> DPrimeStore:
    """`rmc.artifacts.dprime.build_dprime_store` with the PGD chunks run as Ray tasks (the clean copy is copied here).

    Same store, manifest and resume behaviour as the single-process build; chunks are written in the order they
    finish (each is flushed before progress.json records it).
    """
    writer = StoreWriter.prepare(model_info, train, out_dir, config)
    if writer.complete:
        return writer.finalize()
    from tqdm.auto import tqdm
    pending = writer.pending()
    total = sum(len(t) for t in writer.tasks)
    bar = tqdm(total=total, initial=total - sum(len(t) for t in pending), unit="img", desc="augment (ray)",
               disable=not progress, dynamic_ncols=True)

    def done(task: ChunkTask, data: torch.Tensor) -> None:
        writer.write_chunk(task, data)
        bar.update(len(task))
        if on_chunk is not None:
            on_chunk(task)

    try:
        for task in [t for t in pending if t.steps == 0]:   # the clean copy: no attack, nothing to distribute
            done(task, run_chunk(model, task, *writer.chunk_inputs(train, task), config))
        remote = deque(t for t in pending if t.steps > 0)
        if remote:
            with session(ray, workers) as slots:
                ex = RayExecutor(slots, capacity=workers)
                try:
                    model_h = ex.put(_cpu_model(model))
                    images_h = ex.put(train.images[writer.subset].numpy())
                    labels_h = ex.put(train.labels[writer.subset].numpy())
                    by_index = {t.index: t for t in remote}
                    while remote or len(ex):
                        while remote and ex.has_room():
                            t = remote.popleft()
                            ex.submit(t.index, _augment_chunk, (model_h, images_h, labels_h), t, config)
                        index, data = ex.next()
                        done(by_index[index], torch.from_numpy(np.array(data)))
                finally:
                    ex.cancel()
    finally:
        bar.close()
    return writer.finalize()


# ---------------------------------------------------------------- evaluation

@dataclass(frozen=True)
class _Payload:
    """Everything a worker needs to rebuild one base model's RMC (object-store handles, shared by its tasks)."""
    model: Any
    images: Any
    labels: Any
    copy: Any
    copy_names: tuple[str, ...]
    features: Any
    layer: str
    cfg: RMCConfig

    def key(self) -> tuple:
        return (_key(self.model), _key(self.images), _key(self.labels), _key(self.copy), _key(self.features),
                self.layer, _digest(repr(self.cfg)))


def _build_rmc(p: _Payload) -> RMC:
    dprime = DPrime(_get(p.images), torch.from_numpy(np.array(_get(p.labels))),
                torch.from_numpy(np.array(_get(p.copy))), list(p.copy_names))
    return RMC(_get(p.model), dprime, NeighbourIndex(_get(p.features)), p.cfg, p.layer)


def _rmc_segment(p: _Payload, set_name: str, positions: list[int], x: torch.Tensor, feats: np.ndarray,
                 rows: np.ndarray, state: dict[str, torch.Tensor] | None):
    """Worker side: RMC on the inputs at `positions` of one set, in order. Online: starts from `state` (None: the
    static weights) and returns the state after the last input; episodic: every input starts from the static
    weights and the returned state is None."""
    rmc = _cached("rmc", p.key(), lambda: _build_rmc(p))
    online = p.cfg.mode is Mode.ONLINE
    if online and state is not None:
        rmc.load_state_dict(state)
    else:
        rmc.reset()
    out = []
    for j, i in enumerate(positions):
        t0 = time.perf_counter()
        res = rmc.step(x[j:j + 1], feats[j:j + 1], key=(set_name, i), rows=rows[j])
        out.append({"index": i, "pred": res.prediction, "adapt_epochs": res.adapt_epochs,
                    "calib_epochs": res.calib_epochs, "seconds": round(time.perf_counter() - t0, 4)})
        if j == 0:
            _maybe_crash("evaluate")
    return out, (rmc.state_dict() if online else None)


def stream_names(shards: int) -> list[str]:
    """Record-stream names of the S online streams ("rmc" alone for one stream: the single-process file)."""
    return ["rmc"] if shards == 1 else [f"rmc.stream{s}of{shards}" for s in range(shards)]


@dataclass
class _SetJob:
    name: str
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor | None
    feats: np.ndarray
    rows: np.ndarray

    def record(self, i: int, res: dict, extra: dict) -> dict:
        r = {"index": i, "label": int(self.y[i]), "pred": int(res["pred"]), "adapt_epochs": res["adapt_epochs"],
             "calib_epochs": res["calib_epochs"], "seconds": res["seconds"], **extra}
        if self.t is not None:
            r["target"] = int(self.t[i])
        return r


@dataclass
class _Stream:
    job: _SetJob
    records: RecordStream
    positions: list[int]               # positions in the set this stream covers, in order
    sequential: bool                   # online: one segment at a time, the state carried from one to the next
    extra: dict = field(default_factory=dict)
    state: dict | None = None
    submitted: int = 0                 # positions handed out (as an index into `positions`)
    busy: bool = False
    buffer: dict[int, dict] = field(default_factory=dict)   # finished out of order (episodic), by position index

    @property
    def done(self) -> int:
        return len(self.records)

    def can_submit(self) -> bool:
        return self.submitted < len(self.positions) and not (self.sequential and self.busy)


def _auto_block(remaining: int, slots: int) -> int:
    return max(1, min(MAX_BLOCK, math.ceil(remaining / (4 * slots)))) if remaining else 1


def _open_streams(base: BaseModel, dprime: DPrime, search: NeighbourSearch, eval_set, cfg: RMCConfig, out_dir: Path,
                  n: int | None, shards: int) -> list[_Stream]:
    x = eval_set.images[:n]
    feats = extract_features(base.model, base.layer, x).numpy()
    rows = search.all.search(feats, cfg.k)[1]
    job = _SetJob(eval_set.name, x, eval_set.labels[:n], eval_set.targets[:n] if eval_set.targets is not None
                  else None, feats, rows)
    folder = out_dir / base.name / eval_set.name
    fp = stream_fingerprint(base, dprime, eval_set, cfg, n)
    streams = []
    if cfg.mode is Mode.EPISODIC:
        rs = RecordStream(folder, "rmc", fp)
        rs.rewrite()
        streams.append(_Stream(job, rs, list(range(len(x))), sequential=False))
    else:
        for s, (name, part) in enumerate(zip(stream_names(shards), np.array_split(np.arange(len(x)), shards))):
            rs = RecordStream(folder, name, fp if shards == 1 else _digest(fp, {"streams": shards, "stream": s}))
            state = rs.load_state()
            rs.rewrite()
            extra = {} if shards == 1 else {"stream": s, "streams": shards}
            streams.append(_Stream(job, rs, part.tolist(), sequential=True, extra=extra, state=state))
    for st in streams:
        st.submitted = st.done
        if [r["index"] for r in st.records.records] != st.positions[:st.done]:
            raise RMCError(f"{st.records.path} holds other inputs than this run expects; delete it to restart")
    return streams


def _run_streams(ex, payload: _Payload, streams: list[_Stream], block: int | None, progress: bool,
                 on_record: Callable[[str, dict], None] | None, desc: str) -> None:
    from tqdm import tqdm
    remaining = sum(len(s.positions) - s.done for s in streams)
    block = block or _auto_block(remaining, ex.slots)
    bar = tqdm(total=sum(len(s.positions) for s in streams), initial=sum(s.done for s in streams), unit="input",
               desc=desc, disable=not progress, dynamic_ncols=True)
    hits = [0, 0]

    def emit(st: _Stream, k: int, res: dict, state=None) -> None:
        rec = st.job.record(st.positions[k], res, st.extra)
        st.records.append(rec, state)
        hits[0] += rec["pred"] == rec["label"]
        hits[1] += 1
        bar.update(1)
        bar.set_postfix(acc=f"{hits[0] / hits[1]:.3f}")
        if on_record is not None:
            on_record(st.job.name, st.records.records[-1])

    def submit(si: int) -> None:
        st = streams[si]
        a, b = st.submitted, min(st.submitted + block, len(st.positions))
        pos = st.positions[a:b]
        ex.submit((si, a), _rmc_segment, payload, st.job.name, pos, st.job.x[pos], st.job.feats[pos],
                  st.job.rows[pos], st.state if st.sequential else None)
        st.submitted, st.busy = b, True

    try:
        while True:
            progressed = True
            while ex.has_room() and progressed:   # one task per stream per round: the sets advance together
                progressed = False
                for si, st in enumerate(streams):
                    if ex.has_room() and st.can_submit():
                        submit(si)
                        progressed = True
            if not len(ex):
                break
            (si, a), (results, state) = ex.next()
            st = streams[si]
            st.busy = False
            if st.sequential:
                st.state = state
                for j, res in enumerate(results):
                    emit(st, a + j, res, state if j == len(results) - 1 else None)
            else:
                st.buffer.update({a + j: res for j, res in enumerate(results)})
                while st.done in st.buffer:   # append in input order, so what is on disk is a resumable prefix
                    emit(st, st.done, st.buffer.pop(st.done))
    finally:
        ex.cancel()
        bar.close()


def evaluate_distributed(bases: Sequence[BaseModel], dprime: DPrime, eval_sets: Sequence, cfg: RMCConfig,
                         out_dir: str | Path, num_classes: int, n: int | None = None, with_rmc: bool = True,
                         progress: bool = True, ray: str | None = LOCAL, workers: int | None = None,
                         shards: int = 1, block: int | None = None,
                         on_record: Callable[[str, dict], None] | None = None) -> dict:
    """`rmc.evaluation.driver.evaluate` with RMC's per-input work sharded over Ray (`ray` None: in this process).

    Same return value and files as `evaluate`. Episodic: identical records to a single process for any split.
    Online: each set's stream is cut into `shards` contiguous streams with their own state (shards=1: identical
    to a single process). `block`: inputs per task (default: about 4 tasks per worker, at most 16).
    `on_record(set name, record)` is called after each record is on disk.
    """
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise RMCError(f"--shards must be a whole number >= 1, got {shards!r}")
    if block is not None and (not isinstance(block, int) or block < 1):
        raise RMCError(f"block must be a whole number >= 1, got {block!r}")
    if cfg.mode is Mode.EPISODIC:
        shards = 1   # episodic inputs are independent: every split gives the same results
    out_dir = Path(out_dir)
    results: dict = {}
    ctx = session(ray, workers) if ray is not None else contextlib.nullcontext(1)
    with ctx as slots:
        for base in bases:
            if len(base.features) != len(dprime):
                raise RMCError(f"{base.name}: {len(base.features)} feature rows but D' has {len(dprime)} examples; "
                               "the features belong to another store: re-run `rmc features`")
            if with_rmc and cfg.k > len(dprime):
                raise RMCError(f"rmc.k = {cfg.k} exceeds |D'| = {len(dprime)}; lower k")
            search = NeighbourSearch(base.features, dprime)
            results[base.name] = {s.name: evaluate_set(base, dprime, search, s, cfg, out_dir, num_classes, n, None,
                                                       progress=False) for s in eval_sets}
            if not with_rmc:
                continue
            streams = [st for s in eval_sets for st in _open_streams(base, dprime, search, s, cfg, out_dir, n, shards)]
            ex = RayExecutor(slots, capacity=workers) if ray is not None else InlineExecutor()
            images = dprime.images.numpy() if isinstance(dprime.images, torch.Tensor) else np.asarray(dprime.images)
            payload = _Payload(ex.put(_cpu_model(base.model)), ex.put(images), ex.put(dprime.labels.numpy()),
                               ex.put(dprime.copy.numpy()), tuple(dprime.copy_names),
                               ex.put(np.ascontiguousarray(base.features, dtype=np.float32)), base.layer, cfg)
            where = f"{slots} Ray workers" if ray is not None else "in-process"
            try:
                _run_streams(ex, payload, streams, block, progress, on_record, f"RMC {base.name} ({where})")
            finally:
                _WORKER_CACHE.clear()   # in-process runs cached an RMC here (keyed by object ids: never reuse)
            for s in eval_sets:
                mine = [st for st in streams if st.job.name == s.name]
                results[base.name][s.name]["rmc"] = sorted((r for st in mine for r in st.records.records),
                                                           key=lambda r: r["index"])
    return results


__all__ = ["CRASH_ENV", "InlineExecutor", "LOCAL", "MAX_RETRIES", "RayExecutor", "build_dprime_store_distributed",
           "connect", "evaluate_distributed", "is_connected", "session", "stream_names"]
