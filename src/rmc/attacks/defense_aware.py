"""Defense-aware attacks on online RMC: FPA, GMSA-AVG and GMSA-MIN (Chen et al., ICLR 2022; SPEC section 2).

RMC's prediction for an input comes from a model adapted *for that input*, so an attack crafted against the
static model (the original paper's transfer setting) aims at the wrong function. These attacks aim at the
models RMC actually adapts into. For each test input, in stream order:

1. save RMC's state (the online weights and its step count);
2. round 1: the candidate is PGD against the static model (as in Chen et al.);
3. RMC adapts to the candidate (neighbours of the candidate, fine-tuning) and predicts it; the adapted weights
   join the set of models, and RMC's state is restored exactly;
4. rounds 2..R: the candidate is PGD, from the clean input, against
   - FPA: the model RMC adapted into for the previous candidate,
   - GMSA-AVG: the mean of the per-model losses over all models adapted into so far,
   - GMSA-MIN: the per-example minimum of those losses (every model must be fooled),
   then step 3 again; rounds stop early once RMC misclassifies a candidate;
5. the worst case is kept (the first candidate RMC got wrong, else the one with the lowest true-class margin),
   and RMC processes it for real (adapt, predict, calibrate), so the stream moves on with the chosen input.

The chosen sequence is then re-scored by a fresh RMC run (rmc.evaluation.attack_rows), which is what the
report shows. The models of step 4 are held as state dicts and evaluated with `torch.func.functional_call`
on RMC's own module, so no copy of the network is made per model.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from rmc.attacks.gradient import check_attack_settings, pgd
from rmc.checks import check_positive
from rmc.errors import RMCError
from rmc.models import extract_features
from rmc.seeding import generator


class RMC(Protocol):
    """What the attacks need of the defense (rmc.defense.core.RMC): its adapting network, exact snapshots of its
    state, and a step in two halves (`trial`: adapt and predict; `commit`: calibrate and move on)."""
    model: nn.Module

    def snapshot(self) -> Any: ...
    def restore(self, snap: Any) -> None: ...
    def trial(self, x: torch.Tensor, features: np.ndarray, key=None, rows=None, keep: bool = False) -> Any: ...
    def commit(self, trial: Any) -> int: ...


KINDS = ("fpa", "gmsa-avg", "gmsa-min")
LOSSES = ("ce", "margin")
LABELS = {"fpa": "FPA", "gmsa-avg": "GMSA-AVG", "gmsa-min": "GMSA-MIN"}


@dataclass
class AttackRowsConfig:
    attacks: list[str] = field(default_factory=lambda: ["gmsa-min"])   # defense-aware rows: fpa, gmsa-avg, gmsa-min
    rounds: int = 10                 # rounds per input: candidate -> RMC adapts -> state restored (Chen et al.: 10)
    steps: int = 40                  # PGD iterations per round and in the transfer PGD row (Chen et al.: 40)
    eps: float = 0.1                 # L-inf radius in [0, 1] pixel units, all attack rows (Chen et al.: 8/255, CIFAR-10)
    step_size: float | None = None   # PGD step; None: 2.5 * eps / steps (Madry et al.; Chen et al. used eps / 8)
    n: int | None = None             # inputs in the attack rows: the first n of the evaluation sets; None: all
    transfer_pgd: bool = True        # the transfer row: the same PGD against the static model, then fed to RMC
    autoattack: bool = False         # the transfer AutoAttack row (standard, L-inf, eps) against the static model
    seed_known: bool = True          # the attacker's RMC trials use the defense's own random keys (False: other ones)
    loss: str = "margin"             # rounds 2..R: margin (best other logit - true; never vanishes) | ce (Chen et al.)
    seed: int = 0                    # PGD random starts and AutoAttack's seed

    def __post_init__(self):
        if isinstance(self.attacks, str):
            self.attacks = [self.attacks]
        if not isinstance(self.attacks, (list, tuple)):
            raise RMCError(f"attack_rows.attacks must be a list of {', '.join(KINDS)}; got {self.attacks!r}")
        self.attacks = [str(a).lower() for a in self.attacks]
        unknown = [a for a in self.attacks if a not in KINDS]
        if unknown:
            raise RMCError(f"unknown defense-aware attack {unknown[0]!r}; choose from {', '.join(KINDS)}")
        if len(set(self.attacks)) != len(self.attacks):
            raise RMCError(f"attack_rows.attacks repeats an attack ({self.attacks}); give each once")
        if self.loss not in LOSSES:
            raise RMCError(f"attack_rows.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        check_positive(self.rounds, "attack_rows.rounds", integer=True)
        check_positive(self.steps, "attack_rows.steps", integer=True)
        check_positive(self.eps, "attack_rows.eps")
        if self.n is not None:
            check_positive(self.n, "attack_rows.n", integer=True)
        if self.step_size is not None:
            check_positive(self.step_size, "attack_rows.step_size")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RMCError(f"attack_rows.seed must be an integer >= 0, got {self.seed!r}")
        check_attack_settings(self.eps, self.resolved_step_size, self.steps)

    @property
    def resolved_step_size(self) -> float:
        return float(self.step_size) if self.step_size is not None else 2.5 * self.eps / self.steps


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise RMCError(f"unknown defense-aware attack {kind!r}; choose from {', '.join(KINDS)}")
    return kind


# -- losses over the set of adapted models ---------------------------------------------------------------------
class AdaptedModels(nn.Module):
    """Logits of every adapted model on a batch: N x M x classes. The models are state dicts of `module`."""

    def __init__(self, module: nn.Module, states: Sequence[dict[str, torch.Tensor]]):
        super().__init__()
        if not states:
            raise RMCError("no adapted models to attack")
        self.module, self.states = module, list(states)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([functional_call(self.module, s, (x,)) for s in self.states], 1)


def ensemble_loss(kind: str, loss: str = "margin") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(N x M x classes logits, labels) -> per-example loss: the mean (GMSA-AVG, and FPA's single model) or the
    minimum (GMSA-MIN) over the M models of each model's loss of the true label.

    `loss`: "ce", the cross-entropy (Chen et al.), or "margin", the best other logit minus the true one. RMC's
    fine-tuning can make the adapted network so confident that the cross-entropy's gradient underflows to exactly
    zero (PGD then stalls: gradient masking); the margin's gradient does not vanish."""
    check_kind(kind)
    if loss not in LOSSES:
        raise RMCError(f"attack loss must be one of {', '.join(LOSSES)}, got {loss!r}")

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
        return per_model.min(1).values if kind == "gmsa-min" else per_model.mean(1)
    return per_example


