"""The fine-tuning's arithmetic: Adam as fast as the parameters allow, and the optional bf16 autocast."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


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
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
