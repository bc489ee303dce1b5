"""The RMC algorithm (Wu, Yuan & Wu, ICML 2020): per test input, fine-tune on its nearest neighbours in D'.

This module never opens a file: it takes a model, D' as tensors (a `Bank`), a neighbour index and a config.
Pure helpers (`configure_model`, `collect_params`, `split_neighbours`, `fine_tune`) do one thing each; the
`RMC` class holds the online state (the adapted weights) and runs the per-input loop of SPEC section 1.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rmc.checks import check_positive
from rmc.errors import RMCError
from rmc.knn import NeighbourIndex


class Mode(str, Enum):
    ONLINE = "online"       # the original: adapted weights carry over to the next input, then calibration
    EPISODIC = "episodic"   # reset to the static weights before every input (test-time-adaptation style)


class Scope(str, Enum):
    ALL = "all"     # every trainable parameter (the original)
    HEAD = "head"   # only modules after the feature layer
    BN = "bn"       # only batch-norm affine parameters


@dataclass
class RMCConfig:
    k: int = 2048                  # neighbours of each test input in D' (original: 2048 ImageNet, 1024 CIFAR-10)
    lr: float = 1e-5               # Adam learning rate of the local fine-tuning (original: 1e-5)
    batch_size: int = 128          # fine-tuning batch size (original: 128)
    max_epochs: int = 100          # epochs over the neighbours at most (original: 100)
    patience: int = 5              # stop when validation loss has not improved for this many epochs (original: 5)
    closest_fraction: float = 0.2  # the closest part of the K neighbours that is split for validation
    val_fraction: float = 0.25     # ... of which this share is the validation set; the rest trains
    restore_best: bool = False     # keep the best-validation weights (Keras' EarlyStopping default keeps the last)
    mode: Mode = Mode.ONLINE       # online (original) or episodic
    calibrate: bool = True         # online only: after each prediction fine-tune on random D' examples
    calib_k: int | None = None     # examples drawn for calibration (None: same as k)
    calib_holdout: float = 0.125   # share of the calibration sample held out for early stopping
    calib_augment: bool = True     # training-time augmentation (random shift, flip) during calibration
    calib_flip: bool = True        # allow horizontal flips in that augmentation (off for digits)
    scope: Scope = Scope.ALL       # which parameters are fine-tuned
    seed: int = 0                  # all randomness (splits, batch order, calibration samples) derives from it

    def __post_init__(self):
        try:
            self.mode, self.scope = Mode(self.mode), Scope(self.scope)
        except ValueError as e:
            raise RMCError(f"bad RMC setting: {e}; mode is online|episodic, scope is all|head|bn") from None
        for name in ("k", "batch_size", "max_epochs", "patience"):
            check_positive(getattr(self, name), f"rmc.{name}", integer=True)
        check_positive(self.lr, "rmc.lr")
        if self.calib_k is not None:
            check_positive(self.calib_k, "rmc.calib_k", integer=True)
        for name in ("closest_fraction", "val_fraction", "calib_holdout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise RMCError(f"rmc.{name} must be a fraction strictly between 0 and 1, got {v!r}")


@dataclass
class Bank:
    """D' in memory or memory-mapped: uint8 images (N x C x H x W), true labels, and which copy each row is."""
    images: torch.Tensor | np.ndarray
    labels: torch.Tensor
    copy: torch.Tensor                    # 0 = clean, i = i-th adversarial copy
    copy_names: list[str] = field(default_factory=lambda: ["clean"])

    def __len__(self) -> int:
        return len(self.labels)

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Float images in [0, 1] and labels of the given rows (one sorted read from a memory map)."""
        rows = np.asarray(rows)
        order = np.argsort(rows, kind="stable")
        images = self.images[rows[order]] if isinstance(self.images, np.ndarray) else self.images[torch.from_numpy(rows[order])]
        images = torch.as_tensor(np.asarray(images) if isinstance(images, np.ndarray) else images)
        inverse = torch.from_numpy(np.argsort(order, kind="stable"))
        x = images[inverse]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        return x, self.labels[torch.from_numpy(rows)]


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (so each input's randomness is independent of run order)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def configure_model(model: nn.Module, scope: Scope | str = Scope.ALL, feature_layer: str | None = None) -> nn.Module:
    """Inference mode throughout (batch-norm running statistics frozen, dropout off); only `scope` trains."""
    model.eval()
    model.requires_grad_(False)
    for p in collect_params(model, scope, feature_layer):
        p.requires_grad_(True)
    return model


def collect_params(model: nn.Module, scope: Scope | str = Scope.ALL, feature_layer: str | None = None) -> list[nn.Parameter]:
    scope = Scope(scope)
    if scope is Scope.ALL:
        return list(model.parameters())
    if scope is Scope.BN:
        params = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
        if not params:
            raise RMCError("scope 'bn' but the model has no batch-norm layers; use scope 'all'")
        return params
    if feature_layer is None:
        raise RMCError("scope 'head' needs the feature layer name")
    names = [n for n, _ in model.named_modules()]
    if feature_layer not in names:
        raise RMCError(f"model has no layer {feature_layer!r}")
    after = names[names.index(feature_layer) + 1:]
    inside = [n for n in after if n.startswith(feature_layer + ".")]
    head = {n for n in after if n not in inside}
    params = [p for n, m in model.named_modules() if n in head for p in m.parameters(recurse=False)]
    if not params:
        raise RMCError(f"no parameters after layer {feature_layer!r}; choose scope 'all' or an earlier layer")
    return params


def split_neighbours(n: int, closest_fraction: float, val_fraction: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into the distance-sorted neighbour list) for training and validation.

    The closest `closest_fraction` are shuffled and split: `val_fraction` of them validate, the rest join the
    farther neighbours in the training set.
    """
    n_close = max(2, int(round(n * closest_fraction))) if n >= 2 else n
    n_val = max(1, int(round(n_close * val_fraction)))
    close = torch.randperm(n_close, generator=gen)
    val = close[:n_val].sort().values
    train = torch.cat([close[n_val:].sort().values, torch.arange(n_close, n)])
    return train, val


