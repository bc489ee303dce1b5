"""How RMC's fine-tuning computes logits (the `Forward` handed to `rmc.defense.core.RMC`), and the factory that picks
the fastest equivalent one the config allows (`rmc.defense.build_rmc` hands it to `RMC`).

- `PlainForward`: the model on the images (the default; what the algorithm means).
- the fast path (`rmc.config.fast_path`): the same function through a rewritten graph (rmc.defense.fastpath);
- scope 'head' with `cache_head_inputs`: only the head runs per batch, on inputs computed once (rmc.models.split).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch
from torch import nn


class Forward(Protocol):
    """Logits for fine-tuning: `inputs(images)` -> what `__call__` takes -> logits; `stored(rows)` gives those
    inputs for D' rows without reading their images, or None."""
    def inputs(self, x: torch.Tensor) -> torch.Tensor: ...
    def __call__(self, h: torch.Tensor) -> torch.Tensor: ...
    def stored(self, rows: np.ndarray) -> torch.Tensor | None: ...


class PlainForward:
    """A module on the images."""

    def __init__(self, module: nn.Module):
        self.module = module

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.module(h)

    def stored(self, rows: np.ndarray) -> None:
        return None


def forward_factory(dprime, index, config, feature_layer: str | None = None) -> Callable[[nn.Module], Forward]:
    """What `RMC(forward=...)` takes: for a model, the fastest `Forward` equal to it that `config` allows."""
    from rmc.defense.config import Scope
    head = config.scope is Scope.HEAD and config.cache_head_inputs
    if not (config.fast_path or head):
        return PlainForward
    # A few D' rows check every rewrite against the model it replaces.
    rows = np.unique(np.linspace(0, len(dprime) - 1, min(8, len(dprime))).astype(np.int64))
    images = dprime.gather(rows)[0]

    def build(model: nn.Module) -> Forward:
        from rmc.defense.fastpath import fast_forward
        from rmc.models.split import CachedHead
        sample = images.to(next(model.parameters()).device)
        speed = (lambda m: fast_forward(m, sample)) if config.fast_path else (lambda m: m)
        if head:
            cached = CachedHead.build(model, feature_layer, sample, getattr(index, "vectors", None), rows, speed)
            if cached is not None:
                return cached
        return PlainForward(speed(model))
    return build


def compute_path(config, device: torch.device | str) -> str:
    """What decides RMC's numerics in this process, e.g. 'fast+kernels/cpu-AVX512/fp32/1t': the forward (plain, the
    rewritten graph, with the kernels of rmc.defense.kernels where they load), the device and its instruction set
    (ATen's, which also picks the kernels' copy, and oneDNN's limit if set), the precision and torch's threads (1 vs
    2 threads moved logits by ~1e-6 here). Records carry it,
    and a stream refuses to continue under another (rmc.evaluation.driver)."""
    import os

    from rmc.defense import kernels
    device = torch.device(device)
    forward = "plain"
    if config.fast_path:
        forward = "fast+kernels" if device.type == "cpu" and kernels.load() else "fast"
    if device.type == "cpu":
        where = f"cpu-{torch.backends.cpu.get_cpu_capability()}"
        if os.environ.get("ONEDNN_MAX_CPU_ISA"):
            where += f"-onednn:{os.environ['ONEDNN_MAX_CPU_ISA']}"
    else:
        where = f"{device.type}-{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
    from rmc.defense.optim import resolve_precision
    return f"{forward}/{where}/{resolve_precision(config.precision, device)}/{torch.get_num_threads()}t"
