"""Data and augmentation as device tensors (never PIL): random crop with zero padding and
horizontal flip, applied by index arithmetic so a whole batch costs one gather.

Offsets are (dy, dx) in [0, 2*pad]: the top-left corner of the HxW window inside the
zero-padded (H+2*pad)x(W+2*pad) image, so (pad, pad) is the identity crop. The flip is
applied after the crop. `shift_maps` gives a map on a coarser grid the same crop/flip, and
`variant_index` numbers the (2*pad+1)^2 * 2 distinct augmentations.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DataError

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def to_device_tensor(images_nhwc_uint8: np.ndarray | Tensor, device: torch.device | str,
                     memory_format: torch.memory_format = torch.channels_last) -> Tensor:
    """uint8 NHWC images -> uint8 NCHW tensor on `device`.

    The bytes travel in their NHWC order; by default the result keeps that layout
    (NCHW shape, channels_last strides), which is what channels_last models read.
    """
    x = torch.as_tensor(images_nhwc_uint8)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise DataError(f"expected uint8 images of shape [N, H, W, C], got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous().to(device, non_blocking=True).permute(0, 3, 1, 2)
    return x.contiguous(memory_format=memory_format)


def normalize(x_uint8_nchw: Tensor, dtype: torch.dtype | None = None,
              mean: tuple[float, ...] = CIFAR_MEAN, std: tuple[float, ...] = CIFAR_STD) -> Tensor:
    """(x / 255 - mean) / std per channel, as `dtype` (default: torch's default dtype, float32
    unless a float64 check asks for more); keeps the input's memory format."""
    if x_uint8_nchw.ndim != 4 or x_uint8_nchw.shape[1] != len(mean):
        raise DataError(f"expected [B, {len(mean)}, H, W] images, got {tuple(x_uint8_nchw.shape)}")
    shift, scale = _norm_constants(x_uint8_nchw.device, tuple(mean), tuple(std))
    # One multiply-add, x * 1/(255 std) - mean/std, in fp32, then cast.
    return torch.addcmul(shift, x_uint8_nchw.float(), scale).to(dtype or torch.get_default_dtype())


@functools.lru_cache(maxsize=8)
def _norm_constants(device: torch.device, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Tensor, Tensor]:
    """Per-channel shift and scale on `device`, cached so a training step does no host copy."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (-m / s).float().to(device), (1.0 / (255.0 * s)).float().to(device)


def sample_crop_flip(batch: int, pad: int, generator: torch.Generator,
                     device: torch.device | str, flip: bool = True) -> tuple[Tensor, Tensor]:
    """Draw per-sample crop offsets (LongTensor [B, 2], (dy, dx) in [0, 2*pad]) and flips
    (BoolTensor [B]) from `generator` (on its own device; a CPU generator makes CPU and
    GPU runs draw the same numbers), then move them to `device`."""
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    gdev = generator.device
    offsets = torch.randint(0, 2 * pad + 1, (batch, 2), generator=generator, device=gdev)
    if flip:
        flips = torch.randint(0, 2, (batch,), generator=generator, device=gdev).bool()
    else:
        flips = torch.zeros(batch, dtype=torch.bool, device=gdev)
    return offsets.to(device, non_blocking=True), flips.to(device, non_blocking=True)


def _window_indices(offsets: Tensor, flips: Tensor, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Row [B, H] and column [B, W] indices into the padded image for each sample."""
    dev = offsets.device
    ar_h = torch.arange(h, device=dev)
    ar_w = torch.arange(w, device=dev)
    rows = offsets[:, 0:1] + ar_h
    # Flip after the crop: output column j reads crop column (W - 1 - j).
    cols_in = torch.where(flips.to(dev).view(-1, 1), (w - 1) - ar_w, ar_w)
    cols = offsets[:, 1:2] + cols_in
    return rows, cols


def crop_flip(x: Tensor, offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """Zero-pad [B, C, H, W] by `pad`, take the HxW window at (dy, dx) per sample, then flip
    horizontally where `flips`. One gather for the batch; any dtype; keeps channels_last."""
    if x.ndim != 4:
        raise ValueError(f"crop_flip expects [B, C, H, W], got {tuple(x.shape)}")
    b, _, h, w = x.shape
    offsets = offsets.to(x.device)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad > 0 else x
    rows, cols = _window_indices(offsets, flips, h, w)
    bidx = torch.arange(b, device=x.device).view(b, 1, 1)
    # Advanced indices on dims 0, 2, 3 around a slice: the result is [B, H, W, C].
    out = xp[bidx, :, rows.view(b, h, 1), cols.view(b, 1, w)]
    out = out.permute(0, 3, 1, 2)  # NCHW shape with channels_last strides
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out
    return out.contiguous()


def shift_maps(maps: Tensor, offsets: Tensor, flips: Tensor, pad: int, image_size: int = 32) -> Tensor:
    """Apply an image-space crop/flip to maps [B, h, w] living on an h x w grid over the image.

    Upsample (nearest) by f = image_size // h, crop_flip with zero padding, average-pool back
    by f. At h == image_size this is an exact integer shift; offsets that are multiples of f
    shift whole cells.
    """
    if maps.ndim != 3:
        raise ValueError(f"shift_maps expects [B, h, w], got {tuple(maps.shape)}")
    _, h, w = maps.shape
    if image_size % h or image_size % w or image_size // h != image_size // w:
        raise ValueError(f"map grid {h}x{w} must divide image size {image_size} by the same factor")
    f = image_size // h
    x = maps.unsqueeze(1)
    if f > 1:
        x = x.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    x = crop_flip(x, offsets, flips, pad)
    if f > 1:
        x = F.avg_pool2d(x, f)
    return x.squeeze(1)


def num_variants(pad: int) -> int:
    """Number of distinct (dy, dx, flip) augmentations."""
    return (2 * pad + 1) ** 2 * 2


def variant_index(offsets: Tensor, flips: Tensor, pad: int) -> Tensor:
    """(dy * (2*pad+1) + dx) * 2 + flip: a bijection onto range(num_variants(pad))."""
    side = 2 * pad + 1
    return (offsets[:, 0] * side + offsets[:, 1]) * 2 + flips.to(offsets.device).long()


def variant_params(variants: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """The inverse of `variant_index`: (offsets [B,2] as (dy, dx), flips [B])."""
    side = 2 * pad + 1
    cell = variants // 2
    return torch.stack([cell // side, cell % side], 1), (variants % 2).bool()
