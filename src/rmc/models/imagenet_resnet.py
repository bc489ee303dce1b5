"""ImageNet ResNet-50 / 101 / 152 (He et al. 2016, bottleneck blocks), laid out so that a torchvision state dict
loads as it is: the same module names (conv1, bn1, layer1.0.conv1 ..., layer1.0.downsample.0 / .1, fc), the same
shapes, and the same "v1.5" stride placement (a stage's first block strides in its 3 x 3 convolution, not in the
first 1 x 1). Written from the paper and torchvision's published layout; torchvision is not a dependency.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from rmc.models.layers import Normalize

IMAGENET_MEAN = (0.485, 0.456, 0.406)   # the statistics torchvision's ImageNet weights were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
EXPANSION = 4                           # a bottleneck block's output has 4 x its inner width
STAGE_WIDTHS = (64, 128, 256, 512)      # inner width of each stage's blocks
DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}   # blocks per stage


class Bottleneck(nn.Module):
    """1 x 1 reduce, 3 x 3 (strided), 1 x 1 expand, each followed by batch norm; ReLU after the residual sum."""

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * EXPANSION
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ImageNetResNet(nn.Module):
    """7 x 7 stride-2 stem, 3 x 3 stride-2 max-pool, four bottleneck stages (strides 1, 2, 2, 2), global average
    pooling, one linear layer. Takes images in [0, 1]; normalisation happens inside (not in the state dict)."""

    # The original's feature layer is the input of the last stage's first block, globally average-pooled: here
    # layer3's output (1024-d, 14 x 14 at 224 px), the same place as Keras' conv5_block1 input in the v2 network.
    default_feature_layer = "layer3"
    denoise_stages = ("layer1", "layer2", "layer3", "layer4")   # after each residual stage, as Xie et al.

    def __init__(self, depth: int, num_classes: int = 1000, in_channels: int = 3,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.normalize = Normalize(mean, std, persistent=False)
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin, stages = 64, []
        for i, (width, blocks) in enumerate(zip(STAGE_WIDTHS, DEPTHS[depth], strict=True)):
            stride = 1 if i == 0 else 2
            layers = [Bottleneck(cin, width, stride)]
            cin = width * EXPANSION
            layers += [Bottleneck(cin, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)
        # torchvision's initialisation: He-normal convolutions (fan-out), batch norm as the identity; the linear
        # layer keeps PyTorch's default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.normalize(x)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.avgpool(x)))


class ResNet50(ImageNetResNet):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__(50, num_classes, in_channels, mean, std)


class ResNet101(ImageNetResNet):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__(101, num_classes, in_channels, mean, std)


class ResNet152(ImageNetResNet):
    def __init__(self, num_classes: int = 1000, in_channels: int = 3,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__(152, num_classes, in_channels, mean, std)
