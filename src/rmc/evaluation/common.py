"""What the evaluation driver and the attack rows share: the base model, its neighbour search, the digest that
fingerprints record streams."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np
from torch import nn

from rmc.defense import DPrime
from rmc.defense.knn import NeighbourIndex
from rmc.errors import RMCError


@dataclass
class BaseModel:
    """A static model RMC is put in front of, with what identifies it."""
    name: str                   # "standard" or "adversarial" (row labels in the report)
    model: nn.Module
    sha256: str
    layer: str                  # feature layer of the neighbour search
    features: np.ndarray        # D' features from that layer of this model (N x d, float32)


def digest(*parts) -> str:
    """A short hash of JSON-able parts (bytes as they are): what a record stream's results depend on."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class NeighbourSearch:
    """The two indexes of one base model: all of D' (RMC, WebNN) and its clean part (DeepNN), each built on first use.

    Pickled (handed to a Ray worker) it carries the features only, which Ray shares between a machine's workers
    without copying; a worker builds the one index it uses, once.
    """

    def __init__(self, features: np.ndarray, dprime: DPrime):
        self.features = features
        self.clean_rows = np.flatnonzero(dprime.copy.numpy() == 0)
        if len(self.clean_rows) == 0:
            raise RMCError("D' has no clean examples; DeepNN needs the clean training set in the store")

    @functools.cached_property
    def all(self) -> NeighbourIndex:
        return NeighbourIndex(self.features)

    @functools.cached_property
    def clean(self) -> NeighbourIndex:
        return NeighbourIndex(self.features[self.clean_rows], ids=self.clean_rows)

    def __getstate__(self) -> dict:
        return {"features": self.features, "clean_rows": self.clean_rows}


__all__ = ["BaseModel", "NeighbourSearch", "digest"]
