"""Hidden features from any named layer, via a forward hook (global average pooling for conv maps)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rmc.errors import RMCError


def list_layers(model: nn.Module) -> list[tuple[str, str]]:
    """(name, module type) of every sub-module that can be named as a feature layer."""
    return [(name, type(m).__name__) for name, m in model.named_modules() if name]


def default_layer(model: nn.Module) -> str:
    layer = getattr(model, "default_feature_layer", None)
    if layer is None:
        raise RMCError("this model declares no default feature layer; name one (see `rmc layers`)")
    return layer


def get_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if not name or name not in modules:
        raise RMCError(f"model has no layer {name!r}; `rmc layers` lists the names it offers")
    return modules[name]


def _pool(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 4:
        return out.mean(dim=(2, 3))   # global average pooling of a conv map
    return out.flatten(1)


class FeatureHook:
    """Context manager capturing the (pooled) output of one layer during forward passes."""

    def __init__(self, model: nn.Module, layer: str):
        self.module = get_layer(model, layer)
        self.value: torch.Tensor | None = None
        self._handle: RemovableHandle | None = None

    def __enter__(self) -> "FeatureHook":
        def hook(_m, _inp, out):
            self.value = _pool(out)
        self._handle = self.module.register_forward_hook(hook)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()

    def output(self) -> torch.Tensor:
        """The layer's (pooled) output of the last forward pass."""
        if self.value is None:
            raise RuntimeError("the hooked layer has not run: call the model first")
        return self.value


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def extract_features(model: nn.Module, layer: str, images: torch.Tensor, batch_size: int = 1024,
                     progress=None) -> torch.Tensor:
    """Features (N x d, float32, on CPU) of `images` (N x C x H x W; uint8 or float in [0, 1]) at `layer`.

    The model is put in eval mode. `images` may be a memory-mapped uint8 tensor; it is read batch by batch.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        with FeatureHook(model, layer) as hook:
            for sl in batches(len(images), batch_size):
                x = images[sl]
                x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
                model(x.to(device))
                out.append(hook.output().float().cpu())
                if progress is not None:
                    progress(sl.stop - sl.start)
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
