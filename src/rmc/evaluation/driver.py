"""Run the defenses over evaluation sets: undefended, DeepNN, WebNN and RMC, from one neighbour search.

Each (base model, evaluation set) pair is a stream that starts from the static weights; online RMC carries its
adapted weights along that stream. Results are written per example as they are produced (see records.py).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rmc.defense.core import RMC, DPrime, Mode, RMCConfig
from rmc.errors import RMCError
from rmc.evaluation.records import RecordStream
from rmc.artifacts.features import evalset_source
from rmc.io import write_json
from rmc.defense.knn import NeighbourIndex, vote
from rmc.models import extract_features

BASELINES = ("undefended", "deepnn", "webnn")


@dataclass
class BaseModel:
    """A static model RMC is put in front of, with what identifies it."""
    name: str                   # "standard" or "adversarial" (row labels in the report)
    model: nn.Module
    sha256: str
    layer: str                  # feature layer of the neighbour search
    features: np.ndarray        # D' features from that layer of this model (N x d, float32)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class NeighbourSearch:
    """The two indexes of one base model: all of D' (RMC, WebNN) and its clean part (DeepNN)."""

    def __init__(self, features: np.ndarray, dprime: DPrime):
        self.all = NeighbourIndex(features)
        clean = np.flatnonzero(dprime.copy.numpy() == 0)
        if len(clean) == 0:
            raise RMCError("D' has no clean examples; DeepNN needs the clean training set in the store")
        self.clean = NeighbourIndex(features[clean], ids=clean)


