"""Per-example results on disk, written as they are produced so that an interrupted evaluation resumes.

A stream of one defense over one evaluation set is `<dir>/<name>.jsonl` (one JSON record per example, in
order) plus, for online RMC, `<name>.state.safetensors`: the adapted weights after the last recorded
example and its count. The record is appended (and fsync'ed) before the state is renamed into place, so on
resume any record past the state's count is dropped and recomputed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rmc.errors import RMCError
from rmc.io import load_tensors, save_tensors


class RecordStream:
    def __init__(self, folder: str | Path, name: str, fingerprint: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"{name}.jsonl"
        self.state_path = self.folder / f"{name}.state.safetensors"
        self.fingerprint = fingerprint   # of everything that determines the results; a mismatch refuses resume
        self.records: list[dict] = []
        if self.path.exists():
            for i, line in enumerate(self.path.read_text().splitlines()):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    break   # a torn last line from a kill: recompute from there
                if rec.get("fingerprint") != fingerprint:
                    raise RMCError(f"{self.path} was made with other settings (model, data or config); "
                                   "use a new output directory or delete it")
                self.records.append(rec)

    def load_state(self) -> dict[str, torch.Tensor] | None:
        """The saved online state, trimming records made after it. None if there is none."""
        if not self.state_path.exists():
            self.records = []   # online streams cannot resume without the weights they ended with
            return None
        state = load_tensors(self.state_path, "evaluation state")
        n_done = int(state.pop("__n_done__").item())
        if n_done > len(self.records):
            raise RMCError(f"{self.state_path} is ahead of {self.path}; delete both to restart this stream")
        self.records = self.records[:n_done]
        return state

    def rewrite(self) -> None:
        """Make the file hold exactly `self.records` (after trimming on resume); a file that does is left alone."""
        text = "".join(json.dumps(r) + "\n" for r in self.records)
        if self.path.exists() and self.path.read_text() == text:
            return
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def append(self, record: dict, state: dict[str, torch.Tensor] | None = None) -> None:
        record = {**record, "fingerprint": self.fingerprint}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        if state is not None:
            save_tensors(self.state_path, {**state, "__n_done__": torch.tensor(len(self.records))})

    def __len__(self) -> int:
        return len(self.records)
