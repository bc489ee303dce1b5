"""A small CNN for 28 x 28 grey images (MNIST, Fashion-MNIST); also works at other sizes (global pooling)."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from rmc.models.layers import Normalize


def _block(cin: int, cout: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    # RMC's neighbour search reads the input of the last stage (block2's output, globally average-pooled, 64-d),
    # the analogue of the original's `conv5_block1_preact_bn` (the input of ResNet-152 v2's last stage). The last
    # block's own output follows the static model's (possibly fooled) prediction too closely; `block3` stays
    # available by name.
    default_feature_layer = "block2"
    denoise_stages = ("block1", "block2", "block3")   # where feature-denoising blocks go (rmc.models.denoising)

    def __init__(self, num_classes: int = 10, in_channels: int = 1,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.5,), width: int = 32):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.block1 = _block(in_channels, width, pool=True)       # 28 -> 14
        self.block2 = _block(width, 2 * width, pool=True)         # 14 -> 7
        self.block3 = _block(2 * width, 4 * width, pool=False)    # 7 x 7 x 128
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.block3(self.block2(self.block1(self.normalize(x))))
        return self.fc(self.flatten(self.pool(x)))
