"""Model checkpoints: weights as safetensors plus a JSON of metadata beside them (never pickle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmc.errors import RMCError
from rmc.io import load_tensors, read_json, save_tensors, sha256_file, write_json
from rmc.models.registry import BUILTIN, build_model
from rmc.models.timm_arch import is_timm


@dataclass
class ModelInfo:
    """What is needed to rebuild a model, and where it came from."""
    arch: str                      # a built-in name (rmc.models.BUILTIN), "timm:NAME" or "pkg.mod:factory"
    num_classes: int
    input_shape: tuple[int, int, int]   # C, H, W
    mean: list[float] | None = None     # normalisation inside built-in models
    std: list[float] | None = None
    dataset: str = ""
    adversarial: bool = False
    denoise: str | None = None          # feature-denoising operation of the blocks inside the model, if any
    test_accuracy: float | None = None
    seed: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    imported: dict[str, Any] = field(default_factory=dict)   # weights made outside rmc (rmc import-model): source
                                   # file, its sha256 and format, the preprocessing; empty for a model trained here
    sha256: str = ""               # hash of the weights file; filled in on save


def check_metadata(info: ModelInfo, where: Path) -> None:
    """Types and ranges of the sidecar's fields (it is a file anyone may have edited)."""
    shape = info.input_shape
    ok = (isinstance(info.arch, str) and isinstance(info.num_classes, int) and not isinstance(info.num_classes, bool)
          and info.num_classes >= 1 and len(shape) == 3
          and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)
          and isinstance(info.dataset, str) and isinstance(info.imported, dict))
    for stats in (info.mean, info.std):
        ok = ok and (stats is None or (isinstance(stats, list) and len(stats) == shape[0]
                                       and all(isinstance(v, (int, float)) for v in stats)))
    if ok and info.std is not None:
        ok = all(v > 0 for v in info.std)
    if not ok:
        raise RMCError(f"model metadata {where} has invalid fields (arch, num_classes, input_shape, mean/std or "
                       "dataset); re-create it with `rmc train`")


def meta_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_checkpoint(model: nn.Module, info: ModelInfo, weights: str | Path) -> ModelInfo:
    """Write `<weights>` (.safetensors) and `<weights minus suffix>.json`; return the info with its hash."""
    weights = Path(weights)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_tensors(weights, state)
    info.sha256 = sha256_file(weights)
    write_json(meta_path(weights), asdict(info))
    return info


def read_info(weights: str | Path) -> ModelInfo:
    """The checked metadata of the checkpoint `weights` (its JSON; the weights file must exist, its hash is not
    checked here)."""
    weights = Path(weights)
    if not weights.exists():
        raise RMCError(f"model weights not found: {weights}; train one with `rmc train` or import one with "
                       "`rmc import-model`")
    meta = read_json(meta_path(weights), "model metadata")
    try:
        meta["input_shape"] = tuple(meta["input_shape"])
        info = ModelInfo(**meta)
    except (TypeError, KeyError) as e:
        raise RMCError(f"model metadata {meta_path(weights)} is malformed ({e}); "
                       "re-create it with `rmc train`") from None
    check_metadata(info, meta_path(weights))
    return info


def check_trusted(info: ModelInfo, weights: str | Path, trust_arch: str | None) -> None:
    """A checkpoint's architecture may be built: built in, a timm registry name, or the factory the user named."""
    if info.arch not in BUILTIN and not is_timm(info.arch) and info.arch != trust_arch:
        raise RMCError(f"{meta_path(weights)} names architecture {info.arch!r}, which is code outside rmc; rmc runs "
                       f"it only when you name it yourself: add --arch {info.arch} if you trust it")


def load_checkpoint(weights: str | Path, device: str | torch.device = "cpu",
                    trust_arch: str | None = None) -> tuple[nn.Module, ModelInfo]:
    """Rebuild the model described by the JSON beside `weights` and load the weights (strictly).

    The JSON is data, never code: its `arch` may name a built-in architecture or a timm registry model only. A
    "package.module:factory" architecture is built only when the caller names that same factory in `trust_arch`
    (the user's --arch, or the run's own config), so a model file someone sends cannot choose code to run."""
    weights = Path(weights)
    info = read_info(weights)
    actual = sha256_file(weights)
    if info.sha256 and info.sha256 != actual:
        raise RMCError(f"{weights} does not match its metadata (hash differs); the pair was mixed up or edited")
    info.sha256 = actual
    check_trusted(info, weights, trust_arch)
    model = build_model(info.arch, info.num_classes, info.input_shape[0], info.mean, info.std, info.denoise)
    state = load_tensors(weights, "model weights")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise RMCError(f"weights {weights} do not fit architecture {info.arch!r}: {first}") from None
    return model.to(device).eval(), info
