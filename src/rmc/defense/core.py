"""The RMC algorithm (Wu, Yuan & Wu, ICML 2020): per test input, fine-tune on its nearest neighbours in D'.

This module never opens a file: it takes a model, D' as tensors (`DPrime`), a neighbour index and a config.
Pure helpers (`split_neighbours`, `fine_tune`) do one thing each; the `RMC` class holds the online state (the
adapted weights and the stream's Adam) and runs the per-input loop of the paper:
`trial` (neighbours -> split -> fine-tune -> predict) then `commit` (online: calibrate), which together are `step`.
How fine-tuning computes logits (the plain model, a faster equivalent graph, a cached head) is handed in as a
`Forward` factory (rmc.defense.forwards builds the fast ones); profiling is an optional hook (rmc.defense.profiling).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rmc.data.augment import random_shift_flip
from rmc.defense.config import Mode, Optimizer, RMCConfig
from rmc.defense.dprime import DPrime
from rmc.defense.forwards import Forward, PlainForward
from rmc.defense.optim import (
    autocast_context,
    check_precision,
    load_optimizer_state,
    make_optimizer,
    optimizer_state,
    split_state,
)
from rmc.defense.scope import collect_params, configure_model
from rmc.errors import RMCError
from rmc.interface import Adaptation
from rmc.seeding import generator

Hook = Callable[[str | None], None]     # profiling: called with a phase name when that phase's work ends


def split_neighbours(n: int, closest_fraction: float, val_fraction: float,
                     gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (into the distance-sorted neighbour list) for training and validation.

    The closest `int(closest_fraction * n)` are shuffled and split: `ceil(val_fraction * that)` of them validate
    (the original's int(0.2 K) and sklearn's train_test_split rounding), the rest join the farther neighbours in the
    training set.
    """
    n_close = max(2, int(n * closest_fraction)) if n >= 2 else n
    n_val = max(1, math.ceil(n_close * val_fraction))
    close = torch.randperm(n_close, generator=gen)
    val = close[:n_val].sort().values
    train = torch.cat([close[n_val:].sort().values, torch.arange(n_close, n)])
    return train, val


@dataclass
class FitResult:
    epochs: int            # epochs run
    best_val_loss: float   # NaN when validation could change nothing and was skipped
    stopped_early: bool
    losses: list[float] = field(default_factory=list)   # mean training loss of each epoch (the report plots it)


def _no_hook(phase: str | None) -> None:
    pass


def fine_tune(forward: Callable[[torch.Tensor], torch.Tensor], params: list[nn.Parameter], x_train: torch.Tensor,
              y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor, cfg: RMCConfig, gen: torch.Generator,
              augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
              hook: Hook | None = None, optimizer: torch.optim.Optimizer | None = None) -> FitResult:
    """Adam on (x_train, y_train) with early stopping on the validation loss (one forward pass per epoch).

    `forward` computes logits from a batch (a module, or a `Forward` sharing the parameters `params`); `augment`
    maps a batch (and the generator) to `forward`'s input. Each batch is one index into the tensors. Validation is
    skipped where it cannot change the result (patience >= max_epochs and not restore_best). `optimizer`: Adam over
    `params` carried over from earlier calls (RMC's stream optimizer); None: a fresh one.
    """
    tick = hook or _no_hook
    for p in params:
        p.grad = None
    opt = make_optimizer(params, cfg.lr, cfg.adam_eps) if optimizer is None else optimizer
    device = x_train.device
    amp = autocast_context(cfg.precision, device)
    validate = cfg.restore_best or cfg.patience < cfg.max_epochs
    best, wait, best_state, epoch = float("inf"), 0, None, 0
    n = len(x_train)
    losses: list[float] = []
    for epoch in range(1, cfg.max_epochs + 1):   # noqa: B007 (the last epoch run is read after the loop)
        order = torch.randperm(n, generator=gen)
        total = torch.zeros((), device=device)   # summed on the device: one sync per epoch, not per batch
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb = x_train[idx.to(device)] if device.type != "cpu" else x_train[idx]
            if augment is not None:
                xb = augment(xb, gen)
            yb = y_train[idx.to(y_train.device)]
            tick("data")
            with amp:
                loss = F.cross_entropy(forward(xb), yb)
            tick("forward")
            loss.backward()
            total += loss.detach().float() * len(idx)
            tick("backward")
            opt.step()
            opt.zero_grad(set_to_none=True)
            tick("optimizer")
        losses.append(total.item() / n)
        if not validate:
            continue
        with torch.no_grad():
            val_loss = F.cross_entropy(forward(x_val), y_val).item()
        tick("validation")
        if val_loss < best:
            best, wait = val_loss, 0
            if cfg.restore_best:
                best_state = [p.detach().clone() for p in params]
                tick("state")
        else:
            wait += 1
            if wait >= cfg.patience:
                break
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(params, best_state, strict=True):
                p.copy_(b)
    return FitResult(epoch, best if validate else float("nan"), epoch < cfg.max_epochs, losses)


