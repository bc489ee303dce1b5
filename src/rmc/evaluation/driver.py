"""Run the defenses over evaluation sets: undefended, DeepNN, WebNN and RMC, from one neighbour search.

Per (base model, evaluation set) the inputs' features and their K nearest D' rows are computed once, here; the
baselines are read off them and RMC is handed them. RMC's per-input work runs as tasks of an executor
(rmc.scaleout.executors): in this process, or on Ray's workers with `ray`; the code is the same. Only this process
writes: records are appended in input order (rmc.evaluation.records), so an interrupted run resumes from what is on
disk, with or without Ray.

* Episodic: a task is a block of input positions. Every input's randomness comes from its key (set name, position),
  so any split gives the same records. `batch` > 1 adapts that many inputs side by side (rmc.defense.batched).
* Online: each set's test stream is cut into S contiguous streams (`shards`), each with its own RMC state and record
  stream on disk; a stream runs in sequential segments (the state travels with the segment), the streams and sets
  side by side. Results depend on S (S = 1: one stream); S is in the stream files' names, fingerprints and records.
* Task size: in this process one input (or batch) per task, so the online state is saved after every input; on Ray
  about four tasks per worker, at most MAX_BLOCK inputs (the state is saved after each segment).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from rmc.artifacts.features import evalset_source
from rmc.data.arrays import LazyImages
from rmc.defense import DPrime, Mode, RMCConfig, build_rmc
from rmc.defense.forwards import compute_path
from rmc.defense.optim import check_precision
from rmc.defense.registry import DEFENSES, RMC, STATIC, BuildContext, baselines
from rmc.errors import RMCError
from rmc.evaluation.anatomy import DriftMeter, confidences, record_fields
from rmc.evaluation.common import BaseModel, NeighbourSearch, digest
from rmc.evaluation.records import RECORD, RecordStream, check_state
from rmc.io import read_json, write_json
from rmc.models import extract_features
from rmc.paths import inside, safe_name
from rmc.scaleout.executors import cached, executor, get, handle_key, model_device, worker_model
from rmc.schema import ListOf, Obj, Str, check

BASELINES = tuple(baselines())   # the static model and the kNN votes (rmc.defense.baselines)
SAVED_BASELINES = Obj({"fingerprint": Str(max_len=200), **{b: ListOf(RECORD) for b in BASELINES}})   # baselines.json
MAX_BLOCK = 16             # inputs per Ray task at most (online streams save their state once per task)


class DPrimeVia(str, Enum):
    """How Ray's workers get D''s images."""
    PATH = "path"                   # they read the store's shards from its path (a file system they share): the
                                    # default for a D' on disk
    OBJECT_STORE = "object-store"   # the images travel in Ray's object store (the default for a D' in memory; for a
                                    # cluster without a shared file system, when D' fits in memory)


def dprime_for_workers(dprime: DPrime, via: DPrimeVia | str | None) -> DPrime:
    """D' as handed to Ray's workers: as it is, its store's images pickling as their path (PATH), or with its images in
    memory as numpy, which Ray shares between a machine's workers without copying (OBJECT_STORE)."""
    on_disk = isinstance(dprime.images, LazyImages) and dprime.images.source_path is not None
    via = DPrimeVia(via) if via is not None else DPrimeVia.PATH if on_disk else DPrimeVia.OBJECT_STORE
    if via is DPrimeVia.PATH:
        if not on_disk:
            raise RMCError("--dprime-via path needs a D' store on disk (rmc augment); this D' is in memory: drop "
                           "--dprime-via or use object-store")
        return dprime
    images = dprime.images
    if isinstance(images, LazyImages):
        images = images[:]
    return replace(dprime, images=images.numpy() if isinstance(images, torch.Tensor) else images)


def stream_fingerprint(base: BaseModel, dprime: DPrime, eval_set, cfg: RMCConfig, n: int | None) -> str:
    """What the RMC records of one (base, set) stream depend on; a record stream refuses to resume under another."""
    approximate = base.search_settings()   # an IVF index's settings decide the neighbours; the exact search adds none
    return digest(base.sha256, base.layer, asdict(cfg), evalset_source(eval_set), len(dprime), dprime.fingerprint, n,
                  *([approximate] if approximate else []))


