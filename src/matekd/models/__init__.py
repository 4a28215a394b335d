"""The CIFAR model zoo with a uniform CAM interface.

Every model returned by `build_model` has:
- `forward(x) -> logits [B, classes]`;
- `forward_cam(x) -> (logits, activations [B, Ch, h, w])`, the CAM layer of method.md,
  computed in the same forward pass (no hooks; `forward` shares the code path);
- `cam_linear: nn.Linear | None`, the linear head iff the CAM layer feeds only global
  average pooling + that head (closed-form CAM applies), else None;
- `cam_layer: str`, the CAM layer in words.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..errors import ParamsError
from ..params import MODEL_NAMES
from .densenet import DenseNet, densenet121
from .resnet import CifarResNet, resnet20, resnet56, resnet110
from .vgg import VGG, vgg19_bn

_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "vgg19_bn": vgg19_bn,
    "densenet121": densenet121,
}
assert tuple(_BUILDERS) == tuple(MODEL_NAMES), "models registry out of sync with params.MODEL_NAMES"

__all__ = [
    "MODEL_NAMES", "build_model", "count_parameters", "model_size_mb",
    "CifarResNet", "VGG", "DenseNet",
]


def build_model(name: str, num_classes: int = 10) -> nn.Module:
    """Build a freshly initialised CIFAR model by name (one of MODEL_NAMES)."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise ParamsError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
    if num_classes < 1:
        raise ParamsError(f"num_classes must be >= 1, got {num_classes}")
    return builder(num_classes)


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """Size in MB (1e6 bytes) at fp32: 4 bytes per element of every parameter and every
    floating-point buffer (BN running mean/var); integer buffers (BN num_batches_tracked)
    are left out, so the figure does not depend on the current dtype of the model."""
    elements = sum(p.numel() for p in model.parameters())
    elements += sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return elements * 4 / 1e6
