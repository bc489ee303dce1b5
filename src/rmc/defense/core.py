"""The RMC algorithm (Wu, Yuan & Wu, ICML 2020): per test input, fine-tune on its nearest neighbours in D'.

This module never opens a file: it takes a model, D' as tensors (a `DPrime`), a neighbour index and a config.
Pure helpers (`configure_model`, `collect_params`, `split_neighbours`, `fine_tune`) do one thing each; the
`RMC` class holds the online state (the adapted weights) and runs the per-input loop of SPEC section 1.
"""

from __future__ import annotations

import copy
import hashlib
import time
import warnings
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rmc.checks import check_positive
from rmc.errors import RMCError
from rmc.defense.knn import NeighbourIndex


class Mode(str, Enum):
    ONLINE = "online"       # the original: adapted weights carry over to the next input, then calibration
    EPISODIC = "episodic"   # reset to the static weights before every input (test-time-adaptation style)


class Scope(str, Enum):
    ALL = "all"     # every trainable parameter (the original)
    HEAD = "head"   # only modules after the feature layer
    BN = "bn"       # only batch-norm affine parameters


PRECISIONS = ("fp32", "bf16")


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
    precision: str = "fp32"        # fine-tuning arithmetic: fp32, or bf16 (bfloat16 autocast of forward/backward; weights, Adam, validation, prediction stay fp32)
    fast_path: bool = True         # fine-tune through an equivalent rewritten graph (batch-norm folded into convolutions, channels-last): same function, faster
    cache_head_inputs: bool = True # scope head: train the head on its inputs computed once (the stored neighbour features when the head starts with global pooling)

    def __post_init__(self):
        try:
            self.mode, self.scope = Mode(self.mode), Scope(self.scope)
        except ValueError as e:
            raise RMCError(f"bad RMC setting: {e}; mode is online|episodic, scope is all|head|bn") from None
        for name in ("k", "batch_size", "max_epochs", "patience"):
            check_positive(getattr(self, name), f"rmc.{name}", integer=True)
        check_positive(self.lr, "rmc.lr")
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


@dataclass
class DPrime:
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
        ascending = rows[order]
        if not isinstance(self.images, np.ndarray):
            ascending = torch.from_numpy(ascending)
        x = torch.as_tensor(self.images[ascending])[torch.from_numpy(np.argsort(order, kind="stable"))]
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
    best_val_loss: float   # NaN when validation could change nothing and was skipped
    stopped_early: bool


def random_shift_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """The usual training-time augmentation: random translation by up to `pad` pixels, random horizontal flip."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = dy[:, None] + torch.arange(h)                      # n x h
    cols = dx[:, None] + torch.arange(w)                      # n x w
    if flip:
        mirrored = torch.rand(n, generator=gen) < 0.5
        cols = torch.where(mirrored[:, None], cols.flip(-1), cols)
    # One gather over the flattened padded images (the same result as indexing rows and columns separately).
    idx = (rows[:, :, None] * (w + 2 * pad) + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.reshape(n, c, -1).gather(2, idx).view(n, c, h, w)


class PhaseTimer:
    """Wall-clock seconds spent per phase of RMC's per-input work (set `RMC.timer = PhaseTimer()` to collect).

    Phases: search, gather (D' rows to tensors), state (reset / weight copies), data (batch indexing and
    augmentation; with scope 'head' and augmented calibration also the frozen backbone's forward pass), forward,
    backward, optimizer, validation, predict, other (the rest of a step). `forward`, `backward`, `validation` and
    `predict` are the network's passes; everything else is overhead.
    """
    PASSES = ("forward", "backward", "validation", "predict")

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds

    def phase(self, name: str):
        return _Phase(self, name)

    def passes(self) -> float:
        return sum(self.seconds.get(p, 0.0) for p in self.PASSES)

    def total(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> dict[str, float]:
        return dict(sorted(self.seconds.items(), key=lambda kv: -kv[1]))


class _Phase:
    __slots__ = ("timer", "name", "t0")

    def __init__(self, timer: PhaseTimer, name: str):
        self.timer, self.name = timer, name

    def __enter__(self):
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        self.timer.add(self.name, time.perf_counter() - self.t0)


def _phase(timer: PhaseTimer | None, name: str):
    return nullcontext() if timer is None else timer.phase(name)


def make_optimizer(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam; the fused kernel (one pass over all parameters) where the parameters allow it."""
    if params and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params) \
            and len({p.device for p in params}) == 1:
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr)


