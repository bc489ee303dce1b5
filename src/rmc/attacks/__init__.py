"""Attacks: gradient attacks against a fixed model, whose examples transfer to RMC (exported here), and the
defense-aware attacks that aim at the models RMC adapts into (rmc.attacks.defense_aware, settings and protocols in
rmc.attacks.protocols)."""

from rmc.attacks.gradient import cross_entropy, fgsm, pgd, random_targets

__all__ = ["cross_entropy", "fgsm", "pgd", "random_targets"]
