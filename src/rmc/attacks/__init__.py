"""Attacks: gradient attacks against a fixed model (transfer to RMC) and, later, defense-aware attacks."""

from rmc.attacks.gradient import cross_entropy, fgsm, pgd, random_targets

__all__ = ["cross_entropy", "fgsm", "pgd", "random_targets"]
