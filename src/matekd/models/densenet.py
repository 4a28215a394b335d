"""DenseNet121, CIFAR variant: growth 32, blocks 6-12-24-16, bottleneck 4*growth,
compression 0.5, 3x3 stem conv of 2*growth channels with no stem pooling (about 6.96M).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import init_weights


class Bottleneck(nn.Module):
    """BN-ReLU-1x1 conv (4*growth) -> BN-ReLU-3x3 conv (growth), concatenated to the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        # In-place ReLU acts on the BN outputs only, never on x (which is concatenated).
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-1x1 conv (compression) then 2x2 average pooling."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.conv(self.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """DenseNet-BC; the CAM layer is the output of dense block 3 (before transition 3).

    That output is a concatenation of conv outputs and is *not* post-ReLU, so it can be
    negative; Grad-CAM's final ReLU makes the map non-negative anyway.
    """

    cam_layer: str = "output of dense block 3 (before transition 3), 1024 x 8 x 8"

    def __init__(self, blocks: tuple[int, int, int, int] = (6, 12, 24, 16), growth: int = 32,
                 reduction: float = 0.5, num_classes: int = 10) -> None:
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(blocks):
            stages.append(nn.Sequential(*[Bottleneck(planes + j * growth, growth) for j in range(n)]))
            planes += n * growth
            if i < len(blocks) - 1:
                out_planes = int(math.floor(planes * reduction))
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.dense1, self.trans1, self.dense2, self.trans2, self.dense3, self.trans3, self.dense4 = stages
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.linear = nn.Linear(planes, num_classes)
        # Transition 3 and block 4 follow the CAM layer: no closed form.
        self.cam_linear: nn.Linear | None = None
        init_weights(self)

    def forward_cam(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (logits [B, classes], dense-block-3 output [B, 1024, H/4, W/4])."""
        out = self.conv1(x)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        cam = self.dense3(out)
        out = self.dense4(self.trans3(cam))
        out = self.relu(self.bn(out))
        logits = self.linear(out.mean((2, 3)))   # global pooling; see resnet.py
        return logits, cam

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_cam(x)[0]


def densenet121(num_classes: int = 10) -> DenseNet:
    return DenseNet((6, 12, 24, 16), growth=32, num_classes=num_classes)
