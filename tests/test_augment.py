"""Device-tensor augmentation: crop/flip by index arithmetic, map shifting, variant indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from matekd.augment import (
    CIFAR_MEAN,
    CIFAR_STD,
    crop_flip,
    normalize,
    num_variants,
    sample_crop_flip,
    shift_maps,
    to_device_tensor,
    variant_index,
)
from matekd.errors import DataError

torch.set_num_threads(1)


def _shift_reference(x: torch.Tensor, dy: int, dx: int, pad: int, flip: bool) -> torch.Tensor:
    """Hand-built single-sample crop: out[i, j] = x[i + dy - pad, j + dx - pad], zero outside."""
    c, h, w = x.shape
    out = torch.zeros_like(x)
    sy, sx = dy - pad, dx - pad
    for i in range(h):
        for j in range(w):
            si, sj = i + sy, j + sx
            if 0 <= si < h and 0 <= sj < w:
                out[:, i, j] = x[:, si, sj]
    return torch.flip(out, dims=[2]) if flip else out


def test_to_device_tensor_layout():
    imgs = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    t = to_device_tensor(imgs, "cpu")
    assert t.dtype == torch.uint8 and t.shape == (2, 3, 4, 5)
    assert t[1, 2, 3, 4] == imgs[1, 3, 4, 2]
    assert t.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(DataError):
        to_device_tensor(imgs.astype(np.float32), "cpu")


def test_normalize_matches_formula():
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = normalize(x)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (x.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=torch.channels_last)
    assert normalize(x, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_crop_flip_identity():
    x = torch.randint(0, 256, (3, 3, 6, 6), dtype=torch.uint8)
    offsets = torch.full((3, 2), 4, dtype=torch.long)
    flips = torch.zeros(3, dtype=torch.bool)
    assert torch.equal(crop_flip(x, offsets, flips, pad=4), x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_flip_matches_hand_built_shift(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 2, 5, 6, generator=g) * 200 + 1).to(dtype)  # no zeros: entering zeros show
    pad = 2
    offsets = torch.tensor([[0, 0], [4, 1], [2, 3], [1, 4]])
    flips = torch.tensor([False, True, False, True])
    out = crop_flip(x, offsets, flips, pad)
    assert out.dtype == dtype and out.shape == x.shape
    for b in range(4):
        ref = _shift_reference(x[b], int(offsets[b, 0]), int(offsets[b, 1]), pad, bool(flips[b]))
        assert torch.equal(out[b], ref)
    # Offset (0, 0) moves the image down-right by pad: top rows and left columns are zeros.
    assert (out[0, :, :pad, :] == 0).all() and (out[0, :, :, :pad] == 0).all()
    assert torch.equal(out[0, :, pad:, pad:], x[0, :, :-pad, :-pad])


def test_crop_flip_flip_only_is_torch_flip():
    x = torch.randn(3, 3, 7, 7)
    offsets = torch.full((3, 2), 4, dtype=torch.long)
    flips = torch.tensor([True, False, True])
    out = crop_flip(x, offsets, flips, pad=4)
    assert torch.equal(out[0], torch.flip(x[0], dims=[2]))
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], torch.flip(x[2], dims=[2]))


def test_crop_flip_keeps_channels_last():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    offsets = torch.tensor([[1, 2], [3, 0]])
    flips = torch.tensor([True, False])
    out = crop_flip(x, offsets, flips, pad=2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, crop_flip(x.contiguous(), offsets, flips, pad=2))


def test_shift_maps_full_resolution_is_crop_flip():
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(5, 32, 32, generator=g)
    offsets, flips = sample_crop_flip(5, 4, g, "cpu")
    out = shift_maps(maps, offsets, flips, pad=4, image_size=32)
    assert torch.equal(out, crop_flip(maps[:, None], offsets, flips, pad=4)[:, 0])


def test_shift_maps_whole_cell_shift_at_8x8():
    """Offsets that are multiples of 4 (= 32/8) move the 8x8 map by whole cells."""
    maps = torch.rand(9, 8, 8, generator=torch.Generator().manual_seed(6)) + 0.5
    grid = torch.tensor([[dy, dx] for dy in (0, 4, 8) for dx in (0, 4, 8)])
    for flip in (False, True):
        flips = torch.full((9,), flip)
        out = shift_maps(maps, grid, flips, pad=4, image_size=32)
        for b in range(9):
            # The image shift of (dy - 4) pixels is (dy - 4) / 4 cells: pad 1 cell, offset dy / 4.
            ref = _shift_reference(maps[b][None], int(grid[b, 0]) // 4, int(grid[b, 1]) // 4, 1, flip)[0]
            torch.testing.assert_close(out[b], ref, rtol=0, atol=1e-6)


def test_shift_maps_partial_cell_shift_averages():
    """On a 16x16 grid (2 pixels per cell) a 1-pixel shift splits a cell between two cells."""
    maps = torch.zeros(1, 16, 16)
    maps[0, 5, 7] = 1.0
    # dx = pad - 1: out[j] = in[j - 1], the content moves right by one pixel.
    out = shift_maps(maps, torch.tensor([[4, 3]]), torch.tensor([False]), pad=4)
    # Cell (5, 7) covers pixels x in {14, 15}; moved right by one pixel it covers {15, 16}:
    # cell 7 (pixels 14, 15) keeps half, cell 8 (pixels 16, 17) gets half.
    assert out[0, 5, 7] == pytest.approx(0.5) and out[0, 5, 8] == pytest.approx(0.5)
    assert out.sum() == pytest.approx(1.0)


def test_sample_crop_flip_deterministic_and_in_range():
    a = sample_crop_flip(256, 4, torch.Generator().manual_seed(11), "cpu")
    b = sample_crop_flip(256, 4, torch.Generator().manual_seed(11), "cpu")
    c = sample_crop_flip(256, 4, torch.Generator().manual_seed(12), "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    offsets, flips = a
    assert offsets.dtype == torch.long and offsets.shape == (256, 2)
    assert flips.dtype == torch.bool and flips.shape == (256,)
    assert offsets.min() == 0 and offsets.max() == 8  # all 9 values appear in 512 draws
    assert flips.any() and (~flips).any()
    _, no_flip = sample_crop_flip(64, 4, torch.Generator().manual_seed(1), "cpu", flip=False)
    assert not no_flip.any()


@pytest.mark.parametrize("pad", [0, 1, 4])
def test_variant_index_is_bijection(pad):
    side = 2 * pad + 1
    dy, dx, f = torch.meshgrid(torch.arange(side), torch.arange(side), torch.arange(2), indexing="ij")
    offsets = torch.stack([dy.flatten(), dx.flatten()], 1)
    idx = variant_index(offsets, f.flatten().bool(), pad)
    assert idx.dtype == torch.long
    assert sorted(idx.tolist()) == list(range(num_variants(pad)))
    assert num_variants(pad) == side * side * 2
