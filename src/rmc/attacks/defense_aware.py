"""Defense-aware attacks on RMC: FPA, GMSA-AVG and GMSA-MIN (Chen et al., ICLR 2022).

RMC's prediction for an input comes from a model adapted *for that input*, so an attack crafted against the
static model (the original paper's transfer setting) aims at the wrong function. These attacks aim at the
models RMC actually adapts into. For each test input, in stream order:

1. save RMC's state; the model set starts with the model *before adaptation* (the current online model; in
   episodic mode the static one);
2. each round, the candidate is PGD from the clean input against
   - round 1: the model before adaptation (every attack),
   - FPA: the model RMC adapted into for the previous candidate,
   - GMSA-AVG / GMSA-MIN: the mean / per-example minimum of the losses over the whole set;
3. the attacker's RMC adapts to the candidate and predicts it; the adapted weights join the set; its state is
   restored exactly; rounds stop once it misclassifies a candidate;
4. the attacker's RMC processes the chosen candidate (adapt, predict: the attack's own verdict; calibrate), so
   its stream moves on.

How candidates are crafted and chosen, and whose RMC the attacker runs, is the protocol (rmc.attacks.protocols):
`chen2022`'s attacker runs its own copy of RMC under its own keys, `strong`'s runs the scored RMC itself. The chosen
sequence is then scored by a separate RMC pass (rmc.evaluation.attack_rows). Adapted models are held as state
dicts and evaluated with `torch.func.functional_call` on RMC's own module: no network copy per model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rmc.attacks.gradient import cross_entropy
from rmc.attacks.kinds import ATTACK_KINDS
from rmc.attacks.protocols import KINDS, LABELS, PROTOCOLS, AttackRowsConfig, Lane, check_kind
from rmc.errors import RMCError
from rmc.interface import Adaptation, Defense
from rmc.models import extract_features
from rmc.seeding import generator

__all__ = ["KINDS", "LABELS", "PROTOCOLS", "AttackRowsConfig", "ModelSet", "attack_input", "attack_stream",
           "attacker_key", "ensemble_loss", "initial_candidates", "pgd_best"]


# What the attacks need of the defense: its adapting network, exact snapshots of its state, and a step in two
# halves (`trial`: adapt and predict; `commit`: calibrate). rmc.defense.core.RMC is one.
RMC = Defense


# -- losses over a set of models -------------------------------------------------------------------------------
class ModelSet(nn.Module):
    """Logits of every model of the set on a batch: N x M x classes. A model is a module, or a state dict
    of `module` (evaluated with functional_call)."""

    def __init__(self, module: nn.Module, models: Sequence[nn.Module | dict[str, torch.Tensor]]):
        super().__init__()
        if not models:
            raise RMCError("no models to attack")
        self.module, self.models = module, list(models)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) if isinstance(m, nn.Module) else functional_call(self.module, m, (x,))
                            for m in self.models], 1)


def ensemble_loss(kind: str, loss: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(N x M x classes logits, labels) -> per-example loss to ascend: the mean (FPA's single model, GMSA-AVG) or
    the minimum (GMSA-MIN: every model must be fooled) over the models of each model's loss.

    `loss`: "ce", the cross-entropy (Chen et al.), or "margin", the best other logit minus the true one. RMC's
    fine-tuning can make the adapted network so confident that the cross-entropy's gradient underflows to exactly
    zero (PGD then stalls: gradient masking); the margin's gradient does not vanish."""
    reduce_min = ATTACK_KINDS[kind].reduce == "min"
    if loss not in ("ce", "margin"):
        raise RMCError(f"attack loss must be ce or margin, got {loss!r}")

    def per_example(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n, m, c = logits.shape
        flat, labels = logits.reshape(n * m, c), y.repeat_interleave(m)
        if loss == "ce":
            per_model = F.cross_entropy(flat, labels, reduction="none")
        else:
            true = flat.gather(1, labels[:, None])[:, 0]
            other = flat.masked_fill(F.one_hot(labels, c).bool(), -torch.inf).max(1).values
            per_model = other - true
        per_model = per_model.view(n, m)
        return per_model.min(1).values if reduce_min else per_model.mean(1)
    return per_example


def margin(logits: torch.Tensor, label: int) -> float:
    """True-class logit minus the best other one: negative means misclassified."""
    other = logits.clone()
    other[label] = -math.inf
    return float(logits[label] - other.max())


def pgd_best(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor, eps: float,
             step_size: float, steps: int, loss_fn: Callable,
             gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """L-inf PGD from a random start that returns, per example, the iterate with the highest loss seen, the clean
    input and the final iterate included (Chen et al.'s `elementwise_best`). Returns (images, their losses)."""
    with torch.no_grad():
        best_loss = loss_fn(model(x), y)
    best = x.clone()
    adv = (x + (2 * torch.rand(x.shape, generator=gen).to(x.device) - 1) * eps).clamp(0, 1)
    for i in range(steps + 1):
        adv = adv.detach().requires_grad_(i < steps)
        with torch.set_grad_enabled(i < steps):
            loss = loss_fn(model(adv), y)
        better = loss.detach() > best_loss
        best[better], best_loss = adv.detach()[better], torch.where(better, loss.detach(), best_loss)
        if i == steps:
            break
        (grad,) = torch.autograd.grad(loss.sum(), adv)
        adv = adv.detach() + step_size * grad.sign()
        adv = torch.min(torch.max(adv, x - eps), x + eps).clamp(0, 1)
    return best, best_loss


# -- the attack ------------------------------------------------------------------------------------------------
@dataclass
class RoundInfo:
    round: int            # 1-based
    lane: str             # the protocol whose rounds these are (strong's fallback rounds: "chen2022")
    models: int           # models attacked (1: the model before adaptation, or FPA's last adapted one)
    iterations: int       # PGD iterations per restart
    prediction: int       # RMC's prediction of the candidate in the attacker's trial
    margin: float         # its true-class margin there (negative: RMC fooled)
    adapt_epochs: int


@dataclass
class InputResult:
    x_adv: torch.Tensor           # 1 x C x H x W: what RMC received
    prediction: int               # the attack's own verdict: the attacker's RMC's prediction of it
    logits: list[float]
    chosen_round: int             # 1-based round of the chosen candidate; 0: the clean input
    rounds: list[RoundInfo]
    calib_epochs: int
    seconds: float
    protocol: str
    verdict_key: Any              # the key of the committed trial (strong: the scored RMC's; chen2022: its own)
    attacker_rmc: str             # "scored-stream" (strong) or "own-copy" (chen2022): Lane.attacker_rmc

    def record(self) -> dict:
        """The per-example fields the evaluation writes (besides index, label and pred). `round_preds` are the
        attacker's trials of its own rounds (rmc.evaluation.rounds_figure draws them); `fallback_preds` those of
        strong's fallback to Chen et al.'s rounds."""
        main = [r for r in self.rounds if r.lane == self.protocol]
        rec = {"attack_pred": self.prediction, "protocol": self.protocol, "attacker_rmc": self.attacker_rmc,
               "chosen_round": self.chosen_round,
               "rounds": len(main), "round_preds": [r.prediction for r in main],
               "round_margins": [round(r.margin, 4) for r in main], "iterations": [r.iterations for r in main],
               "calib_epochs": self.calib_epochs, "seconds": round(self.seconds, 3)}
        fallback = [r.prediction for r in self.rounds if r.lane != self.protocol]
        if fallback:
            rec["fallback_preds"] = fallback
        return rec


def initial_candidates(static_model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackRowsConfig,
                       batch_size: int = 512) -> torch.Tensor:
    """The transfer PGD row: PGD against the static model (cross-entropy, random start), returning per input the
    iterate with the highest loss, the clean input included (Chen et al.'s transfer PGD: `elementwise_best`)."""
    static_model.eval()
    gen = generator(cfg.seed, "transfer-pgd")
    out = []
    with torch.enable_grad():
        for start in range(0, len(x), batch_size):
            sl = slice(start, start + batch_size)
            best, _ = pgd_best(static_model, x[sl], y[sl], cfg.eps, cfg.resolved_step_size, cfg.steps, cross_entropy,
                               gen)
            out.append(best.detach())
    return torch.cat(out) if out else x.clone()


def attacker_key(lane: Lane, key, *tag):
    """The key of one of the attacker's RMC trials for the input whose scored key is `key`: that key itself when the
    attacker's RMC is the scored one (strong), else a key of the attacker's own that the scored RMC never draws
    (chen2022: Chen et al.'s attacker runs its own RMC under its own randomness)."""
    return key if lane.keys_known else ("attacker", key, *tag)


def _before_adaptation(rmc: RMC, static_model: nn.Module, start: Any) -> nn.Module | dict[str, torch.Tensor]:
    """The model RMC starts adapting from: the online weights, or in episodic mode the static model."""
    return start.weights if rmc.adaptation is Adaptation.ONLINE else static_model


def _rounds(rmc: RMC, static_model: nn.Module, layer: str, x: torch.Tensor, label: torch.Tensor, kind: str,
            lane: Lane, cfg: AttackRowsConfig, key, start: Any) -> list[tuple[torch.Tensor, Any, RoundInfo]]:
    """One protocol's rounds from the saved state `start`: (candidate, RMC's trial of it, info) per round run.
    Stops after the first candidate RMC misclassifies in the attacker's trial. RMC is left restored to `start`."""
    models = [_before_adaptation(rmc, static_model, start)]
    loss_fn = ensemble_loss(kind, lane.loss)
    spec = ATTACK_KINDS[kind]
    out = []
    for r in range(1, cfg.rounds + 1):
        targets = models[-1:] if spec.last_model_only else models
        iterations = lane.steps * (len(targets) if spec.iterations_per_model else 1)   # Chen et al.: 40 x models
        ensemble = ModelSet(rmc.model, targets)
        best: torch.Tensor | None = None
        best_loss = -math.inf
        for restart in range(lane.restarts):
            gen = generator(cfg.seed, kind, lane.protocol, key, r, restart)
            with torch.enable_grad():
                cand, loss = pgd_best(ensemble, x, label, cfg.eps, lane.step_size, iterations, loss_fn, gen)
            if best is None or loss.item() > best_loss:
                best, best_loss = cand.detach(), loss.item()
        assert best is not None   # lane.restarts >= 1 (AttackRowsConfig checks strong_restarts)
        feats = extract_features(static_model, layer, best).numpy()
        t = rmc.trial(best, feats, attacker_key(lane, key, r), keep=True)
        rmc.restore(start)
        models.append(t.adapted.weights)
        m = margin(t.logits, int(label))
        out.append((best, t, RoundInfo(r, lane.protocol, len(targets), iterations, int(t.logits.argmax()), m,
                                       t.adapt_epochs)))
        if m < 0:
            break
    return out


def _real_trial(rmc: RMC, static_model: nn.Module, layer: str, x: torch.Tensor, key, start: Any):
    """RMC's trial of `x` under `key` from `start`; RMC is left restored to `start`."""
    t = rmc.trial(x, extract_features(static_model, layer, x).numpy(), key, keep=True)
    rmc.restore(start)
    return t


def attack_input(rmc: RMC, static_model: nn.Module, layer: str, x: torch.Tensor, y: int, kind: str,
                 cfg: AttackRowsConfig, key, protocol: str = "chen2022") -> InputResult:
    """Attack one input `x` (1 x C x H x W) of true class `y` with `rmc`, the attacker's RMC, in its current state,
    then let it process what it chose so its state moves on (SPEC section 2). `key` is the key the scored RMC uses
    for this input (`RMC.step`'s key): `strong`'s attacker uses it (its RMC is the scored one), `chen2022`'s derives
    keys of its own from it (`attacker_key`) that the scored RMC never uses."""
    check_kind(kind)
    if x.dim() != 4 or len(x) != 1:
        raise RMCError(f"attack_input takes one input (1 x C x H x W), got shape {tuple(x.shape)}")
    lane = cfg.lane(protocol)
    t0 = time.perf_counter()
    label = torch.tensor([int(y)])
    start = rmc.snapshot()
    done = _rounds(rmc, static_model, layer, x, label, kind, lane, cfg, key, start)
    rounds = [info for _, _, info in done]
    verdict_key = key
    if lane.keep_clean:
        # Chen et al.: the first candidate that fooled the attacker's RMC, else the clean input, which the attacker's
        # RMC classifies anew (a fresh trial: its verdict) before calibrating.
        fooled = [(c, info.round) for c, _, info in done if info.margin < 0]
        chosen, chosen_round = fooled[0] if fooled else (x, 0)
        verdict_key = attacker_key(lane, key, "verdict")
        t = _real_trial(rmc, static_model, layer, chosen, verdict_key, start)
    else:
        # Known keys: the attacker's trials are RMC's own verdicts. Keep the lowest margin (a fooling one if any).
        chosen, t, info = min(done, key=lambda d: d[2].margin)
        chosen_round = info.round
        if info.margin >= 0 and protocol == "strong" and cfg.strong_fallback:
            # Chen et al.'s rounds from the same state, their pick judged by RMC's own key: never weaker than them.
            chen = _rounds(rmc, static_model, layer, x, label, kind, cfg.lane("chen2022"), cfg, key, start)
            rounds += [i for _, _, i in chen]
            chen_fooled = [c for c, _, i in chen if i.margin < 0]
            pick = chen_fooled[0] if chen_fooled else x
            tc = _real_trial(rmc, static_model, layer, pick, key, start)
            if margin(tc.logits, int(y)) < margin(t.logits, int(y)):
                chosen, t, chosen_round = pick, tc, (-1 if chen_fooled else 0)   # -1: strong's fallback lane
    calib = rmc.commit(t)
    return InputResult(chosen, int(t.logits.argmax()), t.logits.tolist(), chosen_round, rounds, calib,
                       time.perf_counter() - t0, protocol, verdict_key, lane.attacker_rmc)


@dataclass
class StreamResult:
    images: torch.Tensor          # N x C x H x W: the chosen adversarial sequence
    labels: list[int]
    predictions: list[int]        # the attack's own verdicts (the attacker's RMC's predictions)
    inputs: list[InputResult]

    @property
    def accuracy(self) -> float:
        if not self.labels:
            return math.nan
        return float(np.mean([p == y for p, y in zip(self.predictions, self.labels, strict=True)]))


def attack_stream(rmc: RMC, static_model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, kind: str,
                  cfg: AttackRowsConfig, keys: Sequence | None = None, protocol: str = "chen2022",
                  on_input: Callable[[int, InputResult], None] | None = None) -> StreamResult:
    """Attack the inputs `x` (N x C x H x W) in order with `rmc`, the attacker's RMC, from its current state
    (`rmc.reset()` first for a fresh stream). `keys[i]` is the key the scored RMC uses for input i (default: i).
    Returns the chosen sequence and the attack's own verdicts."""
    check_kind(kind)
    cfg.lane(protocol)
    if len(x) != len(y):
        raise RMCError(f"{len(x)} inputs but {len(y)} labels")
    keys = list(range(len(x))) if keys is None else list(keys)
    results = []
    for i in range(len(x)):
        res = attack_input(rmc, static_model, layer, x[i:i + 1], int(y[i]), kind, cfg, keys[i], protocol)
        results.append(res)
        if on_input is not None:
            on_input(i, res)
    images = torch.cat([r.x_adv for r in results]) if results else x[:0].clone()
    return StreamResult(images, [int(v) for v in y], [r.prediction for r in results], results)
