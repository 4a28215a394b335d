"""Initialisation shared by the model zoo."""

from __future__ import annotations

from torch import nn


def init_weights(model: nn.Module, conv_mode: str = "fan_out", kaiming_linear: bool = False) -> None:
    """He-normal convolutions (and linear layers if asked), BatchNorm at identity, zero biases."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) or (kaiming_linear and isinstance(m, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode=conv_mode, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
