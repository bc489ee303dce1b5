"""The compact per-input fields an RMC record carries for `rmc report` (computed inside the evaluation task, where
the neighbours, logits and weights are at hand, so the report never recomputes the defense):

    conf          softmax probability of the prediction
    p_true        softmax probability of the true label
    adapt_loss    the adaptation's mean training loss per epoch
    neighbours    {"k": K, "clean": {class: count}, "adv": {class: count}}: the K neighbours' labels, split into the
                  clean copy and the adversarial copies of D'; at most NB_TOP classes per side plus the true class
    drift         online only: L2 distance of the trainable weights from the static ones after the input (its
                  adaptation and calibration: the state the next input starts from)
"""

from __future__ import annotations

import math
from typing import cast

import numpy as np
import torch

NB_TOP = 10          # classes kept per side of the neighbour histogram (ImageNet has 1000; the true one is kept too)
LOSS_DIGITS = 4      # significant digits of recorded losses and probabilities (records stay short)


def _round(x: float) -> float:
    return float(f"{x:.{LOSS_DIGITS}g}") if math.isfinite(x) else x


def neighbour_histogram(labels: torch.Tensor, copy: torch.Tensor, rows: np.ndarray, true: int | None) -> dict:
    """Label counts of the neighbours `rows`, clean copy and adversarial copies apart (sparse, trimmed)."""
    idx = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    lab, adv = labels[idx], copy[idx] != 0
    out: dict = {"k": len(rows)}
    for side, mask in (("clean", ~adv), ("adv", adv)):
        values, counts = torch.unique(lab[mask], return_counts=True)
        pairs = sorted(zip(values.tolist(), counts.tolist(), strict=True), key=lambda p: -p[1])
        keep = pairs[:NB_TOP] + [p for p in pairs[NB_TOP:] if p[0] == true]
        out[side] = {str(c): n for c, n in keep}
    return out


def confidences(logits, true: int | None) -> dict:
    """conf (probability of the argmax) and p_true, rounded."""
    p = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), -1)
    out = {"conf": _round(float(p.max()))}
    if true is not None:
        out["p_true"] = _round(float(p[true]))
    return out


class DriftMeter:
    """L2 distance of a model's trainable weights from a reference copy of them (the static weights), cheap enough
    to take after every input: one pass over the parameters, no copy of the state."""

    def __init__(self, model: torch.nn.Module, static: dict[str, torch.Tensor]):
        self.pairs = [(p, static[name]) for name, p in model.named_parameters() if p.requires_grad and name in static]

    @torch.no_grad()
    def __call__(self) -> float:
        if not self.pairs:
            return 0.0
        total = cast(torch.Tensor, sum(((p - s.to(p.device)).float() ** 2).sum() for p, s in self.pairs))
        return _round(float(total.sqrt()))


def record_fields(result, labels: torch.Tensor, copy: torch.Tensor, true: int | None,
                  drift: DriftMeter | None) -> dict:
    """The report's fields of one RMC step result (rmc.defense.core.StepResult)."""
    out = confidences(result.logits, true)
    if result.adapt_losses:
        out["adapt_loss"] = [_round(v) for v in result.adapt_losses]
    out["neighbours"] = neighbour_histogram(labels, copy, result.neighbours, true)
    if drift is not None:
        out["drift"] = drift()
    return out


__all__ = ["NB_TOP", "DriftMeter", "confidences", "neighbour_histogram", "record_fields"]
