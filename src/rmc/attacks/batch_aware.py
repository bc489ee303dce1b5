"""Defense-aware attacks on a batch-transductive defense (DENT): FPA, GMSA-AVG and GMSA-MIN per test batch, as Chen
et al. (ICLR 2022) ran them against DENT (their DENT/eval_dent_gmsa.py and utils/pgd_attack.py), and `strong`.

The test inputs are cut into batches of the defense's own size, in order (`reorder`: first sorted by label within
windows of two batches, their ATTACK.REORDER, which fills a batch with few classes). Per batch:
1. save the defense's state; the model set starts with the static model (F0: the model before adaptation);
2. each round crafts a candidate batch from the clean one: per input, `restarts` untargeted PGD runs of the logit
   margin (best other logit minus the true one) from random starts and, with `targeted`, one run towards each
   other class (that class's logit minus the true one), each returning its best-loss iterate (the clean input
   included); across runs the iterate with the largest error wins (the largest wrong-class probability; GMSA: the
   minimum / mean over the models). Round 1 attacks F0; FPA the model adapted for the previous candidate batch;
   GMSA-AVG / GMSA-MIN the mean / per-example minimum over every model so far (GMSA-MIN: steps x models
   iterations);
3. the defense adapts to the candidate batch and predicts it; the adapted model joins the set; the state is restored.
   Every round runs (theirs does not stop early);
4. `chen2022` keeps the candidate batch with the lowest batch accuracy (the clean batch when no round lowers it).
   `strong` runs more iterations and restarts, composes per input the lowest-margin candidate of its rounds and keeps
   that batch if the defense does worse on it; when `fallback`, it also runs chen2022's rounds from the same state
   and keeps their pick if the defense does worse on that (never weaker than chen2022 on a batch).
The defense then processes the chosen batch (`commit`). Its randomness (Chen et al.'s ATTACK.RANDOM, which the
attacker may know or not) does not exist for a deterministic defense such as DENT; the chosen sequence is re-scored
by a fresh pass all the same (their "private" setting; rmc.evaluation.batch_defense).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rmc.attacks.defense_aware import ModelSet, pgd_best
from rmc.attacks.kinds import ATTACK_KINDS, PROTOCOLS
from rmc.attacks.protocols import AttackRowsConfig
from rmc.checks import check_positive
from rmc.errors import RMCError
from rmc.interface import Defense
from rmc.seeding import generator


@dataclass
class BatchRowsConfig:
    rounds: int = 3                  # rounds per test batch: candidate batch -> the defense adapts -> restored
                                     # (Chen et al. on DENT: 3)
    steps: int = 100                 # PGD iterations per run (Chen et al. on DENT: 100; GMSA-MIN: x the models)
    restarts: int = 5                # untargeted PGD runs per round from random starts (Chen et al. on DENT: 5)
    targeted: bool = True            # also one targeted run towards each other class per round (Chen et al.: yes)
    reorder: bool = False            # sort the inputs by label within windows of two batches first (Chen et al.'s
                                     # REORDER, off by default)

    def __post_init__(self):
        for name in ("rounds", "steps", "restarts"):
            check_positive(getattr(self, name), f"batch_rows.{name}", integer=True)
        for name in ("targeted", "reorder"):
            if not isinstance(getattr(self, name), bool):
                raise RMCError(f"batch_rows.{name} must be true or false, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class BatchLane:
    """How one protocol crafts and picks candidate batches (resolved from BatchRowsConfig and AttackRowsConfig)."""
    protocol: str
    steps: int
    restarts: int
    targeted: bool
    compose: bool       # per input, the lowest-margin candidate of the rounds (strong)
    fallback: bool      # chen2022's rounds from the same state when they do better (strong)


def batch_lane(brows: BatchRowsConfig, acfg: AttackRowsConfig, protocol: str) -> BatchLane:
    PROTOCOLS[protocol]
    if protocol == "chen2022":
        return BatchLane(protocol, brows.steps, brows.restarts, brows.targeted, compose=False, fallback=False)
    return BatchLane(protocol, brows.steps * acfg.strong_steps_factor, brows.restarts * acfg.strong_restarts,
                     brows.targeted, compose=True, fallback=acfg.strong_fallback)


def batch_order(labels: torch.Tensor, batch_size: int, reorder: bool) -> list[np.ndarray]:
    """Positions of the inputs in each batch, in order: consecutive runs of `batch_size`, after (with `reorder`)
    sorting by label within each window of 2 x batch_size (a stable sort, so ties keep their order)."""
    y = np.asarray(labels)
    order = np.arange(len(y))
    if reorder:
        window = 2 * batch_size
        order = np.concatenate([w[np.argsort(y[w], kind="stable")] for w in np.array_split(order, range(
            window, len(y), window))]) if len(y) else order
    return [order[a:a + batch_size] for a in range(0, len(y), batch_size)]


# -- losses ----------------------------------------------------------------------------------------------------
def _reduce(kind: str, per_model: torch.Tensor) -> torch.Tensor:
    return per_model.min(1).values if ATTACK_KINDS[kind].reduce == "min" else per_model.mean(1)


def margin_loss(kind: str, targets: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """(N x M x classes logits, labels) -> per-example loss to ascend over the M models: untargeted, the best other
    logit minus the true one; towards `targets`, the target's logit minus the true one."""
    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        true = logits.gather(2, y[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
        if targets is None:
            other = logits.masked_fill(F.one_hot(y, logits.shape[2]).bool()[:, None], -torch.inf).max(2).values
        else:
            other = logits.gather(2, targets[:, None, None].expand(-1, logits.shape[1], 1))[..., 0]
        return _reduce(kind, other - true)
    return loss


def error(kind: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per example, the largest probability of a wrong class (N x M x classes logits), reduced over the models:
    how Chen et al. pick among PGD runs."""
    p = logits.softmax(2).masked_fill(F.one_hot(y, logits.shape[2]).bool()[:, None], 0.0)
    return _reduce(kind, p.max(2).values)


def true_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """N x classes logits -> the true logit minus the best other one (negative: misclassified)."""
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -torch.inf).max(1).values
    return logits.gather(1, y[:, None])[:, 0] - other


def craft(ensemble: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, lane: BatchLane, eps: float,
          step_size: float, iterations: int, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """One round's candidate batch: the largest-error iterate over the lane's untargeted and targeted runs."""
    with torch.no_grad():
        best_err = error(kind, ensemble(x), y)
    best = x.clone()
    runs: list[torch.Tensor | None] = [None] * lane.restarts
    if lane.targeted:
        runs += [(y + k) % num_classes for k in range(1, num_classes)]
    for target in runs:
        with torch.enable_grad():
            cand, _ = pgd_best(ensemble, x, y, eps, step_size, iterations, margin_loss(kind, target), gen)
        with torch.no_grad():
            err = error(kind, ensemble(cand), y)
        better = err > best_err
        best[better], best_err = cand[better], torch.where(better, err, best_err)
    return best


# -- the attack ------------------------------------------------------------------------------------------------
@dataclass
class BatchRound:
    round: int
    lane: str
    models: int
    iterations: int
    candidate: torch.Tensor
    predictions: torch.Tensor     # the defense's predictions of the candidate batch
    margins: torch.Tensor         # their true-class margins (negative: fooled)

    @property
    def accuracy(self) -> float:
        return float((self.margins > 0).float().mean())


@dataclass
class BatchResult:
    x_adv: torch.Tensor           # the chosen batch (what the defense received)
    predictions: list[int]        # the defense's predictions of it
    chosen_round: list[int]       # per input: the round its candidate came from (0: clean; -1: chen2022 fallback)
    rounds: list[BatchRound]
    seconds: float
    protocol: str
    extra: dict = field(default_factory=dict)

    def records(self) -> list[dict]:
        """Per input: the fields the evaluation writes besides index, label and pred (as rmc.attacks.defense_aware:
        `round_preds` are the defense's predictions of the input in each of the protocol's own rounds)."""
        main = [r for r in self.rounds if r.lane == self.protocol]
        per_input = round(self.seconds / max(1, len(self.predictions)), 4)
        out = []
        for i, p in enumerate(self.predictions):
            rec = {"attack_pred": p, "protocol": self.protocol, "chosen_round": self.chosen_round[i],
                   "rounds": len(main), "round_preds": [int(r.predictions[i]) for r in main],
                   "round_margins": [round(float(r.margins[i]), 4) for r in main],
                   "iterations": [r.iterations for r in main], "seconds": per_input}
            fallback = [int(r.predictions[i]) for r in self.rounds if r.lane != self.protocol]
            if fallback:
                rec["fallback_preds"] = fallback
            out.append(rec)
        return out


def _rounds(defense: Defense, static_model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str, lane: BatchLane,
            rounds: int, acfg: AttackRowsConfig, num_classes: int, key: Any, start: Any) -> list[BatchRound]:
    spec = ATTACK_KINDS[kind]
    models: list[nn.Module | dict[str, torch.Tensor]] = [static_model]
    out = []
    for r in range(1, rounds + 1):
        targets = models[-1:] if spec.last_model_only else models
        iterations = lane.steps * (len(targets) if spec.iterations_per_model else 1)
        gen = generator(acfg.seed, "batch", kind, lane.protocol, key, r)
        cand = craft(ModelSet(defense.model, targets), x, y, kind, lane, acfg.eps, acfg.resolved_step_size,
                     iterations, num_classes, gen)
        t = defense.trial(cand, key=key, keep=True)
        defense.restore(start)
        models.append(t.adapted.weights)
        out.append(BatchRound(r, lane.protocol, len(targets), iterations, cand, t.logits.argmax(1),
                              true_margin(t.logits, y)))
    return out


def _lowest_accuracy(clean: BatchRound, rounds: list[BatchRound]) -> BatchRound:
    """Chen et al.'s pick: the first round whose batch accuracy is below every earlier one's (the clean batch's
    included)."""
    best = clean
    for r in rounds:
        if r.accuracy < best.accuracy:
            best = r
    return best


def attack_batch(defense: Defense, static_model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str,
                 protocol: str, acfg: AttackRowsConfig, brows: BatchRowsConfig, num_classes: int,
                 key: Any = 0) -> BatchResult:
    """Attack one test batch `x` (N x C x H x W) of true classes `y` against `defense`, which then processes the
    chosen batch (`commit`). `key` names the batch (its PGD randomness)."""
    ATTACK_KINDS[kind]
    if x.dim() != 4 or len(x) != len(y) or len(x) == 0:
        raise RMCError(f"attack_batch takes a batch N x C x H x W with N labels, got {tuple(x.shape)} and {len(y)}")
    lane = batch_lane(brows, acfg, protocol)
    t0 = time.perf_counter()
    start = defense.snapshot()
    c = defense.trial(x, key=key, keep=False)
    defense.restore(start)
    clean = BatchRound(0, protocol, 0, 0, x, c.logits.argmax(1), true_margin(c.logits, y))
    done = _rounds(defense, static_model, x, y, kind, lane, brows.rounds, acfg, num_classes, key, start)
    chosen = _lowest_accuracy(clean, done)
    pick, rounds_of, margins = chosen.candidate, [chosen.round] * len(x), chosen.margins
    if lane.compose:
        every = [clean] + done
        which = torch.stack([r.margins for r in every]).argmin(0)          # per input, its lowest-margin round
        composed = torch.stack([every[int(w)].candidate[i] for i, w in enumerate(which)])
        t = defense.trial(composed, key=key)
        defense.restore(start)
        m = true_margin(t.logits, y)
        if (m > 0).float().mean() < (margins > 0).float().mean():
            pick, margins, rounds_of = composed, m, [int(every[int(w)].round) for w in which]
    all_rounds = list(done)
    if lane.fallback:
        chen = _rounds(defense, static_model, x, y, kind, batch_lane(brows, acfg, "chen2022"), brows.rounds, acfg,
                       num_classes, key, start)
        all_rounds += chen
        other = _lowest_accuracy(clean, chen)
        if other.accuracy < float((margins > 0).float().mean()):
            pick, rounds_of = other.candidate, [-1 if other.round else 0] * len(x)
    final = defense.trial(pick, key=key)
    defense.commit(final)
    return BatchResult(pick.detach().clone(), final.logits.argmax(1).tolist(), rounds_of, all_rounds,
                       time.perf_counter() - t0, protocol)


__all__ = ["BatchLane", "BatchResult", "BatchRound", "BatchRowsConfig", "attack_batch", "batch_lane", "batch_order",
           "craft", "error", "margin_loss", "true_margin"]
