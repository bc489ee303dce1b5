"""What every test-time defense offers the attacks and the drivers (`Defense`), how it adapts (`Adaptation`), and
the registries that name the open sets of the code (defenses, attack kinds, data sets): name -> entry.

The interface is RMC's step in two halves, generalised: `trial` adapts to an input (one input, or a whole test
batch for a batch-transductive defense) and predicts it; `commit` makes the trial count (RMC online: calibrates);
`snapshot` / `restore` undo everything a trial changed, exactly, so an attacker may try candidates against the
defense and leave it as it was; `state_dict` / `load_state_dict` carry the stream state a stopped run resumes
from. It lives at the bottom layer so that the attacks (which only drive a defense) and the defenses (which
implement one) both read it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from enum import Enum
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

from rmc.errors import RMCError


class Adaptation(str, Enum):
    """How a defense adapts at test time: what its predictions depend on besides the input."""
    STATIC = "static"       # never adapts: the base model, kNN votes
    ONLINE = "online"       # adapts per input and keeps the adapted state for the next input (RMC, the original)
    EPISODIC = "episodic"   # adapts per input, from the static weights every time (RMC episodic)
    BATCH = "batch"         # adapts to a whole test batch, from the static weights every batch (DENT)

    @property
    def per_input(self) -> bool:
        """The defense classifies one input at a time (its attacks run input by input, in stream order)."""
        return self in (Adaptation.ONLINE, Adaptation.EPISODIC)


@runtime_checkable
class Defense(Protocol):
    """A test-time defense as attacks and drivers use it (rmc.defense.core.RMC, rmc.defense.baselines, ...).

    `trial(x, ...)` returns an object with `logits` (classes, or N x classes for a batch) and `adapted` (the state
    it adapted into, when `keep`: its `weights` evaluate on `model` with torch.func.functional_call)."""
    model: nn.Module        # the network the defense adapts (the attacks evaluate adapted states on it)

    @property
    def adaptation(self) -> Adaptation: ...
    def reset(self) -> None: ...
    def snapshot(self) -> Any: ...
    def restore(self, snap: Any) -> None: ...
    def trial(self, x: torch.Tensor, features: Any = None, key: Any = None, rows: Any = None,
              keep: bool = False) -> Any: ...
    def commit(self, trial: Any) -> int: ...
    def state_dict(self) -> dict[str, torch.Tensor]: ...
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class Entry(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def label(self) -> str: ...


E = TypeVar("E", bound=Entry)


class Registry(Generic[E]):
    """Entries by name, in registration order (the order of tables, legends and CLI choices). Looking up an
    unknown name raises a one-line RMCError that lists the known ones."""

    def __init__(self, what: str, entries: Iterable[E] = ()):
        self.what = what             # "defense", "data set", ...: named in errors
        self._entries: dict[str, E] = {}
        for e in entries:
            self.register(e)

    def register(self, entry: E) -> E:
        if entry.name in self._entries:
            raise RMCError(f"a {self.what} named {entry.name!r} is registered already")
        self._entries[entry.name] = entry
        return entry

    def __getitem__(self, name: str) -> E:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RMCError(f"unknown {self.what} {name!r}; choose from {', '.join(self._entries)}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[E]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def labels(self) -> dict[str, str]:
        return {name: e.label for name, e in self._entries.items()}

    def label(self, name: str) -> str:
        """The entry's label, or the name itself for one not registered (records of another version)."""
        return self._entries[name].label if name in self._entries else name


__all__ = ["Adaptation", "Defense", "Registry"]
