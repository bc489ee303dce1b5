"""A faithful naive reference of the original RMC's per-input loop, for speed comparisons only.

It does what the original code does, the way it does it (written from the paper's description; none
of the original's code is copied):

- **Neighbour search**: for every test input, a Python loop over the stored D' features in batches (the original
  walks its feature files batch by batch), squared Euclidean distances in NumPy, a full sort, the first K.
  (`per_feature=True`: the later port's loop over every single stored feature; far slower still.)
- **Data**: the K neighbours are copied from D' to host arrays; every epoch builds a fresh Dataset and DataLoader
  that converts, augments (calibration) and collates examples one at a time, as a tf.data / torchvision pipeline
  rebuilt per epoch does. Validation runs through its own loader.
- **Fine-tuning**: the plain network (channels-first, float32, batch-norm as a separate layer), Adam, batch 128,
  early stopping on the validation loss; online mode keeps the weights and calibrates on K random D' examples.

Same hyperparameters as `rmc.defense.core.RMCConfig`; its own random draws (so the two disagree on some inputs by
chance).
"""

from __future__ import annotations

import copy
import math
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from rmc.defense.config import Mode, Optimizer, RMCConfig


def naive_knn(features: np.ndarray, query: np.ndarray, k: int, batch: int = 1024,
              per_feature: bool = False) -> np.ndarray:
    """Rows of the k nearest stored features to one query (closest first, ties by row)."""
    q = np.asarray(query, dtype=np.float32).reshape(-1)
    if per_feature:
        d = np.empty(len(features), dtype=np.float32)
        for i in range(len(features)):
            diff = features[i] - q
            d[i] = (diff * diff).sum()
    else:
        parts = []
        for start in range(0, len(features), batch):
            diff = np.asarray(features[start:start + batch]) - q
            parts.append((diff * diff).sum(-1))
        d = np.concatenate(parts)
    return np.argsort(d, kind="stable")[:k]


class ExampleDataset(Dataset):
    """Examples one at a time: uint8 host array -> float tensor, optional random shift (2 px) and flip."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool = False, flip: bool = True,
                 rng: np.random.Generator | None = None):
        self.images, self.labels, self.augment, self.flip, self.rng = images, labels, augment, flip, rng

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i].astype(np.float32) / 255.0          # C x H x W
        if self.augment:
            c, h, w = img.shape
            padded = np.pad(img, ((0, 0), (2, 2), (2, 2)))
            dy, dx = self.rng.integers(0, 5, size=2)
            img = padded[:, dy:dy + h, dx:dx + w]
            if self.flip and self.rng.random() < 0.5:
                img = img[:, :, ::-1]
            img = np.ascontiguousarray(img)
        return torch.from_numpy(img), int(self.labels[i])


class NaiveRMC:
    """The original's per-input loop. `step(x, query)` -> predicted class."""

    def __init__(self, model: nn.Module, images: np.ndarray, labels: np.ndarray, features: np.ndarray,
                 cfg: RMCConfig, seed: int = 0, per_feature_search: bool = False):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.static = copy.deepcopy(self.model.state_dict())
        self.images, self.labels, self.features, self.cfg = images, labels, features, cfg
        self.rng = np.random.default_rng(seed)
        self.per_feature = per_feature_search
        self.seconds: dict[str, float] = defaultdict(float)   # search, data, train (forward+backward+Adam), validation
        self.steps = 0
        self.stream = (torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
                       if cfg.optimizer is Optimizer.STREAM else None)

    def _timed_batches(self, loader):
        """The loader's batches, the time spent producing them counted as 'data'."""
        it = iter(loader)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self.seconds["data"] += time.perf_counter() - t0
                return
            self.seconds["data"] += time.perf_counter() - t0
            yield batch

    def fit(self, x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, augment: bool) -> int:
        cfg = self.cfg
        opt = self.stream or torch.optim.Adam(self.model.parameters(), lr=cfg.lr)   # the original: one for the run
        best, wait, epoch = float("inf"), 0, 0
        for epoch in range(1, cfg.max_epochs + 1):   # noqa: B007 (the last epoch run is returned)
            g = torch.Generator().manual_seed(int(self.rng.integers(2 ** 62)))
            train = DataLoader(ExampleDataset(x, y, augment, cfg.calib_flip, self.rng), batch_size=cfg.batch_size,
                               shuffle=True, generator=g)
            for xb, yb in self._timed_batches(train):
                t0 = time.perf_counter()
                loss = F.cross_entropy(self.model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                self.seconds["train"] += time.perf_counter() - t0
            total, count = 0.0, 0
            with torch.no_grad():
                for xb, yb in self._timed_batches(DataLoader(ExampleDataset(xv, yv), batch_size=cfg.batch_size)):
                    t0 = time.perf_counter()
                    total += F.cross_entropy(self.model(xb), yb, reduction="sum").item()
                    count += len(yb)
                    self.seconds["validation"] += time.perf_counter() - t0
            val = total / count
            if val < best:
                best, wait = val, 0
            else:
                wait += 1
                if wait >= cfg.patience:
                    break
        return epoch

    def step(self, x: torch.Tensor, query: np.ndarray) -> int:
        cfg = self.cfg
        if cfg.mode is Mode.EPISODIC:
            self.model.load_state_dict(self.static)
            if self.stream is not None:
                self.stream.state.clear()
        t0 = time.perf_counter()
        rows = naive_knn(self.features, query, cfg.k, per_feature=self.per_feature)
        self.seconds["search"] += time.perf_counter() - t0
        self.steps += 1
        images, labels = np.asarray(self.images[rows]), np.asarray(self.labels[rows])   # host copies
        n_close = max(2, int(cfg.k * cfg.closest_fraction))
        n_val = max(1, math.ceil(n_close * cfg.val_fraction))
        close = self.rng.permutation(n_close)
        val, train = np.sort(close[:n_val]), np.concatenate([np.sort(close[n_val:]), np.arange(n_close, cfg.k)])
        self.fit(images[train], labels[train], images[val], labels[val], augment=False)
        with torch.no_grad():
            pred = int(self.model(x).argmax(1)[0])
        if cfg.mode is Mode.ONLINE and cfg.calibrate:
            k = cfg.calib_k or cfg.k
            r = self.rng.integers(len(self.labels), size=k)          # with replacement, as the original
            ci, cl = np.asarray(self.images[r]), np.asarray(self.labels[r])
            h = max(1, math.ceil(k * cfg.calib_holdout))
            self.fit(ci[h:], cl[h:], ci[:h], cl[:h], augment=cfg.calib_augment)
        return pred