def stream_names(shards: int) -> list[str]:
    """Record-stream names of the S online streams ("rmc" alone for one stream)."""
    return ["rmc"] if shards == 1 else [f"rmc.stream{s}of{shards}" for s in range(shards)]


def online_streams(cfg: RMCConfig, shards: int = 1) -> int | None:
    """S, the number of independent online streams each test stream was cut into (what results.json records:
    online results depend on it); None in episodic mode, where sharding does not change results."""
    return shards if cfg.mode is Mode.ONLINE else None


def check_work_split(batch: int, cfg: RMCConfig, ray: str | None = None, shards: int = 1,
                     block: int | None = None) -> None:
    """Refuse a `batch`, `shards` or `block` the evaluation cannot honour, with the fix (before any work)."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise RMCError(f"--batch must be a whole number >= 1, got {batch!r}")
    if batch > 1 and cfg.mode is not Mode.EPISODIC:
        raise RMCError(f"--batch {batch} needs episodic mode (online RMC carries its weights from one input to the "
                       "next, so its inputs cannot be adapted side by side): add --mode episodic or drop --batch")
    if batch > 1 and (ray is not None or shards != 1):
        raise RMCError("--batch adapts inputs side by side in this process; with --ray or --shards Ray's workers "
                       "share the inputs instead: drop --batch")
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise RMCError(f"--shards must be a whole number >= 1, got {shards!r}")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise RMCError(f"--block must be a whole number >= 1, got {block!r}")


# ---------------------------------------------------------------- one set: features, neighbours, baselines

@dataclass
class SetJob:
    """One evaluation set against one base model: its inputs, their features and K nearest D' rows."""
    name: str
    x: torch.Tensor
    y: torch.Tensor
    t: torch.Tensor | None
    feats: np.ndarray
    rows: np.ndarray
    folder: Path
    fingerprint: str

    def record(self, i: int, pred, **extra) -> dict:
        """The record of input `i` (every defense's records are made here)."""
        r = {"index": i, "label": int(self.y[i]), "pred": int(pred), **extra}
        if self.t is not None:
            r["target"] = int(self.t[i])
        return r


def results_folder(out_dir: Path, base: str, set_name: str) -> Path:
    """out_dir/<base>/<set>: both names plain (they may come from a file), never a link out of out_dir."""
    rel = f"{safe_name(base, 'base-model name')}/{safe_name(set_name, 'evaluation-set name')}"
    return inside(out_dir, rel, "a set's results folder")


def open_set(base: BaseModel, dprime: DPrime, search: NeighbourSearch, eval_set, cfg: RMCConfig, out_dir: Path,
             num_classes: int, n: int | None) -> tuple[SetJob, dict[str, list[dict]]]:
    """The set's features and neighbours (computed once), and the baselines' records (saved in baselines.json)."""
    x = eval_set.images[:n]
    feats = extract_features(base.model, base.layer, x).numpy()
    rows = search.all.search(feats, cfg.k)[1]
    job = SetJob(eval_set.name, x, eval_set.labels[:n], None if eval_set.targets is None else eval_set.targets[:n],
                 feats, rows, results_folder(out_dir, base.name, eval_set.name),
                 stream_fingerprint(base, dprime, eval_set, cfg, n))
    ctx = BuildContext(base.model, base.layer, cfg, dprime, search.all, search.clean, cfg.k, num_classes)
    logits = {}
    for name in BASELINES:
        defense = DEFENSES[name].build(ctx)
        # A vote over all of D' reads the rows searched above (RMC's neighbours), not a second search.
        shared = rows if getattr(defense, "index", None) is search.all else None
        logits[name] = defense.trial(x, feats, rows=shared).logits
    out = {name: [job.record(i, p) for i, p in enumerate(v.argmax(1).tolist())] for name, v in logits.items()}
    for i, r in enumerate(out[STATIC]):   # the static model's confidence (rmc report's per-input anatomy)
        r.update(confidences(logits[STATIC][i], r["label"]))
    write_json(job.folder / "baselines.json", {"fingerprint": job.fingerprint, **out})
    return job, out


