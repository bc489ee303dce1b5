"""Pre-activation ResNet-152 v2 (He et al., "Identity Mappings in Deep Residual Networks", 2016) as Keras builds
`ResNet152V2`: the network the original RMC defended on ImageNet, so that Keras' weights (rmc.models.keras_h5)
give the same function here.

Where Keras' layout differs from torchvision's ResNets, this follows Keras:
- the stem is a 7 x 7 stride-2 convolution *with* a bias and no batch norm or ReLU after it (pre-activation);
- the max-pool after it pads with zeros (Keras' ZeroPadding2D then a valid pool), not with -inf: the stem's output
  can be negative, so the border values differ from a padded nn.MaxPool2d;
- every block starts with its own batch norm + ReLU (`preact_bn`, `preact_relu`); the first block of a stage
  projects the *pre-activated* input with a 1 x 1 convolution with a bias (Keras `_0_conv`, here `shortcut`), the
  others pass the raw input through (subsampled by a 1 x 1 max-pool of the same stride when the block strides);
- a stage's *last* block strides (in its 3 x 3 convolution), and the last stage does not stride at all;
- the third convolution of a block has a bias and no batch norm after it (the next block's `preact_bn` follows);
- one batch norm + ReLU after the last stage (`post_bn`), then global average pooling and the classifier;
- batch norm epsilon 1.001e-5.
Module names (Keras layer -> key prefix): conv1_conv -> conv1, conv{s}_block{b}_preact_bn ->
layer{s-1}.{b-1}.preact_bn, _0_conv -> .shortcut, _1_conv / _1_bn -> .conv1 / .bn1, _2_conv / _2_bn -> .conv2 / .bn2,
_3_conv -> .conv3, post_bn -> post_bn, predictions -> fc.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rmc.models.layers import Normalize

KERAS_BN_EPS = 1.001e-5                 # Keras applications' BatchNormalization(epsilon=...)
# Keras' preprocess_input for ResNetV2 ('tf' mode: x / 127.5 - 1 on 0..255 RGB) is (x - 0.5) / 0.5 on [0, 1].
KERAS_TF_MEAN = (0.5, 0.5, 0.5)
KERAS_TF_STD = (0.5, 0.5, 0.5)
EXPANSION = 4
STAGE_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (2, 2, 2, 1)            # applied by each stage's last block (Keras stack_residual_blocks_v2)
DEPTHS = {152: (3, 8, 36, 3)}           # Keras ResNet152V2's blocks per stage


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=KERAS_BN_EPS)


class PreActBottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int, project: bool):
        super().__init__()
        cout = width * EXPANSION
        self.stride = stride
        self.preact_bn = _bn(cin)
        self.preact_relu = nn.ReLU()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=True) if project else None
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = _bn(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=True)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.preact_relu(self.preact_bn(x))
        if self.shortcut is not None:
            shortcut = self.shortcut(preact)
        else:
            shortcut = x[:, :, ::self.stride, ::self.stride] if self.stride > 1 else x   # Keras MaxPooling2D(1, s)
        out = self.relu(self.bn1(self.conv1(preact)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.conv3(out) + shortcut


class PreActResNetV2(nn.Module):
    """Takes images in [0, 1]; normalisation happens inside (not in the state dict). Default preprocessing: Keras'
    for ResNetV2, so that Keras' ImageNet weights see what they were trained on."""

    # The original's feature layer: the input of the last stage's first block after that block's pre-activation
    # batch norm (Keras conv5_block1_preact_bn), globally average-pooled: 1024-d (7 x 7 at 224 px, conv4's last
    # block having strided). The batch norm is its own module so that a feature hook can read its output.
    default_feature_layer = "layer4.0.preact_bn"

    def __init__(self, blocks: Sequence[int] = DEPTHS[152], num_classes: int = 1000, in_channels: int = 3,
                 mean: Sequence[float] = KERAS_TF_MEAN, std: Sequence[float] = KERAS_TF_STD):
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 2:
            raise ValueError(f"four stages of at least 2 blocks each (Keras' first and last blocks differ), got "
                             f"{blocks}")
        self.normalize = Normalize(mean, std, persistent=False)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=True)
        self.maxpool = nn.Sequential(nn.ZeroPad2d(1), nn.MaxPool2d(3, 2))
        cin, stages = 64, []
        for width, n, stride in zip(STAGE_WIDTHS, blocks, STAGE_STRIDES, strict=True):
            layers = [PreActBottleneck(cin, width, 1, project=True)]
            cin = width * EXPANSION
            layers += [PreActBottleneck(cin, width, 1, project=False) for _ in range(n - 2)]
            layers.append(PreActBottleneck(cin, width, stride, project=False))
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.post_bn = _bn(cin)
        self.post_relu = nn.ReLU()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        # Keras' initialisation: Glorot-uniform kernels, zero biases, batch norm as the identity.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(self.normalize(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(self.post_relu(self.post_bn(x)))))


class ResNet152V2(PreActResNetV2):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3,
                 mean: Sequence[float] = KERAS_TF_MEAN, std: Sequence[float] = KERAS_TF_STD):
        super().__init__(DEPTHS[152], num_classes, in_channels, mean, std)