def baseline_predictions(base: BaseModel, dprime: DPrime, search: NeighbourSearch, x: torch.Tensor,
                         feats: np.ndarray, k: int, num_classes: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Predictions of the static model, DeepNN and WebNN, and the K nearest D' rows (reused by RMC)."""
    with torch.no_grad():
        static = base.model(x).argmax(1).numpy()
    labels = dprime.labels.numpy()
    rows = search.all.search(feats, k)[1]
    clean_rows = search.clean.search(feats, min(k, search.clean.size))[1]
    return {"undefended": static, "deepnn": vote(labels[clean_rows], num_classes),
            "webnn": vote(labels[rows], num_classes)}, rows


def stream_fingerprint(base: BaseModel, dprime: DPrime, eval_set, cfg: RMCConfig, n: int | None) -> str:
    """What the RMC records of one (base, set) stream depend on; a record stream refuses to resume under another."""
    return _digest(base.sha256, base.layer, asdict(cfg), evalset_source(eval_set), len(dprime), n)


def check_batch(batch: int, cfg: RMCConfig, ray: str | None = None, shards: int = 1) -> None:
    """Refuse a `batch` the evaluation cannot honour, with the fix."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise RMCError(f"--batch must be a whole number >= 1, got {batch!r}")
    if batch > 1 and cfg.mode is not Mode.EPISODIC:
        raise RMCError(f"--batch {batch} needs episodic mode (online RMC carries its weights from one input to the "
                       "next, so its inputs cannot be adapted side by side): add --mode episodic or drop --batch")
    if batch > 1 and (ray is not None or shards != 1):
        raise RMCError("--batch adapts inputs side by side in this process; with --ray or --shards Ray's workers "
                       "share the inputs instead: drop --batch")


def batched_runner(rmc: RMC, batch: int):
    """`BatchedEpisodic` for batch > 1: vmap on a GPU; on a CPU one worker per core, each one intra-op thread
    (the same results as one at a time with one thread, bit for bit)."""
    if batch == 1:
        return None
    from rmc.defense.batched import BatchedEpisodic
    return BatchedEpisodic(rmc, intra_op_threads=None if rmc.device.type == "cuda" else 1)


def evaluate_set(base: BaseModel, dprime: DPrime, search: NeighbourSearch, eval_set, cfg: RMCConfig, out_dir: Path,
                 num_classes: int, n: int | None = None, rmc: RMC | None = None, progress: bool = True,
                 batch: int = 1) -> dict:
    """All defenses on one evaluation set; returns {defense: list of per-example records}.

    `batch` > 1 (episodic mode only) adapts that many inputs at once (`rmc.defense.batched`); records are saved per batch.
    """
    x_all, y_all = eval_set.images[:n], eval_set.labels[:n]
    t_all = eval_set.targets[:n] if eval_set.targets is not None else None
    folder = out_dir / base.name / eval_set.name
    feats = extract_features(base.model, base.layer, x_all).numpy()
    preds, rows = baseline_predictions(base, dprime, search, x_all, feats, cfg.k, num_classes)
    fp = stream_fingerprint(base, dprime, eval_set, cfg, n)

    def record(i, pred, **extra):
        r = {"index": i, "label": int(y_all[i]), "pred": int(pred), **extra}
        if t_all is not None:
            r["target"] = int(t_all[i])
        return r

    out = {name: [record(i, p[i]) for i in range(len(x_all))] for name, p in preds.items()}
    write_json(folder / "baselines.json", {"fingerprint": fp, **out})
    if rmc is None:
        return out

    stream = RecordStream(folder, "rmc", fp)
    rmc.reset()
    if cfg.mode is Mode.ONLINE:
        state = stream.load_state()
        if state is not None:
            rmc.load_state_dict(state)
    stream.rewrite()
    hits = sum(r["pred"] == r["label"] for r in stream.records)
    bar = tqdm(total=len(x_all), initial=len(stream), desc=f"RMC {base.name}/{eval_set.name}", unit="input",
               disable=not progress, dynamic_ncols=True)
    batched = batched_runner(rmc, batch)
    for start in range(len(stream), len(x_all), batch):
        idx = range(start, min(start + batch, len(x_all)))
        keys = [(eval_set.name, i) for i in idx]
        t0 = time.perf_counter()
        if batched is None:          # one input
            results = [rmc.step(x_all[start:start + 1], feats[start:start + 1], key=keys[0], rows=rows[start])]
        else:
            results = batched.run(x_all[idx.start:idx.stop], None, keys, rows=rows[idx.start:idx.stop])
        seconds = round((time.perf_counter() - t0) / len(idx), 4)
        for i, res in zip(idx, results):
            rec = record(i, res.prediction, adapt_epochs=res.adapt_epochs, calib_epochs=res.calib_epochs,
                         seconds=seconds)
            stream.append(rec, rmc.state_dict() if cfg.mode is Mode.ONLINE else None)
            hits += res.prediction == rec["label"]
            bar.update(1)
            bar.set_postfix(acc=f"{hits / len(stream):.3f}", epochs=res.adapt_epochs)
    bar.close()
    out["rmc"] = stream.records
    return out


def online_streams(cfg: RMCConfig, shards: int = 1) -> int | None:
    """S, the number of independent online streams each test stream was cut into (what results.json records:
    online results depend on it); None in episodic mode, where sharding does not change results."""
    return shards if cfg.mode is Mode.ONLINE else None


def evaluate(bases: Sequence[BaseModel], dprime: DPrime, eval_sets: Sequence, cfg: RMCConfig, out_dir: str | Path,
             num_classes: int, n: int | None = None, with_rmc: bool = True, progress: bool = True,
             ray: str | None = None, workers: int | None = None, shards: int = 1, batch: int = 1) -> dict:
    """{base name: {set name: {defense: records}}} for every base model and evaluation set.

    `batch` > 1 (episodic mode) adapts that many inputs at once, with the same results (see rmc.defense.batched).

    `ray` ("local" or a cluster address) shards RMC's work over Ray; `shards` > 1 cuts each online stream into that
    many independent streams (with or without Ray; see rmc.scaleout.ray_backend). Otherwise everything runs here, in order.
    """
    check_batch(batch, cfg, ray, shards)
    if ray is not None or shards != 1:
        from rmc.scaleout.ray_backend import evaluate_distributed
        return evaluate_distributed(bases, dprime, eval_sets, cfg, out_dir, num_classes, n=n, with_rmc=with_rmc,
                                    progress=progress, ray=ray, workers=workers, shards=shards)
    out_dir = Path(out_dir)
    results: dict = {}
    for base in bases:
        if len(base.features) != len(dprime):
            raise RMCError(f"{base.name}: {len(base.features)} feature rows but D' has {len(dprime)} examples; "
                           "the features belong to another store: re-run `rmc features`")
        search = NeighbourSearch(base.features, dprime)
        rmc = RMC(base.model, dprime, search.all, cfg, base.layer) if with_rmc else None
        results[base.name] = {}
        for s in eval_sets:
            results[base.name][s.name] = evaluate_set(base, dprime, search, s, cfg, out_dir, num_classes, n, rmc,
                                                      progress, batch)
    return results
