"""Every defense the evaluation knows, by name: its label and colour in tables and figures, how it adapts, and how
to build it for a base model. The configuration (`defenses: [...]`), the CLI's choices, the drivers, the report
and the figures read this registry; adding a defense is its module plus one entry here (docs/adding-a-defense.md).

The static model and the kNN votes are always evaluated beside the selected defenses (the original's table);
`selectable` defenses are those a run names in `defenses`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from torch import nn

from rmc.defense.baselines import NeighbourVote, StaticModel
from rmc.defense.dprime import DPrime
from rmc.errors import RMCError
from rmc.interface import Adaptation, Defense, Registry


@dataclass
class BuildContext:
    """What a defense may be built from, for one base model."""
    model: nn.Module                 # the static base model (a defense adapts its own copy)
    layer: str                       # the base model's feature layer (the neighbour search's)
    settings: Any = None             # the defense's section of the run configuration (RMCConfig, ...)
    dprime: DPrime | None = None     # the augmented training set D' and its neighbour indexes, for defenses that
    index: Any = None                # search it: over all of D' ...
    clean_index: Any = None          # ... and over its clean copy
    k: int = 0                       # neighbours per input of the kNN votes (rmc.k: the rows read RMC's neighbours)
    num_classes: int = 0

    def need_dprime(self, who: str) -> DPrime:
        if self.dprime is None or self.index is None:
            raise RMCError(f"{who} searches D': build it with the store and its neighbour index")
        return self.dprime


@dataclass(frozen=True)
class DefenseSpec:
    name: str
    label: str                                  # its rows / columns in tables ("Adv. trained + " is prefixed)
    colour: str                                 # its lines in the report's figures (matplotlib colour)
    adaptation: Adaptation                      # how it adapts by default (an instance says for its settings)
    builder: str                                # "module:function" taking a BuildContext (imported when first used)
    selectable: bool = True                     # named in `defenses: [...]`; else always evaluated (baselines)
    settings: str | None = None                 # its section of the run configuration (`rmc run --print-config`)

    def build(self, context: BuildContext) -> Defense:
        """The defense for one base model."""
        module, _, function = self.builder.partition(":")
        return getattr(importlib.import_module(module), function)(context)


def build_rmc(c: BuildContext) -> Defense:
    from rmc.defense import build_rmc as build
    return build(c.model, c.need_dprime("RMC"), c.index, c.settings, c.layer)


def build_static(c: BuildContext) -> Defense:
    return StaticModel(c.model)


def build_deepnn(c: BuildContext) -> Defense:
    return NeighbourVote(c.model, c.clean_index, c.need_dprime("DeepNN").labels.numpy(), c.k, c.num_classes)


def build_webnn(c: BuildContext) -> Defense:
    return NeighbourVote(c.model, c.index, c.need_dprime("WebNN").labels.numpy(), c.k, c.num_classes)


STATIC = "undefended"                     # the base model alone: the first row, and the static column of every table
RMC = "rmc"                               # the defense this package is about (its own figures: drift, anatomy, purity)

DEFENSES: Registry[DefenseSpec] = Registry("defense", [
    DefenseSpec(STATIC, "None", "tab:gray", Adaptation.STATIC, f"{__name__}:build_static", selectable=False),
    DefenseSpec("deepnn", "DeepNN", "tab:blue", Adaptation.STATIC, f"{__name__}:build_deepnn", selectable=False),
    DefenseSpec("webnn", "WebNN", "tab:green", Adaptation.STATIC, f"{__name__}:build_webnn", selectable=False),
    DefenseSpec(RMC, "RMC", "tab:red", Adaptation.ONLINE, f"{__name__}:build_rmc", settings="rmc"),
    DefenseSpec("dent", "DENT", "tab:purple", Adaptation.BATCH, "rmc.defense.dent:build", settings="dent"),
])

DEFAULT_DEFENSES = ("rmc",)               # what a run evaluates unless told otherwise


def baselines() -> list[str]:
    """The defenses always evaluated (the static model and the kNN votes), in table order."""
    return [d.name for d in DEFENSES if not d.selectable]


def selectable() -> list[str]:
    return [d.name for d in DEFENSES if d.selectable]


def check_defenses(names) -> list[str]:
    """`defenses` of a run: a non-empty list of distinct selectable defenses, in the registry's order."""
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple)) or not names:
        raise RMCError(f"defenses must list one or more of {', '.join(selectable())}; got {names!r}")
    for n in names:
        if n not in DEFENSES:
            raise RMCError(f"unknown defense {n!r}; choose from {', '.join(selectable())}")
        if not DEFENSES[n].selectable:
            raise RMCError(f"{n!r} is always evaluated beside the defenses; choose from {', '.join(selectable())}")
    if len(set(names)) != len(names):
        raise RMCError(f"defenses repeats an entry ({list(names)}); give each once")
    return [d for d in selectable() if d in names]


__all__ = ["DEFAULT_DEFENSES", "DEFENSES", "RMC", "STATIC", "BuildContext", "DefenseSpec", "baselines",
           "check_defenses", "selectable"]
