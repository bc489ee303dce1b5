"""Training the static model: standard training or Madry-style PGD adversarial training, seeded.

Same config and seed on CPU give bit-identical weights: every random draw (initialisation, shuffling,
augmentation, the PGD random start) comes from generators seeded here, never from ambient state.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rmc.attacks.gradient import check_attack_settings, pgd
from rmc.checks import check_images, check_labels, check_positive
from rmc.data.arrays import LazyImages
from rmc.data.base import ImageDataset
from rmc.errors import RMCError
from rmc.models import ModelInfo, build_model
from rmc.models.denoising import DenoiseOp


@dataclass
class TrainConfig:
    arch: str = "small_cnn"        # built-in name or "package.module:factory"
    epochs: int = 4                # full passes over the (sub)set (test accuracy per epoch count: benchmarks/README.md)
    batch_size: int = 256          # larger batches are cheaper per epoch on CPU; 256 still converges in 4 epochs
    lr: float = 1e-2               # peak learning rate of the one-cycle schedule (Adam); 3e-3 underfits at 4 epochs
    weight_decay: float = 0.0      # Adam's L2 penalty; unnecessary at this short schedule
    augment: bool = False          # random flip + <=2-pixel shift; off: 4 epochs underfit rather than overfit
    seed: int = 0                  # seeds initialisation, shuffling, augmentation and the PGD random start
    adversarial: bool = False      # Madry et al.: train on PGD examples (random start) instead of clean ones
    adv_eps: float = 0.1           # L-inf radius of the training attack (0.1 suits Fashion-MNIST)
    adv_step_size: float = 0.025   # PGD step (2.5 x 0.01): 7 steps travel 1.75 eps, enough to cross the ball
    adv_steps: int = 7             # PGD steps per batch; each costs a forward + backward, so an epoch ~8x dearer
    denoise: str | None = None     # Xie et al.'s feature-denoising blocks after each feature stage: nonlocal | mean |
                                   # median
    train_subset: int | None = None   # train on the first n of a seeded permutation (None: everything)
    device: str = "cpu"            # torch device string, e.g. "cpu" or "cuda"

    def validate(self) -> "TrainConfig":
        check_positive(self.epochs, "epochs", integer=True)
        check_positive(self.batch_size, "batch size", integer=True)
        check_positive(self.lr, "learning rate")
        check_positive(self.weight_decay, "weight decay", allow_zero=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise RMCError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.train_subset is not None:
            check_positive(self.train_subset, "train subset", integer=True)
        if self.denoise is not None and self.denoise not in [o.value for o in DenoiseOp]:
            raise RMCError(f"train.denoise must be one of {[o.value for o in DenoiseOp]} or empty, "
                           f"got {self.denoise!r}")
        if self.adversarial:
            check_attack_settings(self.adv_eps, self.adv_step_size, self.adv_steps)
        resolve_device(self.device)
        return self


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RMCError(f"unknown device {name!r}; use 'cpu' or 'cuda' (optionally 'cuda:N')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RMCError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise RMCError(f"unsupported device {name!r}; use 'cpu' or 'cuda'")
    return device


def check_dataset(ds: ImageDataset, name: str) -> tuple[torch.Tensor | LazyImages, torch.Tensor]:
    """Float images in [0, 1] (a lazy data set: its uint8 images, read per batch) and int64 labels of `ds`,
    validated."""
    if not isinstance(ds, ImageDataset):
        raise RMCError(f"{name} must be an rmc ImageDataset (see rmc.data.load_dataset), got {type(ds).__name__}")
    if len(ds) == 0:
        raise RMCError(f"{name} is empty; check the data directory")
    # uint8 images are in range by their type: a lazy set needs no pass over its pixels
    x = ds.images if isinstance(ds.images, LazyImages) else check_images(ds.float_images(), f"{name} images")
    y = check_labels(ds.labels, len(x), name=f"{name} labels")
    return x, y


def _float(x: torch.Tensor) -> torch.Tensor:
    """A batch as float in [0, 1] (uint8 batches come from lazy data sets)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor | LazyImages, batch_size: int = 1000) -> torch.Tensor:
    """Predicted classes (int64, CPU) of float [0, 1] images (or uint8 ones, converted per batch), in eval mode; the
    model's mode is restored."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(images), batch_size):
            out.append(model(_float(images[start:start + batch_size]).to(device)).argmax(1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, images: torch.Tensor | LazyImages, labels: torch.Tensor,
             batch_size: int = 1000) -> float:
    if len(labels) == 0:
        return float("nan")
    return (predict(model, images, batch_size) == labels.cpu()).float().mean().item()


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random horizontal flip and a random translation of up to `shift` pixels (zero fill), per image."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    padded = F.pad(x, (shift, shift, shift, shift))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]      # n x 1 x h x 1
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]      # n x 1 x 1 x w
    idx = torch.arange(n)[:, None, None, None]
    chans = torch.arange(x.shape[1])[None, :, None, None]
    return padded[idx, chans, rows, cols]


def train_model(train: ImageDataset, test: ImageDataset, config: TrainConfig | None = None,
                progress: bool = True) -> tuple[nn.Module, ModelInfo]:
    """Train `config.arch` on `train`; report clean accuracy on `test`. Returns the model (eval mode, on
    config.device) and its ModelInfo (not yet saved: use rmc.models.save_checkpoint)."""
    config = (config or TrainConfig()).validate()
    device = resolve_device(config.device)
    x_train, y_train = check_dataset(train, "training set")
    x_test, y_test = check_dataset(test, "test set")
    if train.input_shape != test.input_shape:
        raise RMCError(f"training images are {train.input_shape} but test images are {test.input_shape} "
                       "(C x H x W); use the two splits of one data set")
    num_classes = max(train.num_classes, int(y_train.max()) + 1, int(y_test.max()) + 1)

    gen = torch.Generator().manual_seed(config.seed)
    if config.train_subset is not None and config.train_subset < len(x_train):
        keep = torch.randperm(len(x_train), generator=gen)[:config.train_subset]
        x_train = x_train.take(keep) if isinstance(x_train, LazyImages) else x_train[keep]
        y_train = y_train[keep]
    if len(x_train) < 2:
        raise RMCError(f"training needs at least 2 images, got {len(x_train)}; raise --train-subset")

    # Initialise under a forked RNG so the caller's global random state is neither used nor changed.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = build_model(config.arch, num_classes, train.input_shape[0], train.mean, train.std, config.denoise)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / config.batch_size)
    # One-cycle (warm-up then cosine decay to ~0) reaches good accuracy in few epochs.
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, epochs=config.epochs,
                                                   steps_per_epoch=steps_per_epoch)

    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    kind = (f"PGD adversarial training (eps {config.adv_eps:g}, step {config.adv_step_size:g}, "
            f"{config.adv_steps} steps)" if config.adversarial else "standard training")
    log(f"{kind} of {config.arch} on {len(x_train)} {train.name or 'training'} images, {config.epochs} epochs")
    started = time.perf_counter()
    for epoch in range(config.epochs):
        epoch_start = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   disable=not progress, leave=False, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30)   # redirected logs: few lines
        for b in bar:
            idx = order[b * config.batch_size:(b + 1) * config.batch_size]
            if len(idx) < 2:
                continue   # a trailing batch of one breaks batch norm in training mode
            xb, yb = _float(x_train[idx]), y_train[idx]
            if config.augment:
                xb = _augment(xb, gen)
            xb, yb = xb.to(device), yb.to(device)
            if config.adversarial:
                # Craft in eval mode: the attack's forward passes must not move batch-norm statistics.
                model.eval()
                xb = pgd(model, xb, yb, config.adv_eps, config.adv_step_size, config.adv_steps,
                         random_start=True, generator=gen, batch_size=len(xb))
            model.train()
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        bar.close()
        test_acc = accuracy(model, x_test, y_test)
        log(f"epoch {epoch + 1}/{config.epochs}: loss {total_loss / seen:.4f}, train acc {correct / seen:.4f}"
            f"{' (adversarial)' if config.adversarial else ''}, test acc {test_acc:.4f}, "
            f"{time.perf_counter() - epoch_start:.1f} s")
    elapsed = time.perf_counter() - started
    model.eval()
    log(f"done in {elapsed:.1f} s: clean test accuracy {test_acc:.4f}")
    info = ModelInfo(
        arch=config.arch, num_classes=num_classes, input_shape=train.input_shape,
        mean=list(train.mean) if train.mean is not None else None,
        std=list(train.std) if train.std is not None else None,
        dataset=train.name, adversarial=config.adversarial, denoise=config.denoise, test_accuracy=test_acc,
        seed=config.seed,
        config={**asdict(config), "train_seconds": round(elapsed, 1), "train_size": len(x_train)})
    return model, info
