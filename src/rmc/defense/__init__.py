"""The defense: the RMC algorithm (core), neighbour search, the fine-tuning fast path, batched and nn.Module forms."""

from rmc.defense.config import Mode, RMCConfig, Scope
from rmc.defense.core import RMC, StepResult, Trial
from rmc.defense.dprime import DPrime
from rmc.defense.forwards import build_rmc

__all__ = ["DPrime", "Mode", "RMC", "RMCConfig", "Scope", "StepResult", "Trial", "build_rmc"]