@dataclass
class Snapshot:
    """Everything of an RMC that one input changes: its state (weights, buffers, the stream optimizer's moments)
    and its input count."""
    state: dict[str, torch.Tensor]
    steps_done: int

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state dict alone (for `torch.func.functional_call`)."""
        return split_state(self.state)[0]


@dataclass
class Trial:
    """RMC's verdict on one input before calibration, and what `commit` needs to finish the step."""
    logits: torch.Tensor          # (classes,) of the adapted model on the input
    rows: np.ndarray              # D' rows of the K neighbours, closest first
    adapt_epochs: int
    gen: torch.Generator          # the step's generator after adaptation (calibration continues it)
    adapted: Snapshot | None      # the adapted state, if kept (to commit after trying other inputs)
    adapt_losses: list[float] = field(default_factory=list)   # the adaptation's mean training loss per epoch


@dataclass
class StepResult:
    prediction: int
    logits: list[float]
    neighbours: np.ndarray       # D' rows of the K neighbours, closest first
    adapt_epochs: int
    calib_epochs: int
    adapt_losses: list[float] = field(default_factory=list)   # the adaptation's mean training loss per epoch


def check_input(x, image_shape: tuple[int, ...], what: str = "RMC.step", batch: bool = False) -> None:
    """Refuse what RMC cannot classify, before any state is touched: exactly one image (1 x C x H x W; `batch`:
    any number N x C x H x W) of the D' image shape, floating point, finite, in [0, 1]."""
    if not isinstance(x, torch.Tensor):
        raise RMCError(f"{what} takes a torch.Tensor image (1 x C x H x W, floats in [0, 1]), got {type(x).__name__}")
    if x.dtype == torch.uint8:
        raise RMCError(f"{what} got uint8 pixels (0-255); pass floats in [0, 1]: x.float() / 255")
    if not x.is_floating_point():
        raise RMCError(f"{what} got dtype {x.dtype}; pass float images in [0, 1]")
    if x.dim() != 4:
        form = "images as N x C x H x W" if batch else "one image as 1 x C x H x W"
        raise RMCError(f"{what} takes {form}, got shape {tuple(x.shape)} (add a batch dimension: x[None])")
    if x.shape[0] == 0 and not batch:
        raise RMCError(f"{what} got an empty batch (0 images); it classifies exactly one image")
    if x.shape[0] != 1 and not batch:
        raise RMCError(f"{what} classifies exactly one image, got a batch of {x.shape[0]}: call it once per image "
                       "(or use RMCClassifier, which runs a batch in order)")
    if tuple(x.shape[1:]) != tuple(image_shape):
        raise RMCError(f"{what} got an image of C x H x W = {tuple(x.shape[1:])}; D' holds {tuple(image_shape)}")
    if x.numel() == 0:
        return
    x = x.detach()   # the checks read values only (an attack's input may require grad)
    if not torch.isfinite(x).all():
        raise RMCError(f"{what} got an image with NaN or infinite values")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        hint = " (looks like 0-255 pixels: divide by 255)" if hi > 1.5 else ""
        raise RMCError(f"{what} got pixel values in [{lo:.3g}, {hi:.3g}]; expected [0, 1]{hint}")