# ---------------------------------------------------------------- RMC tasks (run on a worker or here)

@dataclass(frozen=True)
class RMCSource:
    """What a task builds one base model's RMC from: executor handles, shared by all that model's tasks."""
    model: Any
    dprime: Any
    search: Any
    layer: str
    cfg: RMCConfig

    def key(self) -> tuple:
        return (handle_key(self.model), handle_key(self.dprime), handle_key(self.search), self.layer,
                digest(repr(self.cfg)))

    def build(self):
        return build_rmc(worker_model(self.model), get(self.dprime), get(self.search).all, self.cfg, self.layer)


def _batched(source: RMCSource, rmc):
    """`BatchedEpisodic` over `rmc`: vmap on a GPU; on a CPU one worker per core, each one intra-op thread (the
    same results as one at a time with one thread, bit for bit)."""
    from rmc.defense.batched import BatchedEpisodic
    gpu = rmc.device.type == "cuda"
    return BatchedEpisodic(rmc, intra_op_threads=None if gpu else 1)


def rmc_task(source: RMCSource, set_name: str, positions: list[int], x: torch.Tensor, feats: np.ndarray,
             rows: np.ndarray, state: dict[str, torch.Tensor] | None, batch: int,
             fault: Callable[[], None] | None, y: torch.Tensor | None = None) -> tuple[list[dict], dict | None]:
    """RMC on the inputs at `positions` of one set, in order, `batch` at a time (episodic). Online: starts from
    `state` (None: the static weights) and returns the state after the last input; episodic: every input starts
    from the static weights and the returned state is None. `fault()` is called after the first input (tests).
    `y`: the true labels, for the records' report fields (rmc.evaluation.anatomy)."""
    rmc = cached("rmc", source.key(), source.build)   # built once per worker (or per job, in this process)
    online = source.cfg.mode is Mode.ONLINE
    if online and state is not None:
        rmc.load_state_dict(check_state(state, rmc, f"the saved online state of set {set_name!r}"))
    else:
        rmc.reset()
    batched = cached("batched", source.key(), lambda: _batched(source, rmc)) if batch > 1 else None
    drift = cached("drift", source.key(), lambda: DriftMeter(rmc.model, rmc.static_state)) if online else None
    dprime = get(source.dprime)
    out = []
    for a in range(0, len(positions), batch):
        b = min(a + batch, len(positions))
        keys = [(set_name, i) for i in positions[a:b]]
        t0 = time.perf_counter()
        if batched is None:
            results = [rmc.step(x[a:b], feats[a:b], key=keys[0], rows=rows[a])]
        else:
            results = batched.run(x[a:b], None, keys, rows=rows[a:b])
        seconds = round((time.perf_counter() - t0) / (b - a), 4)
        compute = compute_path(source.cfg, rmc.device)
        out += [{"pred": r.prediction, "adapt_epochs": r.adapt_epochs, "calib_epochs": r.calib_epochs,
                 "seconds": seconds, "compute": compute,
                 **record_fields(r, dprime.labels, dprime.copy, None if y is None else int(y[a + j]), drift)}
                for j, r in enumerate(results)]
        if a == 0 and fault is not None:
            fault()
    return out, (rmc.state_dict() if online else None)


# ---------------------------------------------------------------- record streams, scheduled over an executor

@dataclass
class _Stream:
    job: SetJob
    records: RecordStream
    positions: list[int]               # positions in the set this stream covers, in order
    sequential: bool                   # online: one segment at a time, the state carried from one to the next
    extra: dict = field(default_factory=dict)
    state: dict | None = None
    submitted: int = 0                 # positions handed out (as an index into `positions`)
    busy: bool = False
    buffer: dict[int, dict] = field(default_factory=dict)   # finished out of order (episodic), by position index

    @property
    def kept(self) -> list[dict]:
        """This run's records: a stream may hold more (an earlier, larger rmc_n), kept on disk but not counted."""
        return self.records.records[:len(self.positions)]

    @property
    def done(self) -> int:
        return len(self.kept)

    def can_submit(self) -> bool:
        return self.submitted < len(self.positions) and not (self.sequential and self.busy)


