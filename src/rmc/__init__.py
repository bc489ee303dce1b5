"""rmc: Runtime Masking and Cleansing (Wu, Yuan & Wu, ICML 2020), with defense-aware evaluation.

The public API is a few names, enough to defend a model with what `rmc train` and `rmc augment` (or `rmc run`)
made and to measure it:

    model, info = rmc.load_model("m.safetensors")             # a trained model and its metadata
    dprime = rmc.open_dprime("dprime")                         # the augmented training set D'
    defense = rmc.build_rmc(model, dprime, rmc.RMCConfig(k=256, lr=1e-3, max_epochs=3))
    print(rmc.evaluate(defense, images, labels))               # accuracy of RMC on N x C x H x W images in [0, 1]

The rest (attacks, the evaluation driver, the `rmc` command) lives in the subpackages. `import rmc` stays light:
torch and FAISS are imported when a name that needs them is first used.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rmc.errors import RMCError

if TYPE_CHECKING:   # the classes below are loaded on first use (module __getattr__)
    import numpy as np
    import torch
    from torch import nn

    from rmc.artifacts.dprime import DPrimeStore
    from rmc.defense.classifier import RMCClassifier
    from rmc.defense.config import RMCConfig
    from rmc.defense.core import RMC
    from rmc.defense.dprime import DPrime
    from rmc.models.checkpoint import ModelInfo

__version__ = "0.1.0"

# Public classes, by the module that defines them; imported when first asked for (`rmc.RMC`).
_CLASSES = {"RMC": "rmc.defense.core", "RMCConfig": "rmc.defense.config", "RMCClassifier": "rmc.defense.classifier",
            "DPrimeStore": "rmc.artifacts.dprime", "ModelInfo": "rmc.models.checkpoint"}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        value = getattr(importlib.import_module(_CLASSES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rmc' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


def load_model(path: str | Path, device: str = "cpu", *, trust_arch: str | None = None) -> tuple[nn.Module, ModelInfo]:
    """The model saved at `path` (`rmc train --out`, or a run's `models/<base>-<key>.safetensors`) and its metadata.

    The weights are safetensors and the JSON beside them is data, never code: a model whose architecture is a
    `package.module:factory` outside rmc is built only when `trust_arch` names that same factory. The model comes
    back in eval mode on `device`; `info.sha256` is the hash of its weights file.
    """
    from rmc.models.checkpoint import load_checkpoint
    return load_checkpoint(path, device, trust_arch)


def open_dprime(path: str | Path, *, verify: str = "auto") -> DPrimeStore:
    """The augmented training set D' stored at `path` (`rmc augment --out`, or a run's `dprime/<base>-<key>/`).

    The images stay on disk, in shards read on demand. `verify`: "auto" checks structure and the small arrays'
    hashes (a shard's when it changed since it last verified), "full" re-hashes every file, "none" checks structure
    only (every shard's size included)."""
    from rmc.artifacts.dprime import open_dprime_store
    return open_dprime_store(path, verify)


def build_rmc(model: nn.Module, dprime: DPrimeStore | DPrime | str | Path, config: RMCConfig | None = None, *,
              features: np.ndarray | torch.Tensor | str | Path | None = None, layer: str | None = None) -> RMC:
    """RMC around the static `model`, fine-tuning on neighbours from `dprime`.

    - `dprime`: a store from `open_dprime`, its path, or an in-memory `rmc.defense.DPrime`.
    - `config`: the hyperparameters; None: `RMCConfig()`, the original's values (K = 2048, lr 1e-5, up to 100
      epochs: minutes per input on a CPU).
    - `layer`: the hidden layer whose (pooled) output is the neighbour search's feature space; None: the model's
      default (`rmc layers` lists them).
    - `features`: D''s features at that layer, one row per D' row: an array, or the `.npy` that `rmc features` /
      `rmc run` wrote (refused if its sidecar names another layer or another D'). None: computed here, one pass
      of `model` over D'.

    The defense fine-tunes a copy of `model` (which stays untouched) through the fastest equivalent forward the
    config allows; `RMC.step(x, features_of_x)` classifies one input, `evaluate` a batch.
    """
    import numpy as np
    import torch

    from rmc.artifacts.dprime import DPrimeStore, open_dprime_store
    from rmc.artifacts.features import compute_features, load_features
    from rmc.data.arrays import LazyImages
    from rmc.defense import RMCConfig
    from rmc.defense import build_rmc as build
    from rmc.defense.dprime import DPrime
    from rmc.defense.knn import NeighbourIndex
    from rmc.models import default_layer

    if isinstance(dprime, (str, Path)):
        dprime = open_dprime_store(dprime)
    if isinstance(dprime, DPrimeStore):
        dprime = dprime.dprime()
    if not isinstance(dprime, DPrime):
        raise RMCError(f"dprime must be a D' store (rmc.open_dprime), its path or a DPrime, got "
                       f"{type(dprime).__name__}")
    if config is not None and not isinstance(config, RMCConfig):
        raise RMCError(f"config must be an rmc.RMCConfig, got {type(config).__name__}")
    layer = layer or default_layer(model)
    if features is None:
        images = dprime.images
        features = compute_features(model, None, layer,
                                    images if isinstance(images, LazyImages) else torch.as_tensor(images))
    elif isinstance(features, (str, Path)):
        source = None if dprime.fingerprint is None else f"store:{dprime.fingerprint}"
        features = load_features(features, expect_layer=layer, expect_source=source)[0]
    feats = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    if feats.ndim != 2 or len(feats) != len(dprime):
        raise RMCError(f"features must hold one row per D' image ({len(dprime)} x d), got shape {feats.shape}; "
                       "compute them on this D' (or pass features=None to compute them here)")
    return build(model, dprime, NeighbourIndex(feats), config or RMCConfig(), layer)


def evaluate(defense: RMC | nn.Module, images: torch.Tensor, labels: torch.Tensor, *, batch_size: int = 64) -> float:
    """Accuracy (a fraction in [0, 1]) of `defense` on `images` (N x C x H x W floats in [0, 1]) and their `labels`.

    `defense` is an `RMC` (each image in turn, as `RMC.step` would: an online RMC adapts along the images as
    deployed and keeps the state it reached), an `RMCClassifier`, or any classifier module, e.g. the static model
    for the undefended accuracy on the same images.
    """
    import torch

    from rmc.defense.classifier import RMCClassifier
    from rmc.defense.core import RMC, check_input

    if isinstance(defense, RMC):
        defense = RMCClassifier(defense, stateful=True)
    if not callable(defense):
        raise RMCError(f"evaluate takes an RMC or a classifier module, got {type(defense).__name__}")
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise RMCError("evaluate takes images as an N x C x H x W tensor of floats in [0, 1]")
    check_input(images, tuple(images.shape[1:]), "evaluate", batch=True)
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),) or labels.is_floating_point():
        raise RMCError(f"evaluate needs one integer label per image: {len(images)} labels, got shape "
                       f"{tuple(labels.shape)} of {labels.dtype}")
    if len(images) == 0:
        raise RMCError("evaluate got no images")
    if batch_size < 1:
        raise RMCError(f"batch_size must be at least 1, got {batch_size}")
    device = next((p.device for p in defense.parameters()), images.device) if isinstance(defense, torch.nn.Module) \
        else images.device
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = defense(images[start:start + batch_size].to(device))
            correct += int((logits.argmax(1).cpu() == labels[start:start + batch_size].cpu()).sum())
    return correct / len(images)


__all__ = ["DPrimeStore", "ModelInfo", "RMC", "RMCClassifier", "RMCConfig", "RMCError", "__version__", "build_rmc",
           "evaluate", "load_model", "open_dprime"]
