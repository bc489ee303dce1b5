"""Batch-transductive defenses (Adaptation.BATCH, e.g. DENT) in the evaluation: their column of every table.

- Over an evaluation set: the defense adapts to each batch of its own size in order and predicts it; the records go
  to `<base>/<set>/<name>.json` ({"fingerprint", "records"}: one pass is cheap, so a set is redone whole, never
  half-written) and a finished file is reused.
- Defense-aware rows (rmc.attacks.batch_aware): one record per attacked input in `<row>/attack.jsonl` plus the chosen
  images so far, written after each batch, so a stopped run resumes from the last finished batch; the chosen
  sequence is then re-scored by a fresh pass over the same batches (`<row>/<name>.json`), which the table shows.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from rmc.artifacts.features import evalset_source
from rmc.attacks.batch_aware import BatchRowsConfig, attack_batch, batch_order
from rmc.attacks.protocols import AttackRowsConfig
from rmc.defense.registry import DEFENSES, BuildContext
from rmc.errors import RMCError
from rmc.evaluation.common import BaseModel, digest
from rmc.evaluation.driver import results_folder
from rmc.evaluation.records import FIX, RECORD, RecordStream
from rmc.interface import Adaptation, Defense
from rmc.io import read_json, write_json
from rmc.paths import safe_name
from rmc.schema import ListOf, Obj, Str, check

SAVED = Obj({"fingerprint": Str(max_len=200), "records": ListOf(RECORD)})   # <set>/<defense>.json

# Settings of the attack rows that do not change a batch defense's defense-aware row (so changing them keeps it).
_NOT_IN_FINGERPRINT = ("attacks", "protocols", "autoattack", "transfer_pgd", "n", "rand_n", "rand_eot", "rand_steps",
                       "rounds", "steps")


def batch_defenses(names) -> list[str]:
    """Those of `names` that adapt a batch at a time."""
    return [n for n in names if DEFENSES[n].adaptation is Adaptation.BATCH]


def build(name: str, base: BaseModel, settings: Any) -> Defense:
    return DEFENSES[name].build(BuildContext(base.model, base.layer, settings))


def run_batches(defense: Defense, x: torch.Tensor, y: torch.Tensor, targets: torch.Tensor | None, batch_size: int,
                reorder: bool = False) -> list[dict]:
    """The defense's records over `x`, a batch at a time (rmc.attacks.batch_aware.batch_order), in input order."""
    records: list[dict] = [{} for _ in range(len(x))]
    for b, pos in enumerate(batch_order(y, batch_size, reorder)):
        t0 = time.perf_counter()
        trial = defense.trial(x[pos], key=b)
        defense.commit(trial)
        seconds = round((time.perf_counter() - t0) / len(pos), 4)
        for j, i in enumerate(pos.tolist()):
            rec = {"index": i, "label": int(y[i]), "pred": int(trial.logits[j].argmax()), "batch": b,
                   "adapt_steps": trial.adapt_epochs, "seconds": seconds}
            if targets is not None:
                rec["target"] = int(targets[i])
            records[i] = rec
    return records


def fingerprint(model_sha256: str, name: str, settings: Any, eval_set, n: int, reorder: bool = False) -> str:
    """What a batch defense's records of one set depend on."""
    return digest(model_sha256, name, asdict(settings), evalset_source(eval_set), n, reorder)


def finished(path: Path, fingerprint: str, n: int) -> list[dict] | None:
    """The records of `path` if it holds all `n` of them under `fingerprint`; None if it does not exist. A file made
    with other settings is refused (as every record stream)."""
    if not path.exists():
        return None
    saved = check(read_json(path, "defense records"), SAVED, path, FIX)
    if saved["fingerprint"] != fingerprint:
        raise RMCError(f"{path} was made with other settings (model, data or config); use a new output directory "
                       "or delete it")
    recs = saved["records"]
    return recs if [r["index"] for r in recs] == list(range(n)) else None


