"""RMC's hyperparameters: every one defined once, with what it does and the original's value."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from rmc.checks import check_positive
from rmc.errors import RMCError


class Mode(str, Enum):
    ONLINE = "online"       # the original: adapted weights carry over to the next input, then calibration
    EPISODIC = "episodic"   # reset to the static weights before every input (test-time-adaptation style)


class Scope(str, Enum):
    ALL = "all"     # every trainable parameter (the original)
    HEAD = "head"   # only modules after the feature layer
    BN = "bn"       # only batch-norm affine parameters


class Optimizer(str, Enum):
    STREAM = "stream"          # the original: one Adam for the whole run, its moments carried from input to input
    PER_INPUT = "per-input"    # a fresh Adam for every adaptation and every calibration


PRECISIONS = ("fp32", "bf16")


@dataclass
class RMCConfig:
    k: int = 2048                  # neighbours of each test input in D' (original: 2048 ImageNet, 1024 CIFAR-10)
    lr: float = 1e-5               # Adam learning rate of the local fine-tuning (original: 1e-5)
    adam_eps: float = 1e-8         # Adam's epsilon (torch's default; the original, Keras' Adam: 1e-7)
    optimizer: Optimizer = Optimizer.STREAM   # stream (original: one Adam for the run, part of the online state) |
                                              # per-input
    batch_size: int = 128          # fine-tuning batch size (original: 128)
    max_epochs: int = 100          # epochs over the neighbours at most (original: 100)
    patience: int = 5              # stop when validation loss has not improved for this many epochs (original: 5)
    closest_fraction: float = 0.2  # the closest int(0.2 K) of the K neighbours are split for validation (original)
    val_fraction: float = 0.25     # ... of which ceil(25%) validate, the rest trains (original: sklearn's split)
    restore_best: bool = False     # keep the best-validation weights (Keras' EarlyStopping default keeps the last)
    mode: Mode = Mode.ONLINE       # online (original) or episodic
    calibrate: bool = True         # online only: after each prediction fine-tune on random D' examples
    calib_k: int | None = None     # examples of D' drawn with replacement for calibration (None: k, the original)
    calib_holdout: float = 0.125   # ceil(12.5%) of the calibration sample held out for early stopping (original)
    calib_augment: bool = True     # training-time augmentation during calibration: 2-pixel shift + flip (original,
                                   # ImageNet: crop, flips, colour)
    calib_flip: bool = True        # allow horizontal flips in that augmentation (off for digits)
    scope: Scope = Scope.ALL       # which parameters are fine-tuned
    seed: int = 0                  # all randomness (splits, batch order, calibration samples) derives from it
    precision: str = "fp32"        # fine-tuning arithmetic: fp32, or bf16 (bfloat16 autocast of forward/backward;
                                   # weights, Adam, validation, prediction stay fp32)
    fast_path: bool = True         # fine-tune through an equivalent rewritten graph (batch-norm folded into
                                   # convolutions, channels-last): same function, faster
    cache_head_inputs: bool = True # scope head: train the head on its inputs computed once (the stored neighbour
                                   # features when the head starts with global pooling)

    def __post_init__(self):
        try:
            self.mode, self.scope, self.optimizer = Mode(self.mode), Scope(self.scope), Optimizer(self.optimizer)
        except ValueError as e:
            raise RMCError(f"bad RMC setting: {e}; mode is online|episodic, scope is all|head|bn, optimizer is "
                           "stream|per-input") from None
        for name in ("k", "batch_size", "max_epochs", "patience"):
            check_positive(getattr(self, name), f"rmc.{name}", integer=True)
        check_positive(self.lr, "rmc.lr")
        check_positive(self.adam_eps, "rmc.adam_eps")
        if self.precision not in PRECISIONS:
            raise RMCError(f"rmc.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("fast_path", "cache_head_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise RMCError(f"rmc.{name} must be true or false, got {getattr(self, name)!r}")
        if self.calib_k is not None:
            check_positive(self.calib_k, "rmc.calib_k", integer=True)
        for name in ("closest_fraction", "val_fraction", "calib_holdout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise RMCError(f"rmc.{name} must be a fraction strictly between 0 and 1, got {v!r}")


