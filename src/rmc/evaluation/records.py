"""Per-example results on disk, written as they are produced so that an interrupted evaluation resumes.

A stream of one defense over one evaluation set is `<dir>/<name>.jsonl` (one JSON record per example, in
order) plus, for online RMC, `<name>.state.safetensors`: the adapted weights after the last recorded
example and its count. The record is appended (and fsync'ed) before the state is renamed into place, so on
resume any record past the state's count is dropped and recomputed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import torch

from rmc.defense.optim import STATE_PREFIX, split_state
from rmc.errors import RMCError
from rmc.io import describe_os_error, load_tensors, save_tensors, write_text
from rmc.paths import inside
from rmc.schema import Int, ListOf, MapOf, Num, Obj, Spec, Str, check

MAX_INPUTS = 10 ** 9       # an input's index at most
MAX_CLASSES = 10 ** 6      # a class number at most
FIX = "delete the file to recompute its records"
_CLASSES = MapOf(Str(pattern=re.compile(r"[0-9]{1,7}"), what="a class number"), Int(0, MAX_INPUTS))
# Every field rmc reads back from a record; others (the attack rows' own) are kept as they are.
RECORD = Obj({"index": Int(0, MAX_INPUTS), "label": Int(0, MAX_CLASSES), "pred": Int(0, MAX_CLASSES)},
             {"target": Int(0, MAX_CLASSES), "fingerprint": Str(max_len=200), "compute": Str(max_len=200),
              "seconds": Num(0), "adapt_epochs": Int(0), "calib_epochs": Int(0), "stream": Int(0),
              "streams": Int(1), "conf": Num(0, 1), "p_true": Num(0, 1), "drift": Num(0, finite=False),
              "adapt_loss": ListOf(Num(finite=False)), "rounds": Int(0), "protocol": Str(max_len=200),
              "neighbours": Obj({"k": Int(0, MAX_INPUTS)}, {"clean": _CLASSES, "adv": _CLASSES})})


def check_record(rec: object, path: str | Path, line: int, spec: Spec = RECORD) -> dict:
    """One record read back, every field rmc uses checked (`line` counts from 1)."""
    return check(rec, spec, f"{path} line {line}", FIX)


def read_records(path: str | Path) -> list[dict]:
    """The records of a finished stream file (a torn last line, from a kill, ends it), each checked."""
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            break
        out.append(check_record(rec, path, i + 1))
    return out


class RecordStream:
    def __init__(self, folder: str | Path, name: str, fingerprint: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # A file here that is a link out of the folder is refused (appending would follow it).
        self.path = inside(self.folder, f"{name}.jsonl", "a record stream")
        self.state_path = inside(self.folder, f"{name}.state.safetensors", "a record stream's state")
        self.fingerprint = fingerprint   # of everything that determines the results; a mismatch refuses resume
        self.records: list[dict] = []
        # Why records were dropped on load (out of order), said once by rewrite() when it drops them from the file,
        # so a reader that only checks the stream (finished_results) prints nothing.
        self.repair_note: str | None = None
        if self.path.exists():
            for i, line in enumerate(self.path.read_text().splitlines()):
                try:
                    rec = json.loads(line)
                except ValueError:
                    break   # a torn last line from a kill: recompute from there
                if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint:
                    raise RMCError(f"{self.path} was made with other settings (model, data or config); "
                                   "use a new output directory or delete it")
                check_record(rec, self.path, i + 1)
                if not self._in_order(rec):
                    # Records out of order (two writers, an edited file): keep the ordered prefix, redo the rest.
                    self.repair_note = (f"note: {self.path}: record {i} has index {rec.get('index')!r} where "
                                        f"{self._next_index()!r} was due; keeping the {len(self.records)} records "
                                        "before it and recomputing from there")
                    break
                self.records.append(rec)

    def _next_index(self):
        if not self.records or not isinstance(self.records[-1].get("index"), int):
            return None
        return self.records[-1]["index"] + 1

    def _in_order(self, rec: dict) -> bool:
        """Resume trusts record indices, never line counts: each record's index must follow the one before."""
        index = rec.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            return False
        due = self._next_index()
        return due is None or index == due

    def load_state(self, needed: int | None = None) -> dict[str, torch.Tensor] | None:
        """The saved online state, trimming records made after it. None if there is none. A stream that already
        holds the `needed` records is finished and needs no state (e.g. one carried without it)."""
        if not self.state_path.exists():
            if needed is None or len(self.records) < needed:
                self.records = []   # online streams cannot resume without the weights they ended with
            return None
        state = load_tensors(self.state_path, "evaluation state")
        n_done = state_count(state, "__n_done__", self.state_path)
        if n_done > len(self.records):
            raise RMCError(f"{self.state_path} is ahead of {self.path} ({n_done} inputs vs {len(self.records)} "
                           "records in order); delete both to restart this stream")
        self.records = self.records[:n_done]
        return state

    def rewrite(self) -> None:
        """Make the file hold exactly `self.records` (after trimming on resume); a file that does is left alone."""
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        if not (self.path.exists() and self.path.read_text() == text):
            if self.repair_note:
                print(self.repair_note, file=sys.stderr)
                self.repair_note = None
            write_text(self.path, text)

    def append(self, record: dict, state: dict[str, torch.Tensor] | None = None) -> None:
        record = {**record, "fingerprint": self.fingerprint}
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:   # a torn last line is dropped on resume; name the file for the user
            if describe_os_error(e) is None:
                raise
            e.filename = str(self.path)
            raise RMCError(describe_os_error(e)) from None
        self.records.append(record)
        if state is not None:
            save_tensors(self.state_path, {**state, "__n_done__": torch.tensor(len(self.records))})

    def __len__(self) -> int:
        return len(self.records)


ADAM_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")   # what an Adam keeps per parameter


def check_state(state: dict[str, torch.Tensor], rmc, what: str) -> dict[str, torch.Tensor]:
    """`state` (a saved online state) if it fits `rmc`: the weights and buffers of its model, moments of its
    optimizer's parameters; else a one-line error (loading it would fail deep inside torch, or worse, not fail)."""
    weights, moments = split_state(state)
    ref, _ = split_state(rmc.static_state)
    bad = None
    if set(weights) != set(ref):
        bad = f"other weights than the model's ({len(weights)} tensors, the model has {len(ref)})"
    elif any(weights[k].shape != ref[k].shape or weights[k].dtype != ref[k].dtype for k in ref):
        bad = "weights of other shapes or types than the model's"
    for key, v in moments.items():
        i, _, name = key[len(STATE_PREFIX):].partition(".")
        if bad is None and (not i.isdigit() or int(i) >= len(rmc.params) or name not in ADAM_STATE
                            or (name != "step" and v.shape != rmc.params[int(i)].shape)):
            bad = f"an optimizer entry {key[:60]!r} that fits no parameter"
    if bad is not None:
        raise RMCError(f"{what} holds {bad}; it is damaged or belongs to another model: delete it and the records "
                       "beside it to recompute them")
    return state


def state_count(state: dict[str, torch.Tensor], key: str, path: Path) -> int:
    """Pop the count `key` of a saved state: one integer >= 0, or a one-line error naming the file."""
    t = state.pop(key, None)
    if t is None or t.numel() != 1 or t.dtype not in (torch.int64, torch.int32) or int(t.reshape(())) < 0:
        raise RMCError(f"{path} has no valid {key} (one integer >= 0); the state is damaged: delete it and the "
                       "records beside it to recompute them")
    return int(t.reshape(()))
