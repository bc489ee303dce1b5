"""`timm:NAME` architectures: a model from timm's registry (when timm is installed), given rmc's conventions
(images in [0, 1], normalisation inside, logits out). timm is optional and never installed by rmc."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from rmc.errors import RMCError
from rmc.models.imagenet_resnet import IMAGENET_MEAN, IMAGENET_STD
from rmc.models.layers import Normalize

TIMM_PREFIX = "timm:"
# A registry name only: timm also accepts "hf-hub:org/name", which reads from the network; a name read from a
# checkpoint's metadata must never do that.
_NAME = re.compile(r"[A-Za-z0-9_.]+")


def is_timm(arch: str) -> bool:
    return arch.startswith(TIMM_PREFIX)


class TimmModel(nn.Module):
    """`net` (the timm model, whose state dict keys are timm's under the prefix `net.`) behind rmc's Normalize."""

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.normalize = Normalize(mean, std, persistent=False)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def build_timm(arch: str, num_classes: int, in_channels: int, mean: Sequence[float] | None,
               std: Sequence[float] | None) -> TimmModel:
    """A fresh (not pretrained) timm model; mean / std None: the statistics timm lists for it."""
    name = arch[len(TIMM_PREFIX):]
    if not _NAME.fullmatch(name):
        raise RMCError(f"{arch!r} does not name a timm registry model (letters, digits, '_' and '.'; no hub names)")
    try:
        import timm
    except ImportError:
        raise RMCError(f"architecture {arch!r} needs timm, which is not installed here; `pip install timm`, or use a "
                       "built-in architecture or a package.module:factory") from None
    if not timm.is_model(name):
        raise RMCError(f"timm has no model {name!r}; `python -c \"import timm; print(timm.list_models())\"` lists them")
    net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    if mean is None or std is None:
        cfg = getattr(net, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    return TimmModel(net, mean, std)
