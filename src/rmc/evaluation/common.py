"""What the evaluation driver and the attack rows share: the base model, its neighbour search, the digest that
fingerprints record streams."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from rmc.artifacts.features import load_features
from rmc.artifacts.index import open_index
from rmc.defense import DPrime
from rmc.defense.knn import IndexConfig, IndexKind, NeighbourIndex
from rmc.errors import RMCError


@dataclass
class BaseModel:
    """A static model RMC is put in front of, with what identifies it."""
    name: str                   # "standard" or "adversarial" (row labels in the report)
    model: nn.Module
    sha256: str
    layer: str                  # feature layer of the neighbour search
    features: np.ndarray        # D' features from that layer of this model (N x d; memory-mapped when read from disk)
    features_path: Path | None = None   # the file `features` was read from: its saved index is used, workers
                                        # reopen it
    index: IndexConfig = field(default_factory=IndexConfig)   # the neighbour search over D' (knn.*)

    def search_settings(self) -> dict:
        """What the neighbours found depend on beyond the features: {} for the exact flat search."""
        return self.index.search_settings(*self.features.shape)


def digest(*parts) -> str:
    """A short hash of JSON-able parts (bytes as they are): what a record stream's results depend on."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class NeighbourSearch:
    """The two indexes of one base model: all of D' (RMC, WebNN) and its clean part (DeepNN), each built on first use.

    With an IVF index (a large D') the clean part is the same index restricted to the clean rows, and the index is
    the one saved beside the features file (built there the first time). Pickled (handed to a Ray worker) it
    carries the features file's path when there is one (the worker memory-maps it: a shared file system on a
    cluster), else the features, which Ray shares between a machine's workers without copying; a worker builds or
    opens the one index it uses, once.
    """

    def __init__(self, features: np.ndarray, dprime: DPrime, index: IndexConfig | None = None,
                 features_path: Path | None = None, clean_rows: np.ndarray | None = None):
        self.features, self.config, self.features_path = features, index or IndexConfig(), features_path
        self.clean_rows = np.flatnonzero(dprime.copy.numpy() == 0) if clean_rows is None else clean_rows
        if len(self.clean_rows) == 0:
            raise RMCError("D' has no clean examples; DeepNN needs the clean training set in the store")

    @classmethod
    def of(cls, base: BaseModel, dprime: DPrime) -> "NeighbourSearch":
        return cls(base.features, dprime, base.index, base.features_path)

    @functools.cached_property
    def all(self) -> NeighbourIndex:
        if self.features_path is not None:
            return open_index(self.features_path, self.config, progress=True, features=self.features)
        kind = self.config.kind(*self.features.shape)
        if kind is IndexKind.FLAT:
            return NeighbourIndex(self.features)
        s = self.config.build_settings(*self.features.shape)
        return NeighbourIndex(self.features, kind, nlist=s["nlist"], nprobe=self.config.nprobe, seed=s["seed"],
                              rerank=self.config.rerank, pq_m=self.config.pq_m, pq_bits=self.config.pq_bits,
                              train_rows=s["train_rows"])

    @functools.cached_property
    def clean(self) -> NeighbourIndex:
        if self.all.kind is not IndexKind.FLAT:
            return self.all.restricted(self.clean_rows)
        return NeighbourIndex(self.features[self.clean_rows], ids=self.clean_rows)

    def __getstate__(self) -> dict:
        carried = {"features": None} if self.features_path is not None else {"features": self.features}
        return {**carried, "config": self.config, "features_path": self.features_path, "clean_rows": self.clean_rows}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.features is None:
            self.features = load_features(self.features_path, mmap=True)[0].numpy()


__all__ = ["BaseModel", "NeighbourSearch", "digest"]