class RMC:
    """Runtime Masking and Cleansing around a static model.

    `step(x, features)` classifies one input: neighbours -> split -> fine-tune -> predict -> (online) calibrate.
    `forward` builds, for a model, what fine-tuning computes logits with (default: the model itself; see
    rmc.defense.forwards). `profile` is an optional hook (rmc.defense.profiling.PhaseTimer).
    """

    def __init__(self, model: nn.Module, dprime: DPrime, index, config: RMCConfig,
                 feature_layer: str | None = None, forward: Callable[[nn.Module], Forward] = PlainForward):
        if config.k > len(dprime):
            raise RMCError(f"rmc.k = {config.k} exceeds |D'| = {len(dprime)}; lower k")
        self.cfg, self.dprime, self.index, self.feature_layer = config, dprime, index, feature_layer
        # RMC adapts its own copy: the caller's static model stays untouched (baselines, attacks use it).
        self.model = configure_model(copy.deepcopy(model), config.scope, feature_layer)
        self.params = collect_params(self.model, config.scope, feature_layer)
        self.device = next(iter(self.model.parameters())).device
        check_precision(config.precision, self.device)
        self.make_forward = forward
        self.forward = forward(self.model)
        stream = config.optimizer is Optimizer.STREAM
        # None: one optimizer per fine-tuning
        self.optimizer = make_optimizer(self.params, config.lr, config.adam_eps) if stream else None
        self.static_state = self.state_dict()
        self.steps_done = 0
        self.profile: Hook | None = None

    @property
    def adaptation(self) -> Adaptation:
        """Online (the original) or episodic, as configured (rmc.interface.Defense)."""
        return Adaptation.ONLINE if self.cfg.mode is Mode.ONLINE else Adaptation.EPISODIC

    # -- online state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the online state: the weights and buffers, and the stream optimizer's state."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.optimizer is not None:
            state.update(optimizer_state(self.optimizer, self.params))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Set the online state from `state_dict()`'s output (weights, buffers and the stream optimizer's moments)."""
        weights, moments = split_state(state)
        self.model.load_state_dict(weights, strict=True)
        if self.optimizer is not None:
            load_optimizer_state(self.optimizer, self.params, moments)

    def reset(self) -> None:
        """Back to the static weights (and a fresh stream optimizer)."""
        self.load_state_dict(self.static_state)

    def snapshot(self) -> Snapshot:
        """Everything one input changes, to `restore` later (the defense-aware attacks try inputs between the two)."""
        return Snapshot(self.state_dict(), self.steps_done)

    def restore(self, snap: Snapshot) -> None:
        """Back to the state of a `snapshot()`, input count included."""
        self.load_state_dict(snap.state)
        self.steps_done = snap.steps_done

    def clone(self, mode: Mode | None = None) -> "RMC":
        """An independent RMC in this one's current state (its own model copy; D', index and settings shared)."""
        cfg = self.cfg if mode is None else dataclasses.replace(self.cfg, mode=mode)
        other = RMC(self.model, self.dprime, self.index, cfg, self.feature_layer, self.make_forward)
        other.static_state, other.steps_done = self.static_state, self.steps_done
        other.load_state_dict(self.state_dict())
        return other

    # -- the per-input loop -----------------------------------------------------------------------------
    def _tick(self, phase: str | None) -> None:
        if self.profile is not None:
            self.profile(phase)

    def neighbours(self, features: torch.Tensor | np.ndarray) -> np.ndarray:
        """D' rows of the K nearest neighbours of each query (Q x K, closest first) for static-model `features`."""
        rows = self.index.search(features, self.cfg.k)[1]
        self._tick("search")
        return rows

    def _check_features(self, features) -> np.ndarray:
        if features is None:
            raise RMCError("RMC needs the input's static-model features (or its neighbour rows) to find neighbours")
        if not isinstance(features, (torch.Tensor, np.ndarray)):
            raise RMCError(f"features must be a tensor or an array, got {type(features).__name__}")
        f = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        dim = getattr(self.index, "dim", None)
        if f.ndim not in (1, 2) or (f.ndim == 2 and f.shape[0] != 1) or (dim is not None and f.shape[-1] != dim):
            raise RMCError(f"features of one input must be 1 x {dim if dim is not None else 'd'}, got shape "
                           f"{tuple(f.shape)}")
        if not np.issubdtype(f.dtype, np.floating) or not np.isfinite(f).all():
            raise RMCError("the input's features contain NaN or infinite values (or are not floats)")
        return f.reshape(1, -1)

    def _check_rows(self, rows) -> np.ndarray:
        r = np.asarray(rows)
        if r.ndim != 1 or len(r) != self.cfg.k or not np.issubdtype(r.dtype, np.integer):
            raise RMCError(f"neighbour rows must be {self.cfg.k} integer D' rows (rmc.k), got {r.dtype} {r.shape}")
        if len(r) and (r.min() < 0 or r.max() >= len(self.dprime)):
            raise RMCError(f"neighbour rows must lie in [0, {len(self.dprime)}), got [{r.min()}, {r.max()}]")
        return r

    def _gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.dprime.gather(rows, self.device)
        self._tick("gather")
        return x, y

    def adapt(self, rows: np.ndarray, gen: torch.Generator) -> FitResult:
        """Fine-tune on the neighbours `rows` (closest first) with the 20% / 75-25 validation split."""
        h = self.forward.stored(rows)
        if h is None:
            x, y = self._gather(rows)
            h = self.forward.inputs(x)
        else:
            h, y = h.to(self.device), self.dprime.labels[torch.from_numpy(np.asarray(rows))].to(self.device)
        train, val = split_neighbours(len(rows), self.cfg.closest_fraction, self.cfg.val_fraction, gen)
        return fine_tune(self.forward, self.params, h[train], y[train], h[val], y[val], self.cfg, gen,
                         hook=self.profile, optimizer=self.optimizer)

    def calibrate(self, gen: torch.Generator) -> FitResult:
        """Pull the drifting online model back: fine-tune on K examples of D' drawn with replacement (as the
        original's np.random.randint), ceil(12.5%) held out for early stopping."""
        k = self.cfg.calib_k or self.cfg.k
        rows = torch.randint(len(self.dprime), (k,), generator=gen).numpy()
        x, y = self._gather(rows)
        n_val = max(1, math.ceil(k * self.cfg.calib_holdout))
        fwd, augment, x_train = self.forward, None, x[n_val:]
        if self.cfg.calib_augment:      # augmentation acts on images, before `fwd.inputs`
            flip = self.cfg.calib_flip
            augment = lambda xb, g: fwd.inputs(random_shift_flip(xb, g, flip=flip))  # noqa: E731
        else:
            x_train = fwd.inputs(x_train)
        return fine_tune(fwd, self.params, x_train, y[n_val:], fwd.inputs(x[:n_val]), y[:n_val], self.cfg, gen,
                         augment, hook=self.profile, optimizer=self.optimizer)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the network in its current (adapted) state for images `x`."""
        logits = self.model(x.to(self.device))
        self._tick("predict")
        return logits

    def trial(self, x: torch.Tensor, features: torch.Tensor | np.ndarray | None = None, key=None,
              rows: np.ndarray | None = None, keep: bool = False) -> Trial:
        """The first half of a step: neighbours of `x` (from its static-model `features`, or the given `rows`),
        adaptation and prediction. The model is left adapted; `keep` also returns a copy of that state, so that
        the caller may try other inputs (restoring a snapshot in between) and still `commit` this one."""
        check_input(x, tuple(self.dprime.images.shape[1:]), "RMC")
        if rows is None:
            features = self._check_features(features)
        else:
            rows = self._check_rows(rows)
        self._tick(None)
        key = self.steps_done if key is None else key
        gen = generator(self.cfg.seed, "step", key)
        if self.cfg.mode is Mode.EPISODIC:
            self.reset()
            self._tick("state")
        if rows is None:
            rows = self.neighbours(cast(np.ndarray, features))[0]   # checked above
        fit = self.adapt(rows, gen)
        logits = self.predict(x)[0]
        return Trial(logits, rows, fit.epochs, gen, self.snapshot() if keep else None, fit.losses)

    def commit(self, t: Trial) -> int:
        """The second half: from the trial's adapted state, calibrate (online) and count the input. Returns the
        calibration's epochs."""
        if t.adapted is not None:
            self.restore(t.adapted)
        calib = self.calibrate(t.gen).epochs if self.cfg.mode is Mode.ONLINE and self.cfg.calibrate else 0
        self.steps_done += 1
        self._tick("other")
        return calib

    def step(self, x: torch.Tensor, features: torch.Tensor | np.ndarray | None = None, key=None,
             rows: np.ndarray | None = None) -> StepResult:
        """Classify one input `x` (1 x C x H x W, [0, 1]) whose static-model features are `features`.

        `key` identifies the input for its randomness (default: the running count), so results do not
        depend on what ran before in episodic mode and are reproducible in online mode.
        """
        check_input(x, tuple(self.dprime.images.shape[1:]), "RMC.step")   # before any state is touched
        before = self.snapshot()
        try:
            t = self.trial(x, features, key, rows)
            calib = self.commit(t)
        except BaseException:
            self.restore(before)   # atomic: a failed (or interrupted) step leaves the state as it found it
            raise
        return StepResult(int(t.logits.argmax()), t.logits.tolist(), t.rows, t.adapt_epochs, calib, t.adapt_losses)
