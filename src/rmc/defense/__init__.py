"""The defense: the RMC algorithm (core), neighbour search, the fine-tuning fast path, batched and nn.Module forms."""

from torch import nn

from rmc.defense.config import Mode, Optimizer, RMCConfig, Scope
from rmc.defense.core import RMC, StepResult, Trial
from rmc.defense.dprime import DPrime
from rmc.defense.forwards import forward_factory


def build_rmc(model: nn.Module, dprime: DPrime, index, config: RMCConfig, feature_layer: str | None = None) -> RMC:
    """An `RMC` over `model` that fine-tunes through the fastest equivalent forward `config` allows (same results)."""
    return RMC(model, dprime, index, config, feature_layer, forward_factory(dprime, index, config, feature_layer))


__all__ = ["DPrime", "Mode", "Optimizer", "RMC", "RMCConfig", "Scope", "StepResult", "Trial", "build_rmc"]
