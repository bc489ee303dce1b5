"""RMC as an `nn.Module` that other attack libraries (torchattacks, ART, AutoAttack) take as it is.

    clf = RMCClassifier(rmc)                # or RMCClassifier(rmc, static_model, layer)
    logits = clf(images)                    # N x C x H x W in [0, 1] -> N x classes

`forward` runs the whole defense for every input of the batch: features from the static model, the K nearest
neighbours in D', fine-tuning on them, prediction by the adapted network.

What gradients through it mean (and do not mean)
-------------------------------------------------
The logits are those of the adapted network, evaluated on the input with autograd enabled, so an attack
library gets a gradient. It is the gradient of the adapted network at the input, with the adaptation held
fixed. The real dependence of the prediction on the input runs through the neighbour search (a discrete
selection, piecewise constant in the input, with no useful derivative) and through an inner optimisation
loop of fine-tuning (Adam, early stopping), which the returned gradient does not differentiate. A gradient
attack through this module is therefore a fixed-point / BPDA-style approximation, not the gradient of the
defended classifier, and its failure proves little about robustness. Worse, fine-tuning on neighbours that
share one label can make the adapted network so confident that the cross-entropy's input gradient underflows
to (nearly) zero (gradient masking: PGD with cross-entropy stalls; where it is exactly zero, AutoAttack's
zero-gradient check fires). And if `stateful=True` (the online defense as deployed), every call changes the
weights: the function being attacked is not the one that will later classify the input, and repeated queries give
different answers (AutoAttack's randomness check fires). Each call also costs one full adaptation per input:
PGD-10 through this module on 100 inputs runs RMC 1,000 times.

AutoAttack flags it: its `check_dynamic` traces the forward pass and warns "it seems to be a dynamic
defense! The evaluation with AutoAttack might be insufficient." whenever `backward` or `grad` is called
inside it, which RMC's fine-tuning does on every input. RobustBench does not list defenses with an
optimisation loop in the forward pass. Evaluate RMC with the defense-aware attacks of `rmc.attacks.defense_aware`
(FPA, GMSA-AVG, GMSA-MIN), which attack the models RMC adapts into; use this module to let other libraries
run their attacks as a further (weaker) check, or to score inputs.
"""

from __future__ import annotations

import copy
from typing import cast

import torch
from torch import nn
from torch.func import functional_call

from rmc.defense.core import RMC, Snapshot, check_input
from rmc.defense.optim import split_state
from rmc.errors import RMCError
from rmc.models import default_layer, extract_features


def static_copy(rmc: RMC) -> nn.Module:
    """A copy of the network RMC adapts, holding the static weights RMC started from (for the static features)."""
    model = copy.deepcopy(rmc.model)
    model.load_state_dict(split_state(rmc.static_state)[0])
    return model.eval()


class RMCClassifier(nn.Module):
    """The RMC defense as a classifier module: images (N x C x H x W, [0, 1]) -> logits (N x classes).

    - `stateful=False` (default): each input is classified from RMC's current state, which is then restored, so
      the module is a deterministic function of its input (an attack may query it any number of times); every
      input uses the same random key `key` (default "classifier") for its neighbour split and batch order.
    - `stateful=True`: the online defense of the paper: each input's adaptation (and calibration) carries over
      to the next, in batch order, with `RMC.step`'s default key (its running count).

    Gradients with respect to the input are those of the adapted network with the adaptation held fixed (see
    the module docstring): an approximation, so attacks through this module are not defense-aware evaluations.
    AutoAttack's `check_dynamic` flags this module as a dynamic defense, because its forward pass fine-tunes.

    `static_model` computes the inputs' features at `layer` for the neighbour search; None: a copy of RMC's network
    with the static weights it started from, and RMC's feature layer (else the model's default layer).
    """

    def __init__(self, rmc: RMC, static_model: nn.Module | None = None, layer: str | None = None, *,
                 stateful: bool = False, key="classifier"):
        super().__init__()
        if not isinstance(rmc, RMC):
            raise RMCError(f"RMCClassifier wraps an rmc.defense.core.RMC instance, got {type(rmc).__name__}")
        self.rmc = rmc
        # Registered so that `parameters()` and `.to()` reach the networks (torchattacks reads the device there).
        self.adapted = rmc.model
        self.static = static_copy(rmc) if static_model is None else static_model
        self.layer = layer or rmc.feature_layer or default_layer(self.static)
        self.stateful = stateful
        self.key = key
        self.inputs_seen = 0      # inputs classified (each one ran a full adaptation)

    def train(self, mode: bool = True) -> "RMCClassifier":
        """Attack libraries switch models between train and eval mode; the defense's networks stay in inference
        mode regardless (batch-norm statistics frozen, as RMC requires)."""
        self.training = mode
        self.static.eval()
        self.rmc.model.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits N x classes for images N x C x H x W (floats in [0, 1]): row i is input i, classified in batch
        order (stateful: each input starts where the one before left the defense). The whole batch is checked
        before any input is classified; an empty batch gives an empty 0 x classes result."""
        check_input(x, tuple(self.rmc.dprime.images.shape[1:]), "RMCClassifier", batch=True)
        device = next(self.rmc.model.parameters()).device
        xs = x.to(device)
        if len(xs) == 0:
            with torch.no_grad():
                return self.static(xs).to(x.device)   # 0 x classes: the shape every caller expects
        feats = extract_features(self.static, self.layer, xs.detach()).numpy()
        out = []
        for i in range(len(xs)):
            xi = xs[i:i + 1]
            with torch.enable_grad():   # the fine-tuning needs autograd even when the caller is under no_grad
                if self.stateful:
                    before = self.rmc.snapshot()
                    try:
                        t = self.rmc.trial(xi.detach(), feats[i:i + 1], keep=True)
                        self.rmc.commit(t)
                    except BaseException:
                        self.rmc.restore(before)   # inputs before i stay classified; input i left no trace
                        raise
                else:
                    snap = self.rmc.snapshot()
                    try:
                        t = self.rmc.trial(xi.detach(), feats[i:i + 1], self.key, keep=True)
                    finally:
                        self.rmc.restore(snap)
                adapted = cast(Snapshot, t.adapted).weights   # kept: keep=True
            # The adapted network's logits, differentiable in the input (the adaptation held fixed).
            out.append(functional_call(self.rmc.model, adapted, (xi,)))
            self.inputs_seen += 1
        return torch.cat(out).to(x.device)
