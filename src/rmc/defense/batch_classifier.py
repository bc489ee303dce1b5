"""A batch defense (DENT) as an `nn.Module` that attack libraries take as it is, as DENT's own evaluation and
Chen et al.'s DENT-AA (`DENT/eval_dent.py`) hand `Dent` to AutoAttack.

    clf = BatchClassifier(dent)        # any rmc.interface.Defense whose adaptation is Adaptation.BATCH
    logits = clf(images)               # N x C x H x W in [0, 1] -> N x classes

`forward(x)` adapts the defense to the batch it is given, exactly as deployed (from the static weights, every
call), and returns the logits of the adapted network on `x` with autograd enabled. An attack library's gradient is
therefore the gradient of the network the defense adapted *to the attack's current batch*, with that adaptation
held fixed: the released Dent's forward adapts its batch norms in place and then evaluates the adapted model on
the same (grad-requiring) input, so AutoAttack's `autograd.grad` sees only that last evaluation. How the
adaptation itself moves with the input is not differentiated (the defense's answer to a gradient attack is to
re-adapt to whatever it is shown), so an attack through this module is BPDA-like, not the gradient of the defended
classifier; rmc.attacks.batch_aware attacks the adapted models directly.

Each call is one full adaptation of the batch (DENT: `steps` forward and backward passes): AutoAttack through it
costs that per gradient and per query. The module is stateless between calls (the defense is restored after each
adaptation), so repeated queries give the same answer and AutoAttack's randomness check stays quiet.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from rmc.checks import check_images
from rmc.errors import RMCError
from rmc.interface import Adaptation, Defense


class BatchClassifier(nn.Module):
    """A batch-transductive defense as a classifier module (see the module docstring)."""

    def __init__(self, defense: Defense):
        super().__init__()
        if not isinstance(defense, Defense) or defense.adaptation is not Adaptation.BATCH:
            raise RMCError(f"BatchClassifier wraps a batch defense (Adaptation.BATCH, e.g. DENT), got "
                           f"{type(defense).__name__}; wrap RMC with rmc.defense.classifier.RMCClassifier")
        self.defense = defense
        # Registered so that `parameters()` and `.to()` reach the network (torchattacks reads the device there).
        self.net = defense.model
        self.adaptations = 0    # batches adapted (each one a full adaptation)

    def train(self, mode: bool = True) -> "BatchClassifier":
        """Attack libraries switch models between train and eval mode; the defense's network stays in inference
        mode (its adaptation decides what changes, not the caller)."""
        self.training = mode
        self.net.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, "BatchClassifier's batch")
        if len(x) == 0:
            raise RMCError("BatchClassifier got an empty batch; give it one or more images")
        snap = self.defense.snapshot()
        try:
            t = self.defense.trial(x.detach(), keep=True)   # the adaptation sees the input, not its graph
        finally:
            self.defense.restore(snap)
        if t.adapted is None:
            raise RMCError(f"{type(self.defense).__name__}.trial(keep=True) returned no adapted state")
        self.adaptations += 1
        # The adapted network on the input itself: differentiable in x, the adapted parameters held fixed.
        return functional_call(self.net, t.adapted.weights, (x,))


__all__ = ["BatchClassifier"]
