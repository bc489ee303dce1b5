"""White-box L-inf gradient attacks on any model taking [0, 1] images: FGSM and PGD (Madry et al.)."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rmc.checks import check_images, check_positive
from rmc.errors import RMCError

# A loss for PGD: (logits, labels) -> per-example loss (N,), which the attacker ascends.
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="none")


def softmax_output_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy applied to the softmax *output*, as the original's D' PGD does (its Keras model ends in a
    softmax, and the loss softmaxes again): a double softmax whose gradient vanishes on confidently classified
    examples, so PGD moves such examples less than cross-entropy on logits would."""
    return F.cross_entropy(logits.softmax(1), labels, reduction="none")


# PGD losses by name (what `augment.loss` selects).
LOSSES: dict[str, LossFn] = {"logits": cross_entropy, "softmax_output": softmax_output_cross_entropy}


def random_targets(labels: torch.Tensor, num_classes: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random class different from the true one for every example (fixed by `generator`)."""
    if num_classes < 2:
        raise RMCError("targeted attacks need at least 2 classes")
    shift = torch.randint(1, num_classes, labels.shape, generator=generator)
    return (labels + shift) % num_classes


def check_attack_settings(eps: float, step_size: float, steps: int) -> None:
    check_positive(eps, "eps")
    check_positive(step_size, "step size")
    check_positive(steps, "steps", integer=True)
    if eps > 1:
        raise RMCError(f"eps {eps} is larger than the whole [0, 1] pixel range; give eps as a fraction (e.g. 8/255)")


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    loss = loss_fn(model(x), y).sum()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int, *,
        random_start: bool = True, targets: torch.Tensor | None = None, generator: torch.Generator | None = None,
        loss_fn: LossFn = cross_entropy, batch_size: int = 512, clip: bool = True) -> torch.Tensor:
    """L-inf PGD. Untargeted: ascend the loss of the true label `y`. Targeted (`targets` given): descend the loss
    of the target class. Returns adversarial images within `eps` of `x`, on x's device: in [0, 1] with `clip`
    (every iterate clipped); without it (the original's D' PGD) iterates may leave [0, 1] by up to eps.

    The model's parameters and mode are not touched (callers put it in eval mode); only input gradients are taken.
    """
    check_attack_settings(eps, step_size, steps)
    x = check_images(x, "attack inputs")
    out = torch.empty_like(x)
    device = x.device
    for start in range(0, len(x), batch_size):
        sl = slice(start, start + batch_size)
        xb, yb = x[sl], y[sl].to(device)
        goal, sign = (yb, 1.0) if targets is None else (targets[sl].to(device), -1.0)
        adv = xb.clone()
        if random_start:
            noise = torch.rand(xb.shape, generator=generator).to(device)
            adv = xb + (2 * noise - 1) * eps
            adv = adv.clamp(0, 1) if clip else adv
        for _ in range(steps):
            grad = _input_grad(model, adv, goal, loss_fn)
            adv = adv.detach() + sign * step_size * grad.sign()
            adv = torch.min(torch.max(adv, xb - eps), xb + eps)
            adv = adv.clamp(0, 1) if clip else adv
        out[sl] = adv.detach()
    return out


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, *, targets: torch.Tensor | None = None,
         batch_size: int = 512) -> torch.Tensor:
    """Fast gradient sign method: one step of size eps, no random start."""
    return pgd(model, x, y, eps, eps, 1, random_start=False, targets=targets, batch_size=batch_size)