def margin(logits: torch.Tensor, label: int) -> float:
    """True-class logit minus the best other one: negative means misclassified."""
    other = logits.clone()
    other[label] = -math.inf
    return float(logits[label] - other.max())


# -- the attack ------------------------------------------------------------------------------------------------
@dataclass
class RoundInfo:
    round: int            # 1-based
    target: str           # what the candidate was crafted against: "static", "adapted" (FPA) or "adapted x M"
    prediction: int       # RMC's prediction of the candidate
    margin: float         # its true-class margin (negative: RMC fooled)
    adapt_epochs: int


@dataclass
class InputResult:
    x_adv: torch.Tensor           # 1 x C x H x W: the chosen candidate
    prediction: int               # RMC's prediction of it during the attack
    logits: list[float]
    chosen_round: int             # 1-based
    rounds: list[RoundInfo]
    calib_epochs: int
    seconds: float

    def record(self) -> dict:
        """The per-example fields the evaluation writes (besides index, label and pred)."""
        return {"attack_pred": self.prediction, "chosen_round": self.chosen_round, "rounds": len(self.rounds),
                "round_preds": [r.prediction for r in self.rounds],
                "round_margins": [round(r.margin, 4) for r in self.rounds], "calib_epochs": self.calib_epochs,
                "seconds": round(self.seconds, 3)}


def initial_candidates(static_model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: AttackRowsConfig) -> torch.Tensor:
    """Round 1 of every input: PGD against the static model (also the transfer PGD row, so they coincide)."""
    static_model.eval()
    gen = generator(cfg.seed, "transfer-pgd")
    return pgd(static_model, x, y, cfg.eps, cfg.resolved_step_size, cfg.steps, random_start=True, generator=gen)


