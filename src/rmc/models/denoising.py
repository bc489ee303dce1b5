"""Feature-denoising blocks (Xie et al., "Feature Denoising for Improving Adversarial Robustness", CVPR 2019).

A block denoises a feature map, passes the result through a 1x1 convolution and adds it to its input:
    out = x + BN(conv1x1(denoise(x)))
The batch-norm's scale starts at zero, so a fresh block is the identity and training decides how much denoising
to mix in (the paper's blocks are also initialised to the identity). `add_denoising` puts one block after each
feature stage of a network (the paper: after each residual stage of a ResNet); the whole network is then
adversarially trained.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn


class DenoiseOp(str, enum.Enum):
    NONLOCAL = "nonlocal"   # non-local means, softmax (Gaussian) weights: the paper's best
    MEAN = "mean"           # 3x3 mean filter, one of the paper's cheaper local alternatives
    MEDIAN = "median"       # 3x3 median filter, the other


FILTER_SIZE = 3   # neighbourhood of the local filters (the paper compares 3x3)


def nonlocal_means(x: torch.Tensor) -> torch.Tensor:
    """y_i = sum_j softmax_j(x_i . x_j / sqrt(C)) x_j over all positions j of the map (the Gaussian version, with
    the features themselves as embedding)."""
    n, c, h, w = x.shape
    flat = x.flatten(2)                                              # N x C x HW
    weights = torch.softmax(flat.transpose(1, 2) @ flat / c ** 0.5, dim=-1)   # N x HW x HW, rows sum to 1
    return (flat @ weights.transpose(1, 2)).view(n, c, h, w)


def mean_filter(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, FILTER_SIZE, stride=1, padding=FILTER_SIZE // 2, count_include_pad=False)


def median_filter(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    pad = FILTER_SIZE // 2
    patches = F.unfold(F.pad(x, (pad,) * 4, mode="replicate"), FILTER_SIZE)   # N x C*k*k x HW
    return patches.view(n, c, FILTER_SIZE * FILTER_SIZE, h * w).median(dim=2).values.view(n, c, h, w)


OPS = {DenoiseOp.NONLOCAL: nonlocal_means, DenoiseOp.MEAN: mean_filter, DenoiseOp.MEDIAN: median_filter}


class DenoiseBlock(nn.Module):
    def __init__(self, channels: int, op: DenoiseOp | str):
        super().__init__()
        self.op = DenoiseOp(op)
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        nn.init.zeros_(self.bn.weight)   # the block starts as the identity

    def forward(self, x):
        return x + self.bn(self.conv(OPS[self.op](x)))

    def extra_repr(self) -> str:
        return f"op={self.op.value}"


def _channels(stage: nn.Module) -> int:
    """Output channels of a feature stage: those of its last batch-norm (conv stages end in one)."""
    norms = [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        raise ValueError(f"cannot tell the output channels of {type(stage).__name__}: it has no BatchNorm2d")
    return norms[-1].num_features


def add_denoising(model: nn.Module, op: DenoiseOp | str, stages: tuple[str, ...]) -> nn.Module:
    """Put a denoising block after each named stage, in place: the stage becomes Sequential(stage, block), so a
    feature layer named after the stage gives the denoised map."""
    for name in stages:
        stage = getattr(model, name)
        setattr(model, name, nn.Sequential(stage, DenoiseBlock(_channels(stage), op)))
    return model