def compute_paths(results: dict) -> list[str]:
    """The compute paths RMC's records of `results` ({base: {set: {defense: records}}}) were made with."""
    return sorted({r["compute"] for sets in results.values() for d in sets.values() for r in d.get(RMC, [])
                   if "compute" in r})


def check_compute(records: RecordStream, compute: str) -> None:
    """Refuse to add to a stream a record computed another way than those before it (a resume on another machine,
    other threads, or a mixed Ray cluster): results would silently combine two numerics."""
    before = next((r["compute"] for r in records.records if "compute" in r), None)   # older records lack it
    if before is not None and before != compute:
        raise RMCError(f"{records.path} was computed with {before}, but this worker computes with {compute}; "
                       "resume with the same compute path (e.g. --threads, the machine, rmc.fast_path) or delete "
                       "the stream to recompute it")


def stream_plan(inputs: int, fingerprint: str, cfg: RMCConfig, shards: int, rmc_n: int | None
                ) -> list[tuple[str, str, list[int], dict]]:
    """A set's RMC record streams over its first `rmc_n` of `inputs` (None: all): (name, fingerprint, positions,
    extra record fields) for one episodic stream, or S online ones."""
    count = inputs if rmc_n is None else min(rmc_n, inputs)
    if cfg.mode is Mode.EPISODIC or shards == 1:
        # One online stream: input i depends only on the inputs before it, so the fingerprint leaves the count out
        # and a larger rmc_n continues the stream.
        return [("rmc", fingerprint, list(range(count)), {})]
    # Several online streams: the count decides where each one starts, so it is included.
    split = {"streams": shards} if count == inputs else {"streams": shards, "inputs": count}
    return [(name, digest(fingerprint, {**split, "stream": s}), part.tolist(), {"stream": s, "streams": shards})
            for s, (name, part) in enumerate(zip(stream_names(shards), np.array_split(np.arange(count), shards),
                                                 strict=True))]


def _open_streams(job: SetJob, cfg: RMCConfig, shards: int, rmc_n: int | None = None) -> list[_Stream]:
    """The set's record streams, resumed from disk. A stream may hold more records (an earlier, larger rmc_n):
    they are kept on disk and left out of this run's results."""
    streams, online = [], cfg.mode is Mode.ONLINE
    for name, fingerprint, positions, extra in stream_plan(len(job.x), job.fingerprint, cfg, shards, rmc_n):
        rs = RecordStream(job.folder, name, fingerprint)
        state = rs.load_state(needed=len(positions)) if online else None
        rs.rewrite()
        streams.append(_Stream(job, rs, positions, sequential=online, extra=extra, state=state))
    for st in streams:
        st.submitted = st.done
        if [r["index"] for r in st.kept] != st.positions[:st.done]:
            raise RMCError(f"{st.records.path} holds other inputs than this run expects; delete it to restart")
    return streams


def finished_results(folder: Path, eval_sets: Sequence, cfg: RMCConfig, n: int | None, with_rmc: bool = True,
                     shards: int = 1, rmc_n: int | None = None) -> dict | None:
    """{set name: {defense: records}} of one base model read from `folder` (results/<key>/<base>) when every set's
    baselines and RMC streams are complete, else None; reads only. It lets `rmc run` tabulate a finished base
    (e.g. one restored from studies/carry_run.py) without rebuilding D' and its features, which the records'
    fingerprints name by content: the folder's key covers the model, D''s settings, the layer, the attack and RMC
    settings, and the streams must carry the fingerprint their baselines were saved with."""
    results, online = {}, cfg.mode is Mode.ONLINE
    for s in eval_sets:
        inputs = len(s.images[:n])
        try:
            path = inside(folder, f"{safe_name(s.name, 'evaluation-set name')}/baselines.json", "baselines")
            saved = check(read_json(path, "baselines"), SAVED_BASELINES, path, "it is recomputed")
        except RMCError:
            return None                # unreadable or damaged: the evaluation recomputes (and rewrites) it
        fingerprint = saved["fingerprint"]
        if any(len(saved[b]) != inputs for b in BASELINES):
            return None
        results[s.name] = {b: saved[b] for b in BASELINES}
        if not with_rmc:
            continue
        records = []
        for name, fp, positions, _ in stream_plan(inputs, fingerprint, cfg, shards, rmc_n):
            try:
                rs = RecordStream(path.parent, name, fp)
                if online:
                    rs.load_state(needed=len(positions))
            except RMCError:
                return None            # made with other settings: the full path says so, with the fix
            kept = rs.records[:len(positions)]
            if [r["index"] for r in kept] != positions:
                return None
            records += kept
        results[s.name][RMC] = sorted(records, key=lambda r: r["index"])
    return results


