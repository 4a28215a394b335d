"""VGG19 with batch norm for 32x32 inputs (CIFAR variant: a single Linear(512, classes) head)."""

from __future__ import annotations

from torch import Tensor, nn

from .common import init_weights

# "M" = 2x2 max-pool. Five pools take 32x32 down to 1x1, so the head sees 512 features.
VGG19_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
    512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)


def _make_layers(cfg: tuple[int | str, ...], in_channels: int) -> tuple[list[nn.Module], int]:
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(v, int)
            # Conv bias kept (as in the common CIFAR VGG) so the count matches 20.04M.
            layers += [nn.Conv2d(in_channels, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            in_channels = v
    return layers, in_channels


class VGG(nn.Module):
    """VGG-BN; the CAM layer is the last ReLU of the 256-channel block (before pool 3)."""

    cam_layer: str = "last ReLU of the 256-channel block (before the third max-pool), 256 x 8 x 8"

    def __init__(self, cfg: tuple[int | str, ...] = VGG19_CFG, num_classes: int = 10) -> None:
        super().__init__()
        # Split after the second pool's 256-channel block: everything up to (and including)
        # its last ReLU is `features_cam`, the rest (pool 3 onwards) is `features_rest`.
        pools = [i for i, v in enumerate(cfg) if v == "M"]
        if len(pools) < 3:
            raise ValueError("VGG cfg needs at least three max-pools to place the CAM layer")
        split = pools[2]
        head, ch = _make_layers(cfg[:split], 3)
        tail, ch = _make_layers(cfg[split:], ch)
        self.features_cam = nn.Sequential(*head)
        self.features_rest = nn.Sequential(*tail)
        self.classifier = nn.Linear(ch, num_classes)
        # The CAM layer passes through more convs before the head: no closed form.
        self.cam_linear: nn.Linear | None = None
        init_weights(self)

    def forward_cam(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return (logits [B, classes], CAM-layer activations [B, 256, H/4, W/4])."""
        cam = self.features_cam(x)
        out = self.features_rest(cam)
        # Global average pool (a no-op reshape at 1x1) keeps other input sizes working.
        logits = self.classifier(out.mean((2, 3)))
        return logits, cam

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_cam(x)[0]


def vgg19_bn(num_classes: int = 10) -> VGG:
    return VGG(VGG19_CFG, num_classes)
