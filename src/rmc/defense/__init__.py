"""The defense: the RMC algorithm (core), neighbour search, the fine-tuning fast path, batched and nn.Module forms."""


def build_rmc(model, dprime, index, config, feature_layer=None):
    """An `RMC` over `model` with the fine-tuning forward its config asks for (fast path, cached head inputs)."""
    from rmc.defense.core import RMC
    return RMC(model, dprime, index, config, feature_layer)