def _block(ex, remaining: int, batch: int) -> int:
    """Inputs per task: in this process one batch (tasks cost nothing, so what is saved is never behind); on Ray
    about four tasks per worker, at most MAX_BLOCK (a task's overhead is paid per task)."""
    if not ex.remote:
        return batch
    return max(1, min(MAX_BLOCK, math.ceil(remaining / (4 * ex.slots)))) if remaining else 1


def _run_streams(ex, source: RMCSource, streams: list[_Stream], block: int | None, batch: int, progress: bool,
                 on_record: Callable[[str, dict], None] | None, fault: Callable[[], None] | None, desc: str) -> None:
    remaining = sum(len(s.positions) - s.done for s in streams)
    block = block or _block(ex, remaining, batch)
    bar = tqdm(total=sum(len(s.positions) for s in streams), initial=sum(s.done for s in streams), unit="input",
               desc=desc, disable=not progress, dynamic_ncols=True)
    hits = [0, 0]

    def emit(st: _Stream, k: int, res: dict, state=None) -> None:
        check_compute(st.records, res["compute"])
        rec = st.job.record(st.positions[k], **res, **st.extra)
        st.records.append(rec, state)
        hits[0] += rec["pred"] == rec["label"]
        hits[1] += 1
        bar.update(1)
        bar.set_postfix(acc=f"{hits[0] / hits[1]:.3f}", epochs=res["adapt_epochs"])
        if on_record is not None:
            on_record(st.job.name, st.records.records[-1])

    def submit(si: int) -> None:
        st = streams[si]
        a, b = st.submitted, min(st.submitted + block, len(st.positions))
        pos = st.positions[a:b]
        ex.submit((si, a), rmc_task, source, st.job.name, pos, st.job.x[pos], st.job.feats[pos], st.job.rows[pos],
                  st.state if st.sequential else None, batch, fault, st.job.y[pos])
        st.submitted, st.busy = b, True

    turn = 0   # the stream served first in the next round: with fewer workers than streams, no set starves
    try:
        while True:
            progressed = True
            while ex.has_room() and progressed:   # one task per stream per round: the sets advance together
                progressed = False
                for si in [(turn + j) % len(streams) for j in range(len(streams))]:
                    if ex.has_room() and streams[si].can_submit():
                        submit(si)
                        turn = (si + 1) % len(streams)
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
        bar.close()


# ---------------------------------------------------------------- the driver

