"""Which parameters RMC adapts (`rmc.scope`), and the inference mode the rest of the network stays in."""

from __future__ import annotations

from torch import nn

from rmc.defense.config import Scope
from rmc.errors import RMCError


def configure_model(model: nn.Module, scope: Scope | str = Scope.ALL, feature_layer: str | None = None) -> nn.Module:
    """Inference mode throughout (batch-norm running statistics frozen, dropout off); only `scope` trains."""
    model.eval()
    model.requires_grad_(False)
    for p in collect_params(model, scope, feature_layer):
        p.requires_grad_(True)
    return model


def collect_params(model: nn.Module, scope: Scope | str = Scope.ALL,
                   feature_layer: str | None = None) -> list[nn.Parameter]:
    scope = Scope(scope)
    if scope is Scope.ALL:
        return list(model.parameters())
    if scope is Scope.BN:
        params = [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
        if not params:
            raise RMCError("scope 'bn' but the model has no batch-norm layers; use scope 'all'")
        return params
    if feature_layer is None:
        raise RMCError("scope 'head' needs the feature layer name")
    names = [n for n, _ in model.named_modules()]
    if feature_layer not in names:
        raise RMCError(f"model has no layer {feature_layer!r}")
    after = names[names.index(feature_layer) + 1:]
    inside = [n for n in after if n.startswith(feature_layer + ".")]
    head = {n for n in after if n not in inside}
    params = [p for n, m in model.named_modules() if n in head for p in m.parameters(recurse=False)]
    if not params:
        raise RMCError(f"no parameters after layer {feature_layer!r}; choose scope 'all' or an earlier layer")
    return params