def evaluate_set(name: str, settings: Any, base: BaseModel, eval_set, out_dir: Path, n: int | None = None,
                 reorder: bool = False) -> list[dict]:
    """The defense `name` (its `settings`) over the first `n` inputs of `eval_set` (None: all), saved as
    `out_dir/<base>/<set>/<name>.json`; a finished file made with the same settings is read instead."""
    x, y = eval_set.images[:n], eval_set.labels[:n]
    t = None if eval_set.targets is None else eval_set.targets[:n]
    path = results_folder(Path(out_dir), base.name, eval_set.name) / f"{safe_name(name, 'defense name')}.json"
    fp = fingerprint(base.sha256, name, settings, eval_set, len(x), reorder)
    done = finished(path, fp, len(x))
    if done is not None:
        return done
    records = run_batches(build(name, base, settings), x, y, t, settings.batch_size, reorder)
    write_json(path, {"fingerprint": fp, "records": records})
    return records


class BatchAwareStream:
    """One defense-aware row against a batch defense, resumable batch by batch. Records are appended in attack order
    (`index`: the position in that order; `input`: the input's position in the set)."""

    def __init__(self, name: str, settings: Any, kind: str, protocol: str, base: BaseModel, x: torch.Tensor,
                 y: torch.Tensor, acfg: AttackRowsConfig, brows: BatchRowsConfig, folder: Path, source: str,
                 num_classes: int):
        self.name, self.kind, self.protocol, self.base, self.x, self.y = name, kind, protocol, base, x, y
        self.acfg, self.brows, self.num_classes = acfg, brows, num_classes
        attack = {k: v for k, v in asdict(acfg).items() if k not in _NOT_IN_FINGERPRINT}
        fp = digest(base.sha256, name, asdict(settings), attack, asdict(brows), kind, protocol, source)
        self.defense = build(name, base, settings)
        self.order = batch_order(y, settings.batch_size, brows.reorder)
        self.stream = RecordStream(folder, "attack", fp)
        self.adv = x.clone()
        state = self.stream.load_state()
        done = [int(r["input"]) for r in self.stream.records]
        if state is not None:
            self.adv[done] = state["__adv__"][:len(done)]
        self.stream.rewrite()

    @property
    def batches_done(self) -> int:
        return sum(1 for _ in self._finished())

    def _finished(self):
        count = 0
        for pos in self.order:
            count += len(pos)
            if count > len(self.stream):
                return
            yield pos

    @property
    def done(self) -> int:
        return len(self.stream)

    @property
    def records(self) -> list[dict]:
        """The attack's records by input position (`index` as every other row)."""
        return sorted(({**r, "index": r["input"]} for r in self.stream.records), key=lambda r: r["index"])

    def step(self) -> None:
        """Attack the next batch; the defense then processes the chosen batch."""
        b = self.batches_done
        pos = self.order[b]
        res = attack_batch(self.defense, self.base.model, self.x[pos], self.y[pos], self.kind, self.protocol,
                           self.acfg, self.brows, self.num_classes, key=(self.name, self.kind, b))
        self.adv[pos] = res.x_adv
        inputs = [int(r["input"]) for r in self.stream.records] + pos.tolist()
        for j, (i, rec) in enumerate(zip(pos.tolist(), res.records(), strict=True)):
            last = j == len(pos) - 1
            saved = {"__adv__": self.adv[inputs].clone()} if last else None
            self.stream.append({"index": self.done, "input": i, "label": int(self.y[i]), "pred": res.predictions[j],
                                "batch": b, **rec}, saved)

    def run(self, progress: bool = True, desc: str = "") -> None:
        bar = tqdm(total=len(self.order), initial=self.batches_done, desc=desc, unit="batch", disable=not progress,
                   dynamic_ncols=True)
        while self.batches_done < len(self.order):
            self.step()
            bar.update(1)
        bar.close()


__all__ = ["BatchAwareStream", "batch_defenses", "build", "evaluate_set", "fingerprint", "finished", "run_batches"]
