"""Validation of tensors crossing the library boundary: images in [0, 1], N x C x H x W, labels int64."""

from __future__ import annotations

import torch

from rmc.errors import RMCError


def check_images(x: torch.Tensor, name: str = "images", shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Return `x` as float32 after checking it is an N x C x H x W batch of finite values in [0, 1].

    uint8 input is converted exactly (divided by 255). `shape` is the expected (C, H, W).
    """
    if not isinstance(x, torch.Tensor):
        raise RMCError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    elif not x.is_floating_point():
        raise RMCError(f"{name} have dtype {x.dtype}; pass float images in [0, 1] or uint8 images in [0, 255]")
    if x.dim() != 4:
        raise RMCError(f"{name} have shape {tuple(x.shape)}; expected N x C x H x W (add a batch or channel dimension)")
    if shape is not None and tuple(x.shape[1:]) != tuple(shape):
        raise RMCError(f"{name} have shape C x H x W = {tuple(x.shape[1:])}; the model expects {tuple(shape)}")
    if x.device.type == "meta":   # shapes only (PyTorch's meta device has no values: device-propagation tests)
        return x.float() if x.dtype != torch.float32 else x
    if x.numel() and not torch.isfinite(x).all():
        raise RMCError(f"{name} contain NaN or infinite values; clean the input")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        lo, hi = float(x.min()), float(x.max())
        hint = " (looks like 0-255 images: divide by 255)" if hi > 1.5 else ""
        raise RMCError(f"{name} have values in [{lo:.3g}, {hi:.3g}]; expected [0, 1]{hint}")
    return x.float() if x.dtype != torch.float32 else x


def check_labels(y: torch.Tensor, n: int, num_classes: int | None = None, name: str = "labels") -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise RMCError(f"{name} must be an integer torch.Tensor")
    if y.dim() != 1 or y.shape[0] != n:
        raise RMCError(f"{name} have shape {tuple(y.shape)}; expected ({n},), one label per image")
    if n and y.min() < 0:
        raise RMCError(f"{name} contain negative values")
    if num_classes is not None and n and y.max() >= num_classes:
        raise RMCError(f"{name} contain class {int(y.max())} but the model has {num_classes} classes")
    return y.long()


def check_positive(value, name: str, integer: bool = False, allow_zero: bool = False):
    """Check a hyperparameter is a (strictly) positive number; return it."""
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or value != value or value < 0 or (value == 0 and not allow_zero):
        kind = "integer" if integer else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise RMCError(f"{name} must be {'an' if integer else 'a'} {kind} {bound}, got {value!r}")
    return value
