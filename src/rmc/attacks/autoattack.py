"""AutoAttack (Croce & Hein, 2020), standard version, L-inf, from the maintained torchattacks implementation.

Used against the *static* model; its outputs are then fed to RMC (a transfer row). AutoAttack is not run against
RMC itself: its own check flags RMC as a dynamic defense (see rmc.defense.classifier), and RobustBench does not list
defenses with an optimisation loop in the forward pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from rmc.attacks.gradient import check_attack_settings
from rmc.checks import check_positive
from rmc.errors import RMCError


def autoattack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, n_classes: int, seed: int = 0,
               batch_size: int = 500, verbose: bool = False) -> torch.Tensor:
    """torchattacks.AutoAttack(version='standard', norm='Linf'): APGD-CE, APGD-T, FAB-T and Square, each run on
    the inputs the previous ones did not break. Returns adversarial images in [0, 1] within `eps` of `x`."""
    check_attack_settings(eps, eps, 1)
    check_positive(n_classes, "n_classes", integer=True)
    if n_classes < 3:
        raise RMCError(f"AutoAttack's targeted attacks need at least 3 classes, the model has {n_classes}")
    if not isinstance(seed, int) or seed < 0:
        raise RMCError(f"AutoAttack seed must be an integer >= 0, got {seed!r}")
    try:
        import torchattacks
    except ImportError:
        raise RMCError("AutoAttack needs torchattacks: `pip install --no-deps torchattacks` "
                       "(--no-deps: it would pull torchvision and a CUDA torch)") from None
    model.eval()
    atk = torchattacks.AutoAttack(model, norm="Linf", eps=float(eps), version="standard", n_classes=n_classes,
                                  seed=seed, verbose=verbose)
    out = torch.empty_like(x)
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        with torch.enable_grad():
            out[sl] = atk(x[sl], y[sl]).detach()
    # Guard against an implementation stepping outside the threat model (float round-off aside).
    out = torch.min(torch.max(out, x - eps), x + eps).clamp(0, 1)
    return out


class NewKeyEachCall(nn.Module):
    """Wraps a defense whose randomness is fixed by a `key` attribute (rmc.defense.classifier.RMCClassifier) so
    that every forward call draws a new key: the defense becomes randomised, as AutoAttack's rand version
    assumes, and its EOT averages gradients over that randomness. (Duck-typed: the attacks layer sits below the
    defense.)"""

    def __init__(self, defense: nn.Module, prefix: str = "eot"):
        super().__init__()
        if not hasattr(defense, "key"):
            raise RMCError(f"{type(defense).__name__} has no `key` to vary; wrap an RMCClassifier")
        self.defense: Any = defense   # duck-typed: any module with a `key` attribute
        self.prefix, self.calls = prefix, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.defense.key = (self.prefix, self.calls)
        self.calls += 1
        return self.defense(x)


def autoattack_rand(defense: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, eot_iter: int, steps: int,
                    seed: int = 0) -> torch.Tensor:
    """AutoAttack's version for randomised defenses (APGD-CE then APGD-DLR on the inputs still correct, each with
    EOT over `eot_iter` samples per gradient; Croce & Hein 2020) against `defense`, with a new random key per
    forward call (NewKeyEachCall). AutoAttack's own rand version uses 100 iterations and EOT 20; rmc lets both be
    reduced to fit a CPU, since every forward call through RMC is a full adaptation. Returns images in [0, 1]
    within `eps` of `x`."""
    check_attack_settings(eps, eps, 1)
    check_positive(eot_iter, "EOT iterations", integer=True)
    check_positive(steps, "APGD steps", integer=True)
    try:
        import torchattacks
    except ImportError:
        raise RMCError("AutoAttack needs torchattacks: `pip install --no-deps torchattacks` "
                       "(--no-deps: it would pull torchvision and a CUDA torch)") from None
    model = NewKeyEachCall(defense).eval()
    attacks = [torchattacks.APGD(model, norm="Linf", eps=float(eps), steps=steps, n_restarts=1, seed=seed, loss=loss,
                                 eot_iter=eot_iter) for loss in ("ce", "dlr")]
    atk = torchattacks.MultiAttack(attacks)
    with torch.enable_grad():
        out = atk(x, y).detach()
    return torch.min(torch.max(out, x - eps), x + eps).clamp(0, 1)