def autocast_context(precision: str, device: torch.device | str = "cpu"):
    """bfloat16 autocast for precision 'bf16' (matrix products in bf16, accumulation and weights in fp32)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


def fine_tune(model: nn.Module, params: list[nn.Parameter], x_train: torch.Tensor, y_train: torch.Tensor,
              x_val: torch.Tensor, y_val: torch.Tensor, cfg: RMCConfig, gen: torch.Generator,
              augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
              forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
              timer: PhaseTimer | None = None) -> FitResult:
    """Adam on (x_train, y_train) with early stopping on the validation loss (one forward pass per epoch).

    The data are tensors already: each batch is one index into them, nothing is rebuilt per epoch. `forward`
    (default: `model`) is what computes the logits, e.g. `rmc.defense.fastpath.fast_forward(model)` sharing its parameters;
    `augment` maps a batch (and the generator) to the network's input. `timer` collects time per phase.
    Validation is skipped where it cannot change the result (patience >= max_epochs and not restore_best).
    """
    forward = model if forward is None else forward
    for p in params:
        p.grad = None
    opt = make_optimizer(params, cfg.lr)
    device = x_train.device
    amp = autocast_context(getattr(cfg, "precision", "fp32"), device)
    # The validation loss can only stop training before the last epoch (patience < max_epochs) or pick the weights
    # kept (restore_best); otherwise it changes nothing and is not computed (best_val_loss is then NaN).
    validate = cfg.restore_best or cfg.patience < cfg.max_epochs
    best, wait, best_state, epoch = float("inf"), 0, None, 0
    n = len(x_train)
    for epoch in range(1, cfg.max_epochs + 1):
        with _phase(timer, "data"):
            order = torch.randperm(n, generator=gen)
        for start in range(0, n, cfg.batch_size):
            with _phase(timer, "data"):
                idx = order[start:start + cfg.batch_size]
                xb = x_train[idx.to(device)] if device.type != "cpu" else x_train[idx]
                if augment is not None:
                    xb = augment(xb, gen)
                yb = y_train[idx.to(y_train.device)]
            with _phase(timer, "forward"):
                with amp:
                    loss = F.cross_entropy(forward(xb), yb)
            with _phase(timer, "backward"):
                loss.backward()
            with _phase(timer, "optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)
        if not validate:
            continue
        with _phase(timer, "validation"):
            with torch.no_grad():
                val_loss = F.cross_entropy(forward(x_val), y_val).item()
        if val_loss < best:
            best, wait = val_loss, 0
            if cfg.restore_best:
                with _phase(timer, "state"):
                    best_state = [p.detach().clone() for p in params]
        else:
            wait += 1
            if wait >= cfg.patience:
                break
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(params, best_state):
                p.copy_(b)
    return FitResult(epoch, best if validate else float("nan"), epoch < cfg.max_epochs)


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

    Speed: fine-tuning runs through `rmc.defense.fastpath.fast_forward` (same function, same parameters) when
    `config.fast_path`; with scope 'head' and `config.cache_head_inputs` the head trains on its inputs computed once
    per adaptation (the stored neighbour features themselves when the head starts with global pooling).
    Set `rmc.timer = PhaseTimer()` to see where the time goes.
    """

    def __init__(self, model: nn.Module, dprime: DPrime, index: NeighbourIndex, config: RMCConfig,
                 feature_layer: str | None = None):
        if config.k > len(dprime):
            raise RMCError(f"rmc.k = {config.k} exceeds |D'| = {len(dprime)}; lower k")
        self.cfg = config
        self.dprime, self.index = dprime, index
        self.feature_layer = feature_layer
        # RMC adapts its own copy: the caller's static model stays untouched (baselines, attacks use it).
        self.model = configure_model(copy.deepcopy(model), config.scope, feature_layer)
        self.params = collect_params(self.model, config.scope, feature_layer)
        self.static_state = copy.deepcopy(self.state_dict())
        self.steps_done = 0
        self.timer: PhaseTimer | None = None
        self.device = next(iter(self.model.parameters())).device
        self._forward: Callable[[torch.Tensor], torch.Tensor] = self.model
        self._head: _HeadCache | None = None
        if config.fast_path or (config.scope is Scope.HEAD and config.cache_head_inputs):
            rows = np.unique(np.linspace(0, len(dprime) - 1, min(8, len(dprime))).astype(np.int64))
            sample = dprime.gather(rows)[0].to(self.device)
            if config.fast_path:
                from rmc.defense.fastpath import fast_forward
                self._forward = fast_forward(self.model, sample)
            if config.scope is Scope.HEAD and config.cache_head_inputs:
                self._head = _HeadCache.build(self.model, feature_layer, index, rows, sample, config.fast_path)

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
        with _phase(self.timer, "search"):
            return self.index.search(features, self.cfg.k)[1]

    def _gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        with _phase(self.timer, "gather"):
            x, y = self.dprime.gather(rows)
            return x.to(self.device), y.to(self.device)

    def adapt(self, rows: np.ndarray, gen: torch.Generator) -> FitResult:
        """Fine-tune on the neighbours `rows` (closest first) with the 20% / 75-25 validation split."""
        head = self._head
        if head is not None and head.stored:
            with _phase(self.timer, "gather"):      # the head's inputs are the stored features: no images needed
                h = head.from_stored(rows).to(self.device)
                y = self.dprime.labels[torch.from_numpy(np.asarray(rows))].to(self.device)
            train, val = split_neighbours(len(rows), self.cfg.closest_fraction, self.cfg.val_fraction, gen)
            return fine_tune(head.head, self.params, h[train], y[train], h[val], y[val], self.cfg, gen,
                             timer=self.timer)
        x, y = self._gather(rows)
        train, val = split_neighbours(len(rows), self.cfg.closest_fraction, self.cfg.val_fraction, gen)
        if head is not None:
            with _phase(self.timer, "forward"):
                h = head.inputs(x)
            return fine_tune(head.head, self.params, h[train], y[train], h[val], y[val], self.cfg, gen,
                             timer=self.timer)
        return fine_tune(self.model, self.params, x[train], y[train], x[val], y[val], self.cfg, gen,
                         forward=self._forward, timer=self.timer)

    def calibrate(self, gen: torch.Generator) -> FitResult:
        """Pull the drifting online model back: fine-tune on random D' examples, 12.5% held out."""
        k = self.cfg.calib_k or self.cfg.k
        rows = torch.randperm(len(self.dprime), generator=gen)[:k].numpy()
        x, y = self._gather(rows)
        n_val = max(1, int(round(k * self.cfg.calib_holdout)))
        augment = None
        if self.cfg.calib_augment:
            flip = self.cfg.calib_flip
            augment = lambda xb, g: random_shift_flip(xb, g, flip=flip)  # noqa: E731
        head = self._head
        if head is None:
            return fine_tune(self.model, self.params, x[n_val:], y[n_val:], x[:n_val], y[:n_val], self.cfg, gen,
                             augment, forward=self._forward, timer=self.timer)
        # Head only: the frozen backbone maps (augmented) images to the head's inputs, without gradients.
        with _phase(self.timer, "forward"):
            h_val = head.inputs(x[:n_val])
            h_train = None if augment is not None else head.inputs(x[n_val:])
        if augment is None:
            return fine_tune(head.head, self.params, h_train, y[n_val:], h_val, y[:n_val], self.cfg, gen,
                             timer=self.timer)
        through = lambda xb, g: head.inputs(augment(xb, g))  # noqa: E731
        return fine_tune(head.head, self.params, x[n_val:], y[n_val:], h_val, y[:n_val], self.cfg, gen, through,
                         timer=self.timer)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        with _phase(self.timer, "predict"):
            return self.model(x.to(self.device))

    def step(self, x: torch.Tensor, features: torch.Tensor | np.ndarray, key=None,
             rows: np.ndarray | None = None, keep_adapted: bool = False) -> StepResult:
        """Classify one input `x` (1 x C x H x W, [0, 1]) whose static-model features are `features`.

        `key` identifies the input for its randomness (default: the running count), so results do not
        depend on what ran before in episodic mode and are reproducible in online mode.
        `keep_adapted` returns a copy of the adapted weights (before calibration): defense-aware attacks use it.
        """
        t0 = time.perf_counter()
        before = self.timer.total() if self.timer is not None else 0.0
        key = self.steps_done if key is None else key
        gen = generator(self.cfg.seed, "step", key)
        if self.cfg.mode is Mode.EPISODIC:
            with _phase(self.timer, "state"):
                self.reset()
        if rows is None:
            rows = self.neighbours(features)[0]
        fit = self.adapt(rows, gen)
        logits = self.predict(x)[0]
        adapted = None
        if keep_adapted:
            with _phase(self.timer, "state"):
                adapted = self.state_dict()
        calib = 0
        if self.cfg.mode is Mode.ONLINE and self.cfg.calibrate:
            calib = self.calibrate(gen).epochs
        self.steps_done += 1
        if self.timer is not None:
            self.timer.add("other", max(0.0, time.perf_counter() - t0 - (self.timer.total() - before)))
            self.timer.steps += 1
        return StepResult(int(logits.argmax()), logits.tolist(), rows, fit.epochs, calib, adapted)


