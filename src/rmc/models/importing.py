"""Pretrained weights made outside rmc turned into an rmc model, with their provenance (`rmc import-model`).

Weights are read without unpickling anything: a PyTorch file through `torch.load(weights_only=True)`, safetensors,
or a Keras ResNet-v2 `.h5` through h5py (rmc.models.keras_h5). Keys must match the architecture exactly; the
only entries filled in are the normalisation buffers of an architecture that keeps them in its state dict (they
come from the stated preprocessing).
"""

from __future__ import annotations

import enum
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmc.errors import RMCError
from rmc.io import load_tensors, sha256_file
from rmc.models.checkpoint import ModelInfo
from rmc.models.layers import Normalize
from rmc.models.registry import BUILTIN, build_model
from rmc.models.timm_arch import TimmModel, is_timm


class WeightsFormat(str, enum.Enum):
    TORCH = "torch"                  # torch.save of a state dict (.pt / .pth / .bin), read with weights_only=True
    SAFETENSORS = "safetensors"
    KERAS_H5 = "keras-h5"            # Keras' HDF5 weights of ResNet152V2


SUFFIXES = {".pt": WeightsFormat.TORCH, ".pth": WeightsFormat.TORCH, ".bin": WeightsFormat.TORCH,
            ".safetensors": WeightsFormat.SAFETENSORS, ".h5": WeightsFormat.KERAS_H5, ".hdf5": WeightsFormat.KERAS_H5}
KERAS_ARCHS = ("resnet152v2",)      # the architectures whose Keras layer names rmc.models.keras_h5 maps
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")   # training scripts' usual {"<key>": state_dict, ...}
DATA_PARALLEL_PREFIX = "module."    # nn.DataParallel / DistributedDataParallel's prefix on every key
SHOWN = 5                           # keys named in an error message before "and N more"


