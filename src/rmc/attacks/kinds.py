"""The defense-aware attack kinds (Chen et al., ICLR 2022) and the attack protocols, each defined once: the row
labels, the CLI choices, the report and the attacks read them from these registries.

An attack kind says which of the models the defense adapted into a round attacks and how their losses combine;
adding one is an entry here (the attacks read its fields, never its name). A kind with a `runner` is not rounds of
PGD: it is one attack run through a batch defense wrapped as an `nn.Module` (rmc.defense.batch_classifier), once
per batch defense and for no protocol in particular; the fields about rounds do not apply to it.
"""

from __future__ import annotations

from dataclasses import dataclass

from rmc.interface import Registry


@dataclass(frozen=True)
class AttackKind:
    name: str
    label: str                    # row label in tables and figures
    last_model_only: bool         # each round attacks only the model adapted for the previous candidate (FPA)
    reduce: str                   # "mean" or "min" over the attacked models of each example's loss
    iterations_per_model: bool    # PGD iterations grow with the number of models (GMSA-MIN, as Chen et al.)
    runner: str | None = None     # "module:function" (model, x, y, eps, n_classes, seed=, batch_size=) -> images,
                                  # run through the batch defense as a module; None: rounds of PGD


ATTACK_KINDS: Registry[AttackKind] = Registry("defense-aware attack", [
    AttackKind("fpa", "FPA", last_model_only=True, reduce="mean", iterations_per_model=False),
    AttackKind("gmsa-avg", "GMSA-AVG", last_model_only=False, reduce="mean", iterations_per_model=False),
    AttackKind("gmsa-min", "GMSA-MIN", last_model_only=False, reduce="min", iterations_per_model=True),
    # Chen et al.'s DENT-AA and DENT's own evaluation: AutoAttack (standard) on the adapting model
    AttackKind("autoattack-through", "AutoAttack through", last_model_only=False, reduce="mean",
               iterations_per_model=False, runner="rmc.attacks.autoattack:autoattack"),
])


@dataclass(frozen=True)
class Protocol:
    name: str
    label: str                    # what the protocol is, in one phrase (CLI help, docs)


PROTOCOLS: Registry[Protocol] = Registry("attack protocol", [
    Protocol("chen2022", "Chen et al. (ICLR 2022) as they ran it"),
    Protocol("strong", "every choice that makes the attack stronger"),
])

__all__ = ["ATTACK_KINDS", "PROTOCOLS", "AttackKind", "Protocol"]
