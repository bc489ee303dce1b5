"""The settings of the attack rows, and the two protocols of the defense-aware attacks.

- `chen2022`: Chen et al.'s sequence attack (ICLR 2022; their public `RMC/eval_rmc_sequence.py`) as they ran it:
  cross-entropy, step eps/8, best-loss iterate (the clean input included), GMSA-MIN with steps x models
  iterations, round 1 against the current online model, the model before adaptation in the GMSA set, the first
  candidate that fools the attacker's RMC kept (none: the clean input). The attacker drives its own copy of the
  online RMC under its own random keys (its trials, its verdict on the chosen input and its calibration all draw
  keys the scored RMC never uses, so its online state drifts along its own stream); the chosen sequence is then
  scored by a separate RMC pass with fresh keys (rmc.evaluation.attack_rows), which is the reported accuracy.
- `strong`: every choice that makes the attack stronger: the attacker's RMC *is* the scored one (its exact online
  state and random keys), the logit-margin loss, more iterations, several random restarts, the lowest-margin
  candidate kept when nothing fools RMC, and, when its own rounds all fail, Chen et al.'s rounds from the same
  state as a last try (so from one state and one key it is never weaker on an input).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rmc.attacks.gradient import check_attack_settings
from rmc.attacks.kinds import ATTACK_KINDS
from rmc.attacks.kinds import PROTOCOLS as PROTOCOL_REGISTRY
from rmc.checks import check_positive
from rmc.errors import RMCError

KINDS = ATTACK_KINDS.names()
PROTOCOLS = PROTOCOL_REGISTRY.names()
LABELS = ATTACK_KINDS.labels()


@dataclass(frozen=True)
class Lane:
    """How one protocol crafts and picks candidates (resolved from AttackRowsConfig)."""
    protocol: str
    loss: str              # "ce" (Chen et al.) or "margin" (best other logit - true: its gradient never underflows)
    steps: int             # PGD iterations per round (GMSA-MIN: times the number of models, as Chen et al.)
    step_size: float
    restarts: int          # PGD runs per round from independent random starts; the highest attack loss wins
    keys_known: bool       # the attacker's RMC is the scored one (exact state and keys); else its own copy, own keys
    keep_clean: bool       # nothing fooled RMC: it receives the clean input (Chen et al.); else the lowest margin

    @property
    def attacker_rmc(self) -> str:
        """Which RMC the attacker runs (recorded with the row): the scored stream itself, or its own copy."""
        return "scored-stream" if self.keys_known else "own-copy"


@dataclass
class AttackRowsConfig:
    attacks: list[str] = field(default_factory=lambda: ["gmsa-min"])   # defense-aware rows: fpa, gmsa-avg, gmsa-min
    protocols: list[str] = field(default_factory=lambda: ["chen2022", "strong"])   # each attack once per protocol:
                                                                                   # chen2022 (Chen et al. exactly) |
                                                                                   # strong
    rounds: int = 10                 # rounds per input: candidate -> RMC adapts -> state restored (Chen et al.: 10)
    steps: int = 40                  # PGD iterations per round and in the transfer PGD row (Chen et al.: 40)
    eps: float = 0.1                 # L-inf radius in [0, 1] pixel units, all attack rows (Chen et al.: 8/255,
                                     # CIFAR-10)
    step_size: float | None = None   # PGD step; None: eps / 8 (Chen et al.'s 1/255 at 8/255)
    strong_steps_factor: int = 2     # strong: PGD iterations per round = this x steps (x models for GMSA-MIN)
    strong_restarts: int = 2         # strong: PGD runs per round from independent random starts (Chen et al.: 1)
    strong_fallback: bool = True     # strong: when its rounds all fail, try chen2022's rounds from the same state
    n: int | None = None             # inputs in the attack rows: the first n of the evaluation sets; None: all
    transfer_pgd: bool = True        # the transfer row: the same PGD against the static model, then fed to RMC
    autoattack: bool = False         # the transfer AutoAttack row (standard, L-inf, eps) against the static model
    rand_n: int = 0                  # AutoAttack 'rand' (APGD-CE + APGD-DLR with EOT) against episodic stateless RMC on
                                     # the first rand_n inputs; 0: no row
    rand_eot: int = 2                # its EOT samples per gradient (AutoAttack rand: 20; each costs a full adaptation)
    rand_steps: int = 10             # its APGD iterations per attack (AutoAttack: 100; torchattacks' default 10)
    seed: int = 0                    # PGD random starts and AutoAttack's seed

    def __post_init__(self):
        for name, allowed in (("attacks", KINDS), ("protocols", PROTOCOLS)):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise RMCError(f"attack_rows.{name} must be a list of {', '.join(allowed)}; got {value!r}")
            value = [str(a).lower() for a in value]
            unknown = [a for a in value if a not in allowed]
            if unknown:
                what = "defense-aware attack" if name == "attacks" else "attack protocol"
                raise RMCError(f"unknown {what} {unknown[0]!r}; choose from {', '.join(allowed)}")
            if len(set(value)) != len(value):
                raise RMCError(f"attack_rows.{name} repeats an entry ({value}); give each once")
            setattr(self, name, value)
        if self.attacks and not self.protocols:
            raise RMCError("attack_rows.protocols is empty; give chen2022, strong or both (or no attacks)")
        for name in ("rounds", "steps", "strong_steps_factor", "strong_restarts", "rand_eot", "rand_steps"):
            check_positive(getattr(self, name), f"attack_rows.{name}", integer=True)
        check_positive(self.eps, "attack_rows.eps")
        if self.n is not None:
            check_positive(self.n, "attack_rows.n", integer=True)
        if self.step_size is not None:
            check_positive(self.step_size, "attack_rows.step_size")
        for name in ("seed", "rand_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise RMCError(f"attack_rows.{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.strong_fallback, bool):
            raise RMCError(f"attack_rows.strong_fallback must be true or false, got {self.strong_fallback!r}")
        check_attack_settings(self.eps, self.resolved_step_size, self.steps)

    @property
    def resolved_step_size(self) -> float:
        return float(self.step_size) if self.step_size is not None else self.eps / 8

    def lane(self, protocol: str) -> Lane:
        if protocol == "chen2022":
            return Lane("chen2022", "ce", self.steps, self.resolved_step_size, 1, keys_known=False, keep_clean=True)
        if protocol == "strong":
            return Lane("strong", "margin", self.steps * self.strong_steps_factor, self.resolved_step_size,
                        self.strong_restarts, keys_known=True, keep_clean=False)
        raise RMCError(f"unknown attack protocol {protocol!r}; choose from {', '.join(PROTOCOLS)}")


def check_kind(kind: str) -> str:
    return ATTACK_KINDS[kind].name