def _shown(keys: Sequence[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside what torch.load returned: the dict itself, or under a wrapper key (repeatedly), with
    a `module.` prefix on every key removed."""
    while isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            odd = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
            raise RMCError(f"{path} is not a state dict: entry {odd!r} is a {type(obj[odd]).__name__}, and no "
                           f"wrapper key {list(WRAPPER_KEYS)} holds one; save model.state_dict() and import that")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise RMCError(f"{path} holds a {type(obj).__name__}{' (empty)' if isinstance(obj, dict) else ''}, not a "
                       "state dict; save model.state_dict() and import that")
    if any(not isinstance(k, str) for k in obj):
        raise RMCError(f"{path} is not a state dict (its keys are not all names); save model.state_dict()")
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in obj):
        obj = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in obj.items()}
    return obj


def _read_torch(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the class or function a pickled object needs; any other complaint is
        # about the bytes themselves.
        found = re.search(r"Unsupported global: GLOBAL (\S+)|unrecognized function|Unsupported class", str(e))
        if found is None:
            detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()
                           and "WeightsUnpickler" not in line and "Please file" not in line), str(e).splitlines()[0])
            raise RMCError(f"{path} is not a readable PyTorch file ({detail})") from None
        what = f" (it needs {found.group(1)})" if found.group(1) else ""
        raise RMCError(f"{path} is a pickled object, not a plain state dict{what}, and rmc never unpickles: where "
                       "you trust the file, load it and torch.save(model.state_dict(), 'weights.pt'), then import "
                       "that") from None
    except Exception as e:  # noqa: BLE001 - torch.load reports a damaged file as KeyError, EOFError, RuntimeError ...
        raise RMCError(f"{path} is not a readable PyTorch file ({type(e).__name__}: {e})") from None
    return unwrap_state_dict(obj, path)


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], WeightsFormat]:
    """(state dict, format) of a weights file, the format told by its suffix."""
    path = Path(path)
    if not path.is_file():
        raise RMCError(f"weights file not found: {path}")
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise RMCError(f"cannot tell the format of {path} from its suffix; rename it to one of {sorted(SUFFIXES)}")
    if fmt is WeightsFormat.TORCH:
        return _read_torch(path), fmt
    if fmt is WeightsFormat.SAFETENSORS:
        return unwrap_state_dict(load_tensors(path, "weights file"), path), fmt
    from rmc.models.keras_h5 import read_keras_resnet_v2
    return read_keras_resnet_v2(path), fmt


@dataclass
class Preprocessing:
    """What the imported model expects: C x size x size images in [0, 1], normalised inside by mean / std."""
    input_size: int
    channels: int = 3
    mean: list[float] | None = None    # None: the architecture's own default (rmc.models.BUILTIN's classes)
    std: list[float] | None = None

    def validate(self) -> Preprocessing:
        if isinstance(self.input_size, bool) or not isinstance(self.input_size, int) or self.input_size < 1:
            raise RMCError(f"--input-size must be a positive integer, got {self.input_size!r}")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise RMCError(f"--channels must be a positive integer, got {self.channels!r}")
        if (self.mean is None) != (self.std is None):
            raise RMCError("give --mean and --std together (or neither, for the architecture's defaults)")
        for name, values in (("--mean", self.mean), ("--std", self.std)):
            if values is not None and len(values) != self.channels:
                raise RMCError(f"{name} needs one value per channel ({self.channels}), got {len(values)}")
        if self.std is not None and not all(v > 0 for v in self.std):
            raise RMCError(f"--std values must be > 0, got {self.std}")
        return self


def _persistent_normalization(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of Normalize layers that keep their statistics in the state dict."""
    names = {f"{name}.{b}" if name else b for name, m in model.named_modules() if isinstance(m, Normalize)
             for b in ("mean", "std")}
    return {k: v for k, v in model.state_dict().items() if k in names}


def _normalization(model: nn.Module) -> tuple[list[float], list[float]] | None:
    norm = next((m for m in model.modules() if isinstance(m, Normalize)), None)
    if norm is None:
        return None
    return norm.mean.flatten().tolist(), norm.std.flatten().tolist()


def _classifier_key(arch: str, channels: int, pre: Preprocessing) -> str | None:
    """The state-dict key of the classifier's weight (its first dimension is the number of classes): the one
    linear layer with a single output when the architecture is built for one class."""
    try:
        with torch.device("meta"):   # shapes only: no memory, no initialisation
            probe = build_model(arch, 1, channels, pre.mean, pre.std)
    except (RuntimeError, NotImplementedError):   # a factory that computes with values while it builds
        return None
    target = probe.net if isinstance(probe, TimmModel) else probe
    heads = [name for name, m in target.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1]
    return f"{heads[-1]}.weight" if len(heads) == 1 else None


def _check_keys(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, arch: str,
                ignore_unexpected: bool) -> list[str]:
    """Refuse missing keys, unexpected ones (unless ignored: returned) and shape mismatches, in one line each."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise RMCError(f"{path} lacks {len(missing)} entries of architecture {arch!r}: {_shown(missing)}; check "
                       "--arch (the file's keys begin " + _shown(list(state)[:SHOWN]) + ")")
    unexpected = [k for k in state if k not in expected]
    if unexpected and not ignore_unexpected:
        raise RMCError(f"{path} has {len(unexpected)} entries architecture {arch!r} does not: {_shown(unexpected)}; "
                       "check --arch, or pass --ignore-unexpected to drop them (recorded)")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
           if tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        raise RMCError(f"{path} does not fit architecture {arch!r} (file vs model shapes): {_shown(bad)}; check "
                       "--arch, --channels and --num-classes")
    return sorted(unexpected)


def import_weights(weights: str | Path, arch: str, pre: Preprocessing, num_classes: int | None = None,
                   dataset: str = "", adversarial: bool = False,
                   ignore_unexpected: bool = False) -> tuple[nn.Module, ModelInfo]:
    """The model `arch` holding the weights of `weights` (eval mode, CPU) and its ModelInfo (not saved yet: use
    rmc.models.save_checkpoint); number of classes from the classifier's weight unless given."""
    path = Path(weights)
    pre = pre.validate()
    state, fmt = read_weights(path)
    if fmt is WeightsFormat.KERAS_H5 and arch not in KERAS_ARCHS:
        raise RMCError(f"Keras .h5 weights are read for {list(KERAS_ARCHS)} only, not --arch {arch!r}")
    factory = arch not in BUILTIN and not is_timm(arch)
    if factory and pre.mean is not None:
        raise RMCError(f"a factory architecture ({arch}) puts its own normalisation inside its model; drop "
                       "--mean / --std (or build rmc.models.layers.Normalize into the factory)")
    classes_from = "given" if num_classes is not None else "weights"
    if num_classes is None:
        key = _classifier_key(arch, pre.channels, pre)
        if key is None or key not in state or state[key].dim() != 2:
            raise RMCError(f"cannot tell the number of classes of {path} for architecture {arch!r} (no single "
                           "linear classifier found in the file); pass --num-classes")
        num_classes = int(state[key].shape[0])
    elif isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise RMCError(f"--num-classes must be a positive integer, got {num_classes!r}")

    model = build_model(arch, num_classes, pre.channels, pre.mean, pre.std)
    stats = _normalization(model)
    if stats is not None and len(stats[0]) != pre.channels:
        raise RMCError(f"architecture {arch!r} normalises {len(stats[0])} channels by default, not --channels "
                       f"{pre.channels}; give --mean and --std, one value per channel")
    target = model.net if isinstance(model, TimmModel) else model
    expected = target.state_dict()
    carried = _persistent_normalization(target)
    for k, v in carried.items():
        if k not in state:
            state[k] = v.clone()       # the stated (or default) preprocessing, as the architecture stores it
        elif pre.mean is not None and (state[k].shape != v.shape or not torch.allclose(state[k].float(), v)):
            raise RMCError(f"{path} carries its own normalisation ({k} = {state[k].flatten().tolist()}), not the "
                           "--mean / --std given; drop --mean / --std to keep the file's")
    ignored = _check_keys(state, expected, path, arch, ignore_unexpected)
    loaded = {k: (state[k].to(expected[k].dtype) if expected[k].is_floating_point() else state[k]) for k in expected}
    target.load_state_dict(loaded, strict=True)
    model.eval()
    shape = (pre.channels, pre.input_size, pre.input_size)
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *shape))
    except RuntimeError as e:
        raise RMCError(f"architecture {arch!r} cannot run on {shape[0]} x {shape[1]} x {shape[2]} images "
                       f"({str(e).splitlines()[0]}); check --input-size and --channels") from None
    if tuple(out.shape) != (1, num_classes):
        raise RMCError(f"architecture {arch!r} returns {tuple(out.shape)} for one image, not (1, {num_classes}) "
                       "logits; a classifier returning logits is needed")
    stats = _normalization(model)   # what the model now applies (the file's, where it carries its own)
    mean, std = stats if stats is not None else (None, None)
    info = ModelInfo(
        arch=arch, num_classes=num_classes, input_shape=shape, mean=mean, std=std, dataset=dataset,
        adversarial=adversarial,
        imported={"source": str(path), "source_name": path.name, "source_sha256": sha256_file(path),
                  "format": fmt.value, "architecture": arch,
                  "preprocessing": {"input_size": pre.input_size, "channels": pre.channels, "mean": mean, "std": std,
                                    "stated": pre.mean is not None},
                  "num_classes": classes_from,
                  "ignored_keys": ignored})
    return model, info