class _HeadCache:
    """Scope 'head': the frozen backbone and the trainable head of the model, and where the head's inputs come from."""

    def __init__(self, split, backbone: nn.Module, index, stored: bool):
        self.head, self.split, self.backbone, self.index, self.stored = split.head, split, backbone, index, stored

    @torch.no_grad()
    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The head's inputs for images `x` (one forward pass of the frozen backbone)."""
        return self.backbone(x)

    def from_stored(self, rows: np.ndarray) -> torch.Tensor:
        """The head's inputs from the stored (static-model) features of D' rows."""
        return self.split.head_input(torch.from_numpy(self.index.vectors(rows)))

    @classmethod
    def build(cls, model: nn.Module, layer: str | None, index, rows: np.ndarray, sample: torch.Tensor,
              fast: bool) -> "_HeadCache | None":
        from rmc.defense.fastpath import fast_forward, split_at
        split = split_at(model, layer) if layer is not None else None
        if split is None:
            warnings.warn(f"rmc: cannot cut the model after {layer!r} (skip connection or untraceable); scope 'head' "
                          "runs the whole network every batch")
            return None
        with torch.no_grad():
            h = split.backbone(sample)
            want = model(sample)
            if not torch.allclose(split.head(h), want, rtol=1e-4, atol=1e-5):
                warnings.warn("rmc: the model cut at its feature layer does not reproduce it; scope 'head' runs the "
                              "whole network every batch")
                return None
            stored = False
            vectors = getattr(index, "vectors", None)
            if vectors is not None and (split.pooled_input or h.dim() == 2):
                # The stored features must be this backbone's (pooled) output, e.g. not another model's.
                pooled = h.mean((2, 3)) if h.dim() == 4 else h
                try:
                    v = torch.from_numpy(np.asarray(vectors(rows))).to(pooled)
                except RMCError:
                    v = None
                if v is not None and v.shape == pooled.shape:
                    scale = pooled.abs().max().item() + 1e-12
                    stored = bool((v - pooled).abs().max().item() <= 1e-3 * scale)
        backbone = fast_forward(split.backbone, sample) if fast else split.backbone
        return cls(split, backbone, index, stored)