def _evaluate_base(ex, base: BaseModel, dprime: DPrime, search: NeighbourSearch, eval_sets: Sequence,
                   cfg: RMCConfig, out_dir: Path, num_classes: int, n: int | None, with_rmc: bool, progress: bool,
                   shards: int = 1, batch: int = 1, block: int | None = None,
                   on_record: Callable[[str, dict], None] | None = None,
                   fault: Callable[[], None] | None = None, rmc_n: int | None = None,
                   dprime_via: DPrimeVia | str | None = None) -> dict:
    """{set name: {defense: records}} of one base model, RMC's work run over the executor `ex` (on the first `rmc_n`
    inputs of each set; None: all)."""
    if len(base.features) != len(dprime):
        raise RMCError(f"{base.name}: {len(base.features)} feature rows but D' has {len(dprime)} examples; "
                       "the features belong to another store: re-run `rmc features`")
    opened = [open_set(base, dprime, search, s, cfg, out_dir, num_classes, n) for s in eval_sets]
    results = {job.name: baselines for job, baselines in opened}
    if not with_rmc:
        return results
    streams = [st for job, _ in opened for st in _open_streams(job, cfg, shards, rmc_n)]
    shared = dprime_for_workers(dprime, dprime_via) if ex.remote else dprime   # in this process: D' as it is
    source = RMCSource(ex.put_model(base.model), ex.put(shared), ex.put(search), base.layer, cfg)
    _run_streams(ex, source, streams, block, batch, progress, on_record, fault, f"RMC {base.name} ({ex.where})")
    for job, _ in opened:
        records = (r for st in streams if st.job is job for r in st.kept)
        results[job.name][RMC] = sorted(records, key=lambda r: r["index"])
    return results


def evaluate(bases: Sequence[BaseModel], dprime: DPrime, eval_sets: Sequence, cfg: RMCConfig, out_dir: str | Path,
             num_classes: int, n: int | None = None, with_rmc: bool = True, progress: bool = True,
             ray: str | None = None, workers: int | None = None, shards: int = 1, batch: int = 1,
             block: int | None = None, on_record: Callable[[str, dict], None] | None = None,
             fault: Callable[[], None] | None = None, rmc_n: int | None = None,
             dprime_via: DPrimeVia | str | None = None) -> dict:
    """{base name: {set name: {defense: records}}} for every base model and evaluation set: the baselines on the
    first `n` inputs of each set (None: all), RMC on the first `rmc_n` of those (None: as many).

    `ray` ("local" or a cluster address) runs RMC's per-input work as Ray tasks, at most `workers` at a time; None
    runs it here, in order. `shards` > 1 cuts each online stream into that many independent streams (episodic mode
    ignores it). `batch` > 1 (episodic, in this process) adapts that many inputs at once, with the same results.
    `block`: inputs per task (default: see the module docstring). `on_record(set name, record)` is called after
    each RMC record is on disk; `fault()`, if given, by each task after its first input (tests kill workers with it).
    `dprime_via`: how Ray's workers get D''s images (DPrimeVia; None: from the store's path when D' is on disk).
    """
    check_work_split(batch, cfg, ray, shards, block)
    for base in bases:   # before any work, not in a worker hours later
        check_precision(cfg.precision, next(base.model.parameters()).device)
    if cfg.mode is Mode.EPISODIC:
        shards = 1   # episodic inputs are independent: every split gives the same results
    device = model_device(bases[0].model) if bases else None   # a CUDA model: one Ray worker per GPU
    with executor(ray, workers, device) as ex:
        return {base.name: _evaluate_base(ex, base, dprime, NeighbourSearch.of(base, dprime), eval_sets, cfg,
                                          Path(out_dir), num_classes, n, with_rmc, progress, shards, batch, block,
                                          on_record, fault, rmc_n, dprime_via)
                for base in bases}


def evaluate_set(base: BaseModel, dprime: DPrime, search: NeighbourSearch, eval_set, cfg: RMCConfig,
                 out_dir: str | Path, num_classes: int, n: int | None = None, with_rmc: bool = True,
                 progress: bool = True) -> dict[str, list[dict]]:
    """Every defense on one evaluation set, RMC starting from the static weights, in this process:
    {defense: records}, saved under `out_dir/<base>/<set>/` (resumable) as `evaluate` saves them."""
    with executor() as ex:
        return _evaluate_base(ex, base, dprime, search, [eval_set], cfg, Path(out_dir), num_classes, n, with_rmc,
                              progress)[eval_set.name]


__all__ = ["BASELINES", "BaseModel", "DPrimeVia", "MAX_BLOCK", "NeighbourSearch", "SetJob", "check_work_split",
           "dprime_for_workers", "evaluate", "evaluate_set", "finished_results", "online_streams", "open_set",
           "results_folder", "rmc_task", "stream_fingerprint", "stream_names", "stream_plan"]
