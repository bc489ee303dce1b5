"""Keras ResNet-v2 weights (`ResNet152V2`'s `.h5`) read with h5py, without TensorFlow, into the state dict of
rmc.models.preact_resnet_v2.

Keras' HDF5 weight files (keras.src.legacy.saving.legacy_h5_format) hold, in a root group (the file itself for
`save_weights` and the published application weights, `model_weights` for a whole saved model): an attribute
`layer_names` (split into `layer_names0`, `layer_names1`, ... when large), one group per layer with an attribute
`weight_names`, and each weight as a dataset at `<layer>/<weight name>`, where the weight name is
`<layer>/kernel:0` (Keras 2) or `<layer>/kernel` (Keras 3). Kernels are HWIO (convolutions) and in x out (dense);
batch norm stores gamma, beta, moving_mean, moving_variance.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from rmc.errors import RMCError

# Keras batch-norm weight -> PyTorch BatchNorm2d entry
_BN = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var"}
_CONV = {"kernel": "weight", "bias": "bias"}
# The parts of a Keras v2 block (conv{s}_block{b}_<part>) and the module they become in PreActBottleneck.
_BLOCK_PART = {"preact_bn": "preact_bn", "0_conv": "shortcut", "1_conv": "conv1", "1_bn": "bn1",
               "2_conv": "conv2", "2_bn": "bn2", "3_conv": "conv3"}
_BLOCK = re.compile(r"conv([2-5])_block([1-9][0-9]*)_(\w+)")


def _attr_list(group, name: str) -> list[str]:
    """A Keras string-list attribute, joined from its chunks (`name0`, `name1`, ...) when Keras split it."""
    if name in group.attrs:
        raw = list(group.attrs[name])
    else:
        raw, i = [], 0
        while f"{name}{i}" in group.attrs:
            raw += list(group.attrs[f"{name}{i}"])
            i += 1
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in raw]


def _module_of(layer: str) -> str | None:
    """The PyTorch module prefix of a Keras ResNet-v2 layer with weights, None for a layer that is not one."""
    if layer == "conv1_conv":
        return "conv1"
    if layer in ("post_bn", "predictions"):
        return {"post_bn": "post_bn", "predictions": "fc"}[layer]
    m = _BLOCK.fullmatch(layer)
    if m is None or m.group(3) not in _BLOCK_PART:
        return None
    stage, block, part = int(m.group(1)) - 1, int(m.group(2)) - 1, _BLOCK_PART[m.group(3)]
    return f"layer{stage}.{block}.{part}"


def _tensor(layer: str, weight: str, value: np.ndarray, where: Path) -> tuple[str, torch.Tensor]:
    """(PyTorch entry name, tensor in PyTorch's layout) of one Keras weight."""
    t = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
    if weight in _BN and layer.endswith("_bn"):
        return _BN[weight], t
    if weight == "kernel" and t.dim() == 4:
        return "weight", t.permute(3, 2, 0, 1).contiguous()    # HWIO -> OIHW
    if weight == "kernel" and t.dim() == 2:
        return "weight", t.t().contiguous()                    # in x out -> out x in
    if weight == "bias" and t.dim() == 1:
        return "bias", t
    raise RMCError(f"{where}: Keras layer {layer!r} has an unexpected weight {weight!r} of shape {tuple(t.shape)}; "
                   "this is not a Keras ResNet-v2 weights file")


def read_keras_resnet_v2(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict (rmc.models.preact_resnet_v2 key names, PyTorch layouts) held by a Keras ResNet-v2 `.h5`.

    Batch-norm `num_batches_tracked` counters, which Keras does not have, are set to 0."""
    path = Path(path)
    try:
        import h5py
    except ImportError:
        raise RMCError("reading Keras .h5 weights needs h5py: pip install 'rmc-defense[keras]'") from None
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise RMCError(f"{path} is not a readable HDF5 file ({e}); give the Keras .h5 weights file") from None
    with f:
        try:
            return _read(f, path)
        except (OSError, KeyError, ValueError, TypeError) as e:   # h5py's faults on a damaged file
            raise RMCError(f"{path} could not be read as Keras weights ({e}); the file is damaged") from None


def _read(f, path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    root = f.get("model_weights", f)
    layers = _attr_list(root, "layer_names")
    if not layers:
        raise RMCError(f"{path} has no Keras `layer_names` attribute: not a Keras HDF5 weights file (Keras 3's "
                       "`.weights.h5` layout is not read: `model.save('model.h5')` writes the one read here)")
    for layer in layers:
        if layer not in root:
            raise RMCError(f"{path} lists Keras layer {layer!r} but holds no group for it; the file is damaged")
        group = root[layer]
        names = _attr_list(group, "weight_names")
        if not names:
            continue   # padding, activation, pooling, add: no weights
        prefix = _module_of(layer)
        if prefix is None:
            raise RMCError(f"{path}: Keras layer {layer!r} has weights but is not a layer of ResNet-v2 "
                           "(conv1_conv, conv{2-5}_block{b}_*, post_bn, predictions); give a ResNet152V2 file")
        for name in names:
            if name not in group:
                raise RMCError(f"{path}: weight {name!r} of layer {layer!r} is missing; the file is damaged")
            weight = name.rsplit("/", 1)[-1].split(":", 1)[0]
            entry, tensor = _tensor(layer, weight, np.asarray(group[name]), path)
            key = f"{prefix}.{entry}"
            if key in state:
                raise RMCError(f"{path}: Keras layer {layer!r} gives {key} twice; the file is damaged")
            state[key] = tensor
        if layer.endswith("_bn"):
            state[f"{prefix}.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return state
