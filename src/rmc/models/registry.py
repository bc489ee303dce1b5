"""Build models by name: the built-in architectures, a timm model given as `timm:NAME`, or a user factory given as
`package.module:factory`."""

from __future__ import annotations

import importlib
from typing import Sequence, cast

from torch import nn

from rmc.errors import RMCError
from rmc.models.denoising import DenoiseOp, add_denoising
from rmc.models.imagenet_resnet import ResNet50, ResNet101, ResNet152
from rmc.models.preact_resnet_v2 import ResNet152V2
from rmc.models.resnet import ResNet18
from rmc.models.small_cnn import SmallCNN
from rmc.models.timm_arch import TIMM_PREFIX, build_timm, is_timm

# name -> class taking (num_classes, in_channels, mean, std); each class's own mean / std defaults are the
# preprocessing its usual weights expect (ImageNet statistics for the torchvision-layout ResNets, Keras' for v2).
BUILTIN: dict[str, type[nn.Module]] = {
    "small_cnn": SmallCNN, "resnet18": ResNet18,
    "resnet50": ResNet50, "resnet101": ResNet101, "resnet152": ResNet152,   # torchvision's key names
    "resnet152v2": ResNet152V2,                                             # Keras' ResNet152V2
}


def build_model(arch: str, num_classes: int, in_channels: int,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                denoise: str | None = None) -> nn.Module:
    """A fresh model taking images in [0, 1] and returning logits; `denoise` (a `DenoiseOp` value) puts a
    feature-denoising block after each of a built-in architecture's feature stages.

    `mean` / `std` (None: the architecture's own defaults) are normalised inside built-in and timm models. A user
    factory `pkg.mod:fn` is called as `fn(num_classes=..., in_channels=...)`; it must put its own normalisation
    inside the model.
    """
    if arch in BUILTIN:
        kwargs = {}
        if mean is not None:
            kwargs = {"mean": tuple(mean), "std": tuple(cast(Sequence[float], std))}   # given together
        model = BUILTIN[arch](num_classes=num_classes, in_channels=in_channels, **kwargs)
        if denoise is not None:
            try:
                op = DenoiseOp(denoise)
            except ValueError:
                raise RMCError(f"unknown denoising operation {denoise!r}; use one of "
                               f"{[o.value for o in DenoiseOp]}") from None
            stages = getattr(model, "denoise_stages", None)
            if stages is None:
                raise RMCError(f"architecture {arch!r} declares no stages for denoising blocks; use another "
                               "architecture for the denoising base")
            add_denoising(model, op, stages)
        return model
    if denoise is not None:
        raise RMCError(f"denoising blocks are built into {sorted(BUILTIN)} only; put them inside your factory "
                       f"{arch!r} (rmc.models.denoising.add_denoising) and leave train.denoise empty")
    if is_timm(arch):
        return build_timm(arch, num_classes, in_channels, mean, std)
    if ":" not in arch:
        raise RMCError(f"unknown architecture {arch!r}; use one of {sorted(BUILTIN)}, '{TIMM_PREFIX}NAME' or "
                       "'package.module:factory'")
    module_name, _, fn_name = arch.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RMCError(f"cannot import module {module_name!r} for architecture {arch!r} ({e}); "
                       "check it is installed or on PYTHONPATH") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise RMCError(f"{module_name!r} has no callable {fn_name!r}; name a function returning an nn.Module")
    model = factory(num_classes=num_classes, in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise RMCError(f"factory {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
