"""Batched episodic RMC: adapt B test inputs at once, each with its own copy of the weights.

Episodic mode resets to the static weights before every input, so the inputs of a batch are independent and can be
adapted side by side. `BatchedEpisodic(rmc).run(x, features, keys)` returns what `rmc.step` would return for each
input in episodic mode (same neighbours, same splits and batch orders from the same per-input random generators),
equal within floating-point tolerance.

Two ways to run the B fine-tunings:

- `vmap`: the B weight copies are stacked (`torch.func.stack_module_state`) and one vectorised call
  (`vmap(grad(functional_call))`) computes all B gradients; Adam updates the stacked tensors in place. One kernel
  launch serves B models, which is what a GPU needs. On a CPU it is slower than one model at a time (vmap turns each
  convolution into a grouped, channels-first one; see benchmarks/README.md).
- `threads`: W workers, each fine-tuning its share of the inputs one at a time with its own model copy, on its own
  core. PyTorch releases the GIL inside operators, so W workers keep W cores busy without the barrier of intra-op
  parallelism (which, on a small shared machine, costs more than it gains). Results are those of `rmc.step`
  bit for bit when every worker runs with one intra-op thread. `intra_op_threads=1` sets that for the call.

`backend="auto"` picks `vmap` when the model is on a GPU, else `threads`.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from rmc.defense.config import Mode
from rmc.defense.core import RMC, StepResult, split_neighbours
from rmc.errors import RMCError
from rmc.seeding import generator

BACKENDS = ("auto", "vmap", "threads")


class BatchedEpisodic:
    """Episodic RMC over batches of inputs, built from a configured `RMC` (its model, D', index and settings)."""

    def __init__(self, rmc: RMC, backend: str = "auto", workers: int | None = None,
                 intra_op_threads: int | None = None):
        if backend not in BACKENDS:
            raise RMCError(f"batched backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if workers is not None and (not isinstance(workers, int) or workers < 1):
            raise RMCError(f"workers must be a whole number >= 1, got {workers!r}")
        self.rmc, self.cfg = rmc, rmc.cfg
        if backend == "auto":
            backend = "vmap" if rmc.device.type == "cuda" else "threads"
        self.backend = backend
        self.workers = workers or os.cpu_count() or 1
        self.intra_op_threads = intra_op_threads
        self._clones: list[RMC] = []

    # -- public ---------------------------------------------------------------------------------------
    def run(self, x: torch.Tensor, features: np.ndarray | torch.Tensor, keys: Sequence | None = None,
            rows: np.ndarray | None = None) -> list[StepResult]:
        """Episodic RMC on every input of `x` (B x C x H x W); `keys` as in `RMC.step` (default 0..B-1)."""
        b = len(x)
        keys = list(range(b)) if keys is None else list(keys)
        if len(keys) != b:
            raise RMCError(f"{b} inputs but {len(keys)} keys")
        if rows is None:
            rows = self.rmc.neighbours(features)          # one search for the whole batch
        rows = np.asarray(rows)
        if self.backend == "vmap":
            return self._run_vmap(x, rows, keys)
        return self._run_threads(x, rows, keys)

    # -- threads --------------------------------------------------------------------------------------
    def _clone(self) -> RMC:
        """Another RMC sharing D', the index and the static weights, with its own model copy."""
        return self.rmc.clone(mode=Mode.EPISODIC)

    def _run_threads(self, x: torch.Tensor, rows: np.ndarray, keys: list) -> list[StepResult]:
        w = max(1, min(self.workers, len(x)))
        while len(self._clones) < w:
            self._clones.append(self._clone())
        shares = np.array_split(np.arange(len(x)), w)
        results: list[StepResult | None] = [None] * len(x)

        def work(clone: RMC, idx: np.ndarray) -> None:
            for i in idx:
                results[i] = clone.step(x[i:i + 1], None, key=keys[i], rows=rows[i])

        old = torch.get_num_threads()
        if self.intra_op_threads is not None:
            torch.set_num_threads(self.intra_op_threads)
        try:
            if w == 1:
                work(self._clones[0], shares[0])
            else:
                with ThreadPoolExecutor(w) as pool:
                    for f in [pool.submit(work, c, s) for c, s in zip(self._clones, shares, strict=False)]:
                        f.result()
        finally:
            if self.intra_op_threads is not None:
                torch.set_num_threads(old)
        return cast(list[StepResult], results)   # every slot filled by its share

    # -- vmap -----------------------------------------------------------------------------------------
    def _run_vmap(self, x: torch.Tensor, rows: np.ndarray, keys: list) -> list[StepResult]:
        rmc, cfg = self.rmc, self.cfg
        model, device = rmc.model, rmc.device
        b, k = rows.shape
        rmc.reset()
        gens = [generator(cfg.seed, "step", key) for key in keys]
        pairs = [rmc.dprime.gather(r) for r in rows]
        xs = torch.stack([p[0] for p in pairs]).to(device)                       # B x K x C x H x W
        ys = torch.stack([p[1] for p in pairs]).to(device)                       # B x K
        splits = [split_neighbours(k, cfg.closest_fraction, cfg.val_fraction, g) for g in gens]
        tr = torch.stack([s[0] for s in splits]).to(device)
        va = torch.stack([s[1] for s in splits]).to(device)
        ar = torch.arange(b, device=device)[:, None]
        x_tr, y_tr, x_va, y_va = xs[ar, tr], ys[ar, tr], xs[ar, va], ys[ar, va]

        trainable = {n for n, p in model.named_parameters() if any(p is q for q in rmc.params)}
        fixed = {n: p.detach() for n, p in model.named_parameters() if n not in trainable}
        fixed.update(dict(model.named_buffers()))
        params = {n: p.detach().unsqueeze(0).repeat(b, *([1] * p.dim())).clone()
                  for n, p in model.named_parameters() if n in trainable}

        def logits_of(p, xb):
            return functional_call(model, ({**p, **fixed}), (xb,))

        def loss_of(p, xb, yb):
            return F.cross_entropy(logits_of(p, xb), yb)

        grads_of = vmap(grad(loss_of))
        val_of = vmap(loss_of)
        adam = _StackedAdam(params, cfg.lr, eps=cfg.adam_eps)
        n = x_tr.shape[1]
        best = torch.full((b,), math.inf, device=device)
        wait = torch.zeros(b, dtype=torch.long, device=device)
        active = torch.ones(b, dtype=torch.bool, device=device)
        epochs = torch.zeros(b, dtype=torch.long)
        best_params = {nme: t.clone() for nme, t in params.items()} if cfg.restore_best else None
        for epoch in range(1, cfg.max_epochs + 1):
            if not active.any():
                break
            orders = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
            epochs[active.cpu()] = epoch
            for start in range(0, n, cfg.batch_size):
                idx = orders[:, start:start + cfg.batch_size]
                g = grads_of(params, x_tr[ar, idx], y_tr[ar, idx])
                adam.step(params, g, active)
            with torch.no_grad():
                val = val_of(params, x_va, y_va)
            improved = active & (val < best)
            best = torch.where(improved, val, best)
            wait = torch.where(improved, torch.zeros_like(wait), wait + active.long())
            if best_params is not None:
                for nme, t in params.items():
                    m = improved.view(-1, *([1] * (t.dim() - 1)))
                    best_params[nme] = torch.where(m, t, best_params[nme])
            active = active & (wait < cfg.patience)
        if best_params is not None:
            params = best_params
        with torch.no_grad():
            logits = vmap(logits_of)(params, x.to(device)[:, None])[:, 0]
        out = []
        for i in range(b):
            out.append(StepResult(int(logits[i].argmax()), logits[i].tolist(), rows[i], int(epochs[i]), 0))
        return out


class _StackedAdam:
    """Adam (as torch.optim.Adam, no weight decay) on stacked parameters; models not `active` are left unchanged."""

    def __init__(self, params: dict[str, torch.Tensor], lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr, self.b1, self.b2, self.eps, self.t = lr, betas[0], betas[1], eps, 0
        self.m = {n: torch.zeros_like(p) for n, p in params.items()}
        self.v = {n: torch.zeros_like(p) for n, p in params.items()}

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor], active: torch.Tensor) -> None:
        self.t += 1
        c1, c2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        for n, p in params.items():
            g = grads[n]
            m, v = self.m[n], self.v[n]
            m.lerp_(g, 1 - self.b1)
            v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
            denom = (v.sqrt() / math.sqrt(c2)).add_(self.eps)
            update = (m / denom) * (self.lr / c1)
            mask = active.view(-1, *([1] * (p.dim() - 1)))
            p.sub_(torch.where(mask, update, torch.zeros((), dtype=update.dtype, device=update.device)))


__all__ = ["BACKENDS", "BatchedEpisodic"]