def attack_input(rmc: RMC, static_model: nn.Module, layer: str, x: torch.Tensor, y: int, kind: str,
                 cfg: AttackRowsConfig, key, initial: torch.Tensor | None = None) -> InputResult:
    """Attack one input `x` (1 x C x H x W) of true class `y` against `rmc` in its current state, then let RMC
    process the chosen candidate so its state moves on (SPEC section 2). `key` is the key the defense uses for
    this input (`RMC.step`'s key); `initial` is round 1's candidate (default: PGD against the static model)."""
    check_kind(kind)
    if x.dim() != 4 or len(x) != 1:
        raise RMCError(f"attack_input takes one input (1 x C x H x W), got shape {tuple(x.shape)}")
    t0 = time.perf_counter()
    step = cfg.resolved_step_size
    label = torch.tensor([int(y)])
    start = rmc.snapshot()
    models: list[dict[str, torch.Tensor]] = []
    rounds: list[RoundInfo] = []
    best: tuple[float, int, torch.Tensor, Any] | None = None   # (margin, round, candidate, its trial)
    for r in range(1, cfg.rounds + 1):
        if r == 1:
            target = "static"
            if initial is None:
                with torch.enable_grad():
                    initial = initial_candidates(static_model, x, label, cfg)
            cand = initial
        else:
            attacked = models[-1:] if kind == "fpa" else models
            target = "adapted" if kind == "fpa" else f"adapted x {len(attacked)}"
            gen = generator(cfg.seed, kind, key, r)
            with torch.enable_grad():
                cand = pgd(AdaptedModels(rmc.model, attacked), x, label, cfg.eps, step, cfg.steps,
                           random_start=True, generator=gen, loss_fn=ensemble_loss(kind, cfg.loss))
        cand = cand.detach()
        feats = extract_features(static_model, layer, cand).numpy()
        t = rmc.trial(cand, feats, key if cfg.seed_known else ("attacker", key, r), keep=True)
        models.append(t.adapted.weights)
        m = margin(t.logits, int(y))
        rounds.append(RoundInfo(r, target, int(t.logits.argmax()), m, t.adapt_epochs))
        if best is None or m < best[0]:
            best = (m, r, cand, t)
        rmc.restore(start)
        if m < 0:
            break   # RMC got it wrong: that is the worst case
    _, chosen, cand, t = best
    calib = rmc.commit(t)
    return InputResult(cand, int(t.logits.argmax()), t.logits.tolist(), chosen, rounds, calib,
                       time.perf_counter() - t0)


@dataclass
class StreamResult:
    images: torch.Tensor          # N x C x H x W: the chosen adversarial sequence
    labels: list[int]
    predictions: list[int]        # RMC's predictions during the attack
    inputs: list[InputResult]

    @property
    def accuracy(self) -> float:
        return float(np.mean([p == y for p, y in zip(self.predictions, self.labels)])) if self.labels else math.nan


def attack_stream(rmc: RMC, static_model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor, kind: str,
                  cfg: AttackRowsConfig, keys: Sequence | None = None,
                  on_input: Callable[[int, InputResult], None] | None = None) -> StreamResult:
    """Attack the inputs `x` (N x C x H x W) in order against `rmc` from its current state (`rmc.reset()` first
    for a fresh stream). `keys[i]` is the key RMC uses for input i (default: i). Returns the chosen sequence."""
    check_kind(kind)
    if len(x) != len(y):
        raise RMCError(f"{len(x)} inputs but {len(y)} labels")
    keys = list(range(len(x))) if keys is None else list(keys)
    with torch.enable_grad():
        initial = initial_candidates(static_model, x, y, cfg)
    results = []
    for i in range(len(x)):
        res = attack_input(rmc, static_model, layer, x[i:i + 1], int(y[i]), kind, cfg, keys[i], initial[i:i + 1])
        results.append(res)
        if on_input is not None:
            on_input(i, res)
    images = torch.cat([r.x_adv for r in results]) if results else x[:0].clone()
    return StreamResult(images, [int(v) for v in y], [r.prediction for r in results], results)

