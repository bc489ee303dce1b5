"""The fine-tuning's arithmetic: Adam as fast as the parameters allow, and the optional bf16 autocast."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from rmc.errors import RMCError


def make_optimizer(params: list[nn.Parameter], lr: float, eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam; the fused kernel (one pass over all parameters) where the parameters allow it."""
    if params and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params) \
            and len({p.device for p in params}) == 1:
        try:
            return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)
        except (RuntimeError, TypeError, ValueError):
            pass
    return torch.optim.Adam(params, lr=lr, eps=eps)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether `device` does bfloat16 arithmetic in hardware: on CPUs, oneDNN's bf16 support (AVX-512 with BF16 or
    AMX; honours ONEDNN_MAX_CPU_ISA); on GPUs, torch.cuda.is_bf16_supported(). Elsewhere bf16 is emulated and slower
    than fp32 (6x on an AVX2 machine, benchmarks/README.md)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def check_precision(precision: str, device: torch.device | str = "cpu") -> None:
    """Refuse bf16 where it would be emulated (one line naming the device and the fix)."""
    if precision == "bf16" and not native_bf16(device):
        raise RMCError(f"rmc.precision=bf16 needs native bfloat16 arithmetic, which {torch.device(device)} lacks "
                       "here (it would run several times slower than fp32); use rmc.precision=fp32")


def autocast_context(precision: str, device: torch.device | str = "cpu"):
    """bfloat16 autocast for precision 'bf16' (matrix products in bf16, accumulation and weights in fp32)."""
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# The optimizer's state (Adam's step count and moments) travels with the weights in `RMC.state_dict()` under
# this prefix, which no module name can start with.
STATE_PREFIX = "__optimizer__."


def optimizer_state(opt: torch.optim.Optimizer, params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """A copy of `opt`'s per-parameter state as flat tensors ('<prefix><param index>.<name>')."""
    out = {}
    for i, p in enumerate(params):
        for name, v in opt.state.get(p, {}).items():
            out[f"{STATE_PREFIX}{i}.{name}"] = v.detach().clone() if torch.is_tensor(v) else torch.tensor(v)
    return out


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the model's weights and buffers, the optimizer's tensors) of a combined state dict."""
    weights = {k: v for k, v in state.items() if not k.startswith(STATE_PREFIX)}
    return weights, {k: v for k, v in state.items() if k.startswith(STATE_PREFIX)}


def load_optimizer_state(opt: torch.optim.Optimizer, params: list[nn.Parameter],
                         tensors: dict[str, torch.Tensor]) -> None:
    """Replace `opt`'s state by `tensors` (from `optimizer_state`); none: a fresh optimizer."""
    opt.state.clear()
    fused = bool(opt.defaults.get("fused"))
    for key, v in tensors.items():
        i, name = key[len(STATE_PREFIX):].split(".", 1)
        p = params[int(i)]
        # Adam keeps its step count on the CPU unless it is fused (then beside the parameter).
        opt.state[p][name] = v.clone().to(p.device if name != "step" or fused else "cpu")