@dataclass
class FitResult:
    epochs: int            # epochs run
    best_val_loss: float
    stopped_early: bool


def random_shift_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """The usual training-time augmentation: random translation by up to `pad` pixels, random horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    if flip:
        mirrored = torch.rand(n, generator=gen) < 0.5
        cols = torch.where(mirrored[:, None, None, None], cols.flip(-1), cols)
    return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


def fine_tune(model: nn.Module, params: list[nn.Parameter], x_train: torch.Tensor, y_train: torch.Tensor,
              x_val: torch.Tensor, y_val: torch.Tensor, cfg: RMCConfig, gen: torch.Generator,
              augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> FitResult:
    """Adam on (x_train, y_train) with early stopping on the validation loss (one forward pass per epoch)."""
    opt = torch.optim.Adam(params, lr=cfg.lr)
    best, wait, best_state, epoch = float("inf"), 0, None, 0
    n = len(x_train)
    for epoch in range(1, cfg.max_epochs + 1):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb = x_train[idx]
            if augment is not None:
                xb = augment(xb, gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            val_loss = F.cross_entropy(model(x_val), y_val).item()
        if val_loss < best:
            best, wait = val_loss, 0
            if cfg.restore_best:
                best_state = [p.detach().clone() for p in params]
        else:
            wait += 1
            if wait >= cfg.patience:
                break
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
    return FitResult(epoch, best, epoch < cfg.max_epochs)


@dataclass
class StepResult:
    prediction: int
    logits: list[float]
    neighbours: np.ndarray       # D' rows of the K neighbours, closest first
    adapt_epochs: int
    calib_epochs: int
    adapted_state: dict[str, torch.Tensor] | None = None   # weights that made the prediction (if asked for)


class RMC:
    """Runtime Masking and Cleansing around a static model.

    `step(x, features)` classifies one input: neighbours -> split -> fine-tune -> predict -> (online) calibrate.
    `state_dict()` / `load_state_dict()` save and restore the online state exactly (the adapted weights).
    """

    def __init__(self, model: nn.Module, bank: Bank, index: NeighbourIndex, config: RMCConfig,
                 feature_layer: str | None = None):
        if config.k > len(bank):
            raise RMCError(f"rmc.k = {config.k} exceeds |D'| = {len(bank)}; lower k")
        self.cfg = config
        self.bank, self.index = bank, index
        # RMC adapts its own copy: the caller's static model stays untouched (baselines, attacks use it).
        self.model = configure_model(copy.deepcopy(model), config.scope, feature_layer)
        self.params = collect_params(self.model, config.scope, feature_layer)
        self.static_state = copy.deepcopy(self.state_dict())
        self.steps_done = 0

    # -- online state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)

    def reset(self) -> None:
        """Back to the static weights."""
        self.load_state_dict(self.static_state)

    # -- the per-input loop -----------------------------------------------------------------------------
    def neighbours(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        return self.index.search(features, self.cfg.k)[1]

    def adapt(self, rows: np.ndarray, gen: torch.Generator) -> FitResult:
        """Fine-tune on the neighbours `rows` (closest first) with the 20% / 75-25 validation split."""
        x, y = self.bank.gather(rows)
        train, val = split_neighbours(len(rows), self.cfg.closest_fraction, self.cfg.val_fraction, gen)
        return fine_tune(self.model, self.params, x[train], y[train], x[val], y[val], self.cfg, gen)

    def calibrate(self, gen: torch.Generator) -> FitResult:
        """Pull the drifting online model back: fine-tune on random D' examples, 12.5% held out."""
        k = self.cfg.calib_k or self.cfg.k
        rows = torch.randperm(len(self.bank), generator=gen)[:k].numpy()
        x, y = self.bank.gather(rows)
        n_val = max(1, int(round(k * self.cfg.calib_holdout)))
        augment = None
        if self.cfg.calib_augment:
            flip = self.cfg.calib_flip
            augment = lambda xb, g: random_shift_flip(xb, g, flip=flip)  # noqa: E731
        return fine_tune(self.model, self.params, x[n_val:], y[n_val:], x[:n_val], y[:n_val], self.cfg, gen, augment)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def step(self, x: torch.Tensor, features: torch.Tensor | np.ndarray, key=None,
             rows: np.ndarray | None = None, keep_adapted: bool = False) -> StepResult:
        """Classify one input `x` (1 x C x H x W, [0, 1]) whose static-model features are `features`.

        `key` identifies the input for its randomness (default: the running count), so results do not
        depend on what ran before in episodic mode and are reproducible in online mode.
        `keep_adapted` returns a copy of the adapted weights (before calibration): defense-aware attacks use it.
        """
        key = self.steps_done if key is None else key
        gen = generator(self.cfg.seed, "step", key)
        if self.cfg.mode is Mode.EPISODIC:
            self.reset()
        if rows is None:
            rows = self.neighbours(features)[0]
        fit = self.adapt(rows, gen)
        logits = self.predict(x)[0]
        adapted = self.state_dict() if keep_adapted else None
        calib = 0
        if self.cfg.mode is Mode.ONLINE and self.cfg.calibrate:
            calib = self.calibrate(gen).epochs
        self.steps_done += 1
        return StepResult(int(logits.argmax()), logits.tolist(), rows, fit.epochs, calib, adapted)
