"""Model checkpoints: weights as safetensors plus a JSON of metadata beside them (never pickle)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rmc.errors import RMCError
from rmc.io import load_tensors, read_json, save_tensors, sha256_file, write_json
from rmc.models.denoising import DenoiseOp
from rmc.models.registry import BUILTIN, build_model
from rmc.models.timm_arch import is_timm
from rmc.schema import Bool, Int, Json, ListOf, MapOf, Num, Obj, Opt, Str, check


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


MAX_CLASSES = 10 ** 6      # classes of a model at most
MAX_SIDE = 1 << 16         # an image dimension (channels, height, width) at most
# Every field of the sidecar; a key this rmc does not know is refused (the sidecar decides how a model is built).
SIDECAR = Obj({"arch": Str(max_len=300, empty=False), "num_classes": Int(1, MAX_CLASSES),
               "input_shape": ListOf(Int(1, MAX_SIDE), 3, 3)},
              {"mean": Opt(ListOf(Num(-1e6, 1e6), 1, MAX_SIDE)), "std": Opt(ListOf(Num(1e-12, 1e6), 1, MAX_SIDE)),
               "dataset": Str(max_len=200), "adversarial": Bool(),
               "denoise": Opt(Str(tuple(o.value for o in DenoiseOp))), "test_accuracy": Opt(Num(0, 1)),
               "seed": Opt(Int(0, 2 ** 64)), "config": Json(), "imported": MapOf(Str(), Json()),
               "sha256": Str(max_len=64)}, extra=False)
FIX = "re-create it with `rmc train`"


def check_metadata(info: ModelInfo, where: Path) -> None:
    """Types and ranges of the sidecar's fields (it is a file anyone may have edited)."""
    check({**asdict(info), "input_shape": list(info.input_shape)}, SIDECAR, where, FIX)
    for name in ("mean", "std"):
        stats = getattr(info, name)
        if stats is not None and len(stats) != info.input_shape[0]:
            raise RMCError(f"{where}: field {name!r} has {len(stats)} values but the model takes "
                           f"{info.input_shape[0]} channels; {FIX}")


def read_metadata(weights: str | Path) -> dict[str, Any]:
    """The sidecar of `weights`, every field checked."""
    where = meta_path(weights)
    return check(read_json(where, "model metadata"), SIDECAR, where, FIX)


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
    meta = read_metadata(weights)
    info = ModelInfo(**{**meta, "input_shape": tuple(meta["input_shape"])})
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
