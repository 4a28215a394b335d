"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet20/56/110 with option-A shortcuts.

Layout: 3x3 conv (16) -> three stages of n BasicBlocks (16/32/64 channels, strides 1/2/2)
-> global average pooling -> linear. Depth = 6n + 2. The option-A shortcut is parameter
free (stride-2 subsample, zero-padded channels), which gives 0.27M/0.86M/1.73M parameters.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .common import init_weights


class _ShortcutA(nn.Module):
    """Parameter-free shortcut: subsample spatially, zero-pad the new channels equally."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        extra = planes - in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        # F.pad's tuple runs from the last dim backwards: (W, W, H, H, C, C).
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or option-A) shortcut, ReLU after the sum."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            self.shortcut = _ShortcutA(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs; the CAM layer is the stage-3 output (64 x 8 x 8)."""

    cam_layer: str = "stage 3 output (after the last block's ReLU), 64 x 8 x 8"

    def __init__(self, depth: int, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.linear = nn.Linear(64, num_classes)
        # The stage-3 output feeds only GAP + this linear head: closed-form CAM applies.
        init_weights(self, conv_mode="fan_in", kaiming_linear=True)

    @staticmethod
    def _stage(in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_planes, planes, stride)]
        layers += [BasicBlock(planes, planes, 1) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    @property
    def cam_linear(self) -> nn.Linear:
        """The head that the CAM layer feeds through global-average-pooling (closed-form CAM).
        A property, not a submodule attribute, so the state dict holds the head only once."""
        return self.linear

    def forward_cam(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (logits [B, classes], CAM-layer activations [B, 64, 8, 8])."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        cam = self.layer3(out)
        # Global pooling as a mean, not adaptive_avg_pool2d: the same numbers, and its CUDA
        # backward has a deterministic kernel (train.deterministic would fail otherwise).
        logits = self.linear(cam.mean((2, 3)))
        return logits, cam

    def forward(self, x: Tensor) -> Tensor:
        # Same code path as forward_cam: returning the activations costs nothing extra.
        return self.forward_cam(x)[0]


def resnet20(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(20, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(56, num_classes)


def resnet110(num_classes: int = 10) -> CifarResNet:
    return CifarResNet(110, num_classes)
