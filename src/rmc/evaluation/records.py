"""Per-example results on disk, written as they are produced so that an interrupted evaluation resumes.

A stream of one defense over one evaluation set is `<dir>/<name>.jsonl` (one JSON record per example, in
order) plus, for online RMC, `<name>.state.safetensors`: the adapted weights after the last recorded
example and its count. The record is appended (and fsync'ed) before the state is renamed into place, so on
resume any record past the state's count is dropped and recomputed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from rmc.errors import RMCError
from rmc.io import describe_os_error, load_tensors, save_tensors, write_text


class RecordStream:
    def __init__(self, folder: str | Path, name: str, fingerprint: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"{name}.jsonl"
        self.state_path = self.folder / f"{name}.state.safetensors"
        self.fingerprint = fingerprint   # of everything that determines the results; a mismatch refuses resume
        self.records: list[dict] = []
        # Why records were dropped on load (out of order), said once by rewrite() when it drops them from the file,
        # so a reader that only checks the stream (finished_results) prints nothing.
        self.repair_note: str | None = None
        if self.path.exists():
            for i, line in enumerate(self.path.read_text().splitlines()):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break   # a torn last line from a kill: recompute from there
                if not isinstance(rec, dict) or rec.get("fingerprint") != fingerprint:
                    raise RMCError(f"{self.path} was made with other settings (model, data or config); "
                                   "use a new output directory or delete it")
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
        n_done = int(state.pop("__n_done__").item())
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
