"""Models: built-in architectures, user factories, checkpoints and feature extraction."""

from rmc.models.checkpoint import ModelInfo, load_checkpoint, save_checkpoint
from rmc.models.features import FeatureHook, default_layer, extract_features, list_layers
from rmc.models.registry import BUILTIN, build_model

__all__ = ["BUILTIN", "FeatureHook", "ModelInfo", "build_model", "default_layer", "extract_features",
           "list_layers", "load_checkpoint", "save_checkpoint"]
