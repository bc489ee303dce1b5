"""The defenses RMC is compared with in the same pass (SPEC section 1): the static model, and the kNN votes DeepNN
(the K nearest *clean* training examples) and WebNN (the K nearest examples of all of D'), read off the same
neighbour search as RMC. None of them adapts (Adaptation.STATIC): their snapshot is empty and a trial changes
nothing, so attacks and drivers treat them as any other `rmc.interface.Defense`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rmc.defense.knn import vote_counts
from rmc.errors import RMCError
from rmc.interface import Adaptation


@dataclass
class StaticTrial:
    logits: torch.Tensor          # N x classes (kNN votes: the vote counts)
    adapted: None = None          # nothing adapts
    adapt_epochs: int = 0


class _Static:
    """The parts of the Defense interface a defense that never adapts shares: nothing to snapshot or resume."""
    adaptation = Adaptation.STATIC
    model: nn.Module

    def reset(self) -> None:
        pass

    def snapshot(self) -> None:
        return None

    def restore(self, snap: None) -> None:
        pass

    def commit(self, trial: StaticTrial) -> int:
        return 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise RMCError(f"{type(self).__name__} keeps no state, but was given {len(state)} tensors")


class StaticModel(_Static):
    """The undefended base model."""

    def __init__(self, model: nn.Module):
        self.model = model

    @torch.no_grad()
    def trial(self, x: torch.Tensor, features=None, key=None, rows=None, keep: bool = False) -> StaticTrial:
        self.model.eval()
        return StaticTrial(self.model(x))


class NeighbourVote(_Static):
    """A majority vote of the labels of each input's K nearest examples in `index` (ties: the smallest class).

    `labels[i]` is the label of the index's row i as the search returns it (D' rows for both built-in votes);
    `trial` takes the inputs' static-model features, or their neighbour rows when the search ran already."""

    def __init__(self, model: nn.Module, index, labels: np.ndarray, k: int, num_classes: int):
        self.model, self.index, self.labels, self.num_classes = model, index, np.asarray(labels), num_classes
        self.k = min(k, index.size)

    def neighbours(self, features: np.ndarray) -> np.ndarray:
        return self.index.search(features, self.k)[1]

    def trial(self, x: torch.Tensor | None, features=None, key=None, rows=None, keep: bool = False) -> StaticTrial:
        if rows is None:
            if features is None:
                raise RMCError("a neighbour vote needs the inputs' static-model features (or their neighbour rows)")
            rows = self.neighbours(np.asarray(features))
        counts = vote_counts(self.labels[np.asarray(rows)], self.num_classes)
        return StaticTrial(torch.from_numpy(counts).float())   # argmax: rmc.defense.knn.vote's majority


__all__ = ["NeighbourVote", "StaticModel", "StaticTrial"]
