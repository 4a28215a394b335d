"""CIFAR-10-C corruptions (matekd.corruptions), the official-layout library (matekd.cifar10c)
and the corrupt stage (matekd.stages.corrupt).

Exact references are written here independently: PIL for pixelate/jpeg, colorsys for HSV,
the official per-pixel glass-blur loop, scipy.ndimage.zoom / map_coordinates, a Dijkstra
chamfer distance, per-pixel loops for motion blur, Canny and equalizeHist, and a motion blur
computed by hand whose 8-bit values were checked against ImageMagick itself.
"""

from __future__ import annotations

import colorsys
import io
import itertools
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage
from scipy.sparse import lil_matrix
from scipy.sparse.csgraph import dijkstra

from matekd import cifar10c
from matekd import corruptions as C
from matekd.errors import DataError, MatekdError, ParamsError
from matekd.stages import corrupt as stage

torch.set_num_threads(1)

RANDOM = {"gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur",
          "snow", "frost", "fog", "spatter", "elastic_transform"}


def natural_images(n: int = 8) -> np.ndarray:
    """Smooth colour gradients with a disc and a bar, different per image (no RNG)."""
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float64)
    out = []
    for k in range(n):
        a = 2 * math.pi * k / n
        base = 0.5 + 0.35 * np.sin(a + (xx * np.cos(a) + yy * np.sin(a)) / 9.0)
        img = np.stack([base, 0.4 + 0.4 * (xx / 31) * ((k % 3) / 2), 1 - base * 0.8], axis=-1)
        disc = (xx - 10 - k) ** 2 + (yy - 16) ** 2 < (4 + k % 4) ** 2
        img[disc] = [0.9, 0.2 + 0.1 * k, 0.1]
        bar = (np.abs(xx - 24 + k % 5) < 2) & (yy > 6) & (yy < 26)
        img[bar] = [0.05, 0.05, 0.3 + 0.05 * k]
        out.append(img)
    return (np.clip(np.stack(out), 0, 1) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return natural_images()


def write_textures(folder: Path, value: int | None = None) -> Path:
    """Five fake frost textures (PNG, PNG with alpha, JPEG) of different sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(5)
    sizes = [(300, 200), (250, 180), (240, 170), (260, 190), (230, 175)]
    for name, (w, h) in zip(C.FROST_FILES, sizes):
        if value is None:
            arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        else:
            arr = np.full((h, w, 3), value, dtype=np.uint8)
        img = Image.fromarray(arr)
        if name == "frost1.png":
            img = img.convert("RGBA")
        img.save(folder / name, quality=100) if name.endswith(".jpg") else img.save(folder / name)
    return folder


@pytest.fixture(scope="module")
def frost_dir(tmp_path_factory) -> Path:
    return write_textures(tmp_path_factory.mktemp("frost"))


# ----------------------------------------------------------------------------- names and table

def test_names_follow_the_documented_order():
    doc_order = ["gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "defocus_blur", "glass_blur",
                 "motion_blur", "zoom_blur", "gaussian_blur", "snow", "frost", "fog", "spatter", "brightness",
                 "contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate"]
    assert list(C.CORRUPTIONS) == doc_order
    assert len(C.STANDARD_15) == 15 and len(C.EXTRA_4) == 4
    assert set(C.STANDARD_15) | set(C.EXTRA_4) == set(doc_order)
    assert set(C.EXTRA_4) == {"speckle_noise", "gaussian_blur", "spatter", "saturate"}


def test_severity_table_matches_cifar10c_md():
    # typed from docs/cifar10c.md, independently of the module
    doc = {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "speckle_noise": [0.06, 0.10, 0.12, 0.16, 0.20],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1.0],
        "snow": [(0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
                 (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)],
        "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "spatter": [(0.62, 0.1, 0.7, 0.7, 0.5, "water"), (0.65, 0.1, 0.8, 0.7, 0.5, "water"),
                    (0.65, 0.3, 1, 0.69, 0.5, "water"), (0.65, 0.1, 0.7, 0.69, 0.6, "mud"),
                    (0.65, 0.1, 0.5, 0.68, 0.6, "mud")],
        "brightness": [0.05, 0.10, 0.15, 0.20, 0.30],
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "elastic_transform": [(0, 0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92), (3.2, 1.28, 1.6), (3.2, 0.96, 0.96)],
        "pixelate": [30, 28, 27, 24, 20],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
    }
    for name, expected in doc.items():
        got = C.SEVERITY_PARAMS[name]
        assert len(got) == 5, name
        for g, e in zip(got, expected):
            g, e = (g if isinstance(g, tuple) else (g,)), (e if isinstance(e, tuple) else (e,))
            assert len(g) == len(e), (name, g, e)
            assert all(a == b if isinstance(b, str) else math.isclose(a, b) for a, b in zip(g, e)), (name, g, e)
    # zoom_blur: arange(1, stop, .01) with 7, 12, 16, 21, 26 factors (doc), step 0.01
    zooms = C.SEVERITY_PARAMS["zoom_blur"]
    assert [len(z) for z in zooms] == [7, 12, 16, 21, 26]
    for z in zooms:
        assert z[0] == 1.0 and np.allclose(np.diff(z), 0.01)
    # pixelate sizes are int(32 * fraction) of the official fractions
    assert [int(32 * f) for f in (0.95, 0.9, 0.85, 0.75, 0.65)] == doc["pixelate"]


# ----------------------------------------------------------------------------- generic behaviour

@pytest.mark.parametrize("name", C.CORRUPTIONS)
def test_every_corruption_is_deterministic_uint8_and_changes_images(name, images, frost_dir):
    for severity in (1, 3, 5):
        a = C.corrupt(images, name, severity, seed=3, frost_dir=frost_dir)
        np.random.seed(123)  # the global numpy RNG must not matter
        b = C.corrupt(images, name, severity, seed=3, frost_dir=frost_dir)
        assert a.dtype == np.uint8 and a.shape == images.shape
        assert np.array_equal(a, b), (name, severity)
        assert not np.array_equal(a, images), (name, severity)
        if name in RANDOM:
            other = C.corrupt(images, name, severity, seed=4, frost_dir=frost_dir)
            assert not np.array_equal(a, other), (name, severity)


def test_corrupt_rejects_bad_input(images):
    with pytest.raises(MatekdError, match="unknown corruption"):
        C.corrupt(images, "rain", 1, 0)
    with pytest.raises(MatekdError, match="severity"):
        C.corrupt(images, "contrast", 6, 0)
    with pytest.raises(MatekdError, match="uint8"):
        C.corrupt(images.astype(np.float32), "contrast", 1, 0)
    with pytest.raises(MatekdError, match="uint8"):
        C.corrupt(images[:, :16], "contrast", 1, 0)


def test_chunks_have_their_own_streams(images, monkeypatch):
    # the first chunk's result does not depend on how many images follow it
    monkeypatch.setattr(C, "CHUNK", 4)
    full = C.corrupt(images, "gaussian_noise", 2, seed=1)
    head = C.corrupt(images[:4], "gaussian_noise", 2, seed=1)
    assert np.array_equal(full[:4], head)
    assert not np.array_equal(full[4:], C.corrupt(images[4:], "gaussian_noise", 2, seed=1))


def test_noise_distance_grows_with_severity(images):
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise"):
        dist = [np.abs(C.corrupt(images, name, s, seed=0).astype(float) - images).mean() for s in C.SEVERITIES]
        assert all(b > a for a, b in itertools.pairwise(dist)), (name, dist)


# ----------------------------------------------------------------------------- exact definitions

def test_pixelate_is_pil_box_down_up(images):
    for severity, frac in zip(C.SEVERITIES, (0.95, 0.9, 0.85, 0.75, 0.65)):
        size = int(32 * frac)
        expected = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BOX)
                                        .resize((32, 32), Image.Resampling.BOX)) for im in images])
        assert np.array_equal(C.corrupt(images, "pixelate", severity, 0), expected)


def test_jpeg_is_a_pil_round_trip(images):
    for severity, quality in zip(C.SEVERITIES, (80, 65, 58, 50, 40)):
        expected = []
        for im in images:
            buf = io.BytesIO()
            Image.fromarray(im).save(buf, format="JPEG", quality=quality)
            expected.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")))
        assert np.array_equal(C.corrupt(images, "jpeg_compression", severity, 0), np.stack(expected))


def test_contrast_formula(images):
    for severity, c in zip(C.SEVERITIES, (0.75, 0.5, 0.4, 0.3, 0.15)):
        x = images.astype(np.float64) / 255
        expected = np.empty_like(images)
        for i in range(len(x)):
            for ch in range(3):
                m = x[i, :, :, ch].mean()
                expected[i, :, :, ch] = np.floor(np.clip((x[i, :, :, ch] - m) * c + m, 0, 1) * 255)
        assert np.array_equal(C.corrupt(images, "contrast", severity, 0), expected)


def _hsv_reference(img: np.ndarray, fn) -> np.ndarray:
    out = np.empty(img.shape, dtype=np.float64)
    for r in range(img.shape[0]):
        for c in range(img.shape[1]):
            h, s, v = colorsys.rgb_to_hsv(*(img[r, c] / 255.0))
            h, s, v = fn(h, s, v)
            out[r, c] = colorsys.hsv_to_rgb(h, s, v)
    return np.floor(np.clip(out, 0, 1) * 255)


def test_brightness_and_saturate_match_colorsys(images):
    sub = images[:2]
    for severity in (1, 5):
        c = (0.05, 0.10, 0.15, 0.20, 0.30)[severity - 1]
        got = C.corrupt(sub, "brightness", severity, 0).astype(int)
        ref = np.stack([_hsv_reference(im, lambda h, s, v, c=c: (h, s, min(v + c, 1.0))) for im in sub])
        assert np.abs(got - ref).max() <= 1 and (got == ref).mean() > 0.99  # float ties at integer steps
        scale, offset = ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2))[severity - 1]
        got = C.corrupt(sub, "saturate", severity, 0).astype(int)
        ref = np.stack([_hsv_reference(im, lambda h, s, v, a=scale, b=offset: (h, min(max(s * a + b, 0.0), 1.0), v))
                        for im in sub])
        assert np.abs(got - ref).max() <= 1 and (got == ref).mean() > 0.99


def test_hsv_round_trip_and_grey_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.random((500, 3))
    rgb[:5] = [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 1, 0], [0, 1, 1]]  # ties and greys
    hsv = C.rgb_to_hsv(rgb)
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb])
    assert np.allclose(hsv, ref, atol=1e-12)
    assert np.allclose(C.hsv_to_rgb(hsv), rgb, atol=1e-12)


def _official_clipped_zoom(img: np.ndarray, z: float) -> np.ndarray:
    h = img.shape[0]
    ch = int(np.ceil(h / z))
    top = (h - ch) // 2
    img = ndimage.zoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
    trim = (img.shape[0] - h) // 2
    return img[trim:trim + h, trim:trim + h]


def test_clipped_zoom_matches_scipy_zoom(images):
    x = images[:3] / 255.0
    zooms = sorted({z for zs in C.SEVERITY_PARAMS["zoom_blur"] for z in zs} | {1.75, 2.25, 1.25})
    for z in zooms:
        ref = np.stack([_official_clipped_zoom(im, z) for im in x])
        assert np.allclose(C.clipped_zoom(x, z), ref, atol=1e-12), z


def test_zoom_blur_matches_the_official_loop(images):
    sub = images[:3]
    for severity in (1, 5):
        x = (sub / 255.0).astype(np.float32)
        out = np.zeros_like(x)
        for z in np.arange(1, (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1], 0.01):
            out += np.stack([_official_clipped_zoom(im, z) for im in x])
        ref = (np.clip((x + out) / (len(np.arange(1, (1.06, 1.11, 1.16, 1.21, 1.26)[severity - 1], 0.01)) + 1),
                       0, 1) * 255).astype(np.uint8)
        got = C.corrupt(sub, "zoom_blur", severity, 0)
        assert np.array_equal(got, ref), severity  # float32 accumulation in the official order


def _official_glass_loop(img: np.ndarray, severity: int, deltas: np.ndarray) -> np.ndarray:
    sigma, delta, iterations = C.SEVERITY_PARAMS["glass_blur"][severity - 1]
    x = np.uint8(ndimage.gaussian_filter(img / 255.0, (sigma, sigma, 0), mode="nearest", truncate=4.0) * 255)
    for i in range(iterations):
        for h in range(32 - delta, delta, -1):
            for w in range(32 - delta, delta, -1):
                dx, dy = deltas[i, 31 - h, 31 - w]
                hp, wp = h + dy, w + dx
                x[h, w], x[hp, wp] = x[hp, wp], x[h, w]  # the official "swap" (really a copy)
    blurred = ndimage.gaussian_filter(x / 255.0, (sigma, sigma, 0), mode="nearest", truncate=4.0)
    return np.uint8(np.clip(blurred, 0, 1) * 255)


def test_glass_blur_vectorised_equals_sequential_loop(images):
    sub = images[:2]
    for severity in C.SEVERITIES:
        deltas = C.glass_blur_deltas(np.random.default_rng(severity), 2, severity)
        assert set(np.unique(deltas)) <= {-1, 0}
        got = C.glass_blur(sub, severity, deltas=deltas)
        ref = np.stack([_official_glass_loop(im, severity, d) for im, d in zip(sub, deltas)])
        assert np.array_equal(got, ref), severity


def _per_pixel_motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's one-sided motion blur, pixel by pixel, on (N, H, W, C) floats."""
    width = 2 * math.ceil(radius) + 1
    w = np.exp(-np.arange(width) ** 2 / (2 * sigma ** 2))
    w /= w.sum()
    h, wd = x.shape[1:3]
    ref = np.zeros(x.shape)
    for n, a in enumerate(np.deg2rad(angles)):
        for i in range(width):
            dr, dc = math.ceil(i * math.sin(a) - 0.5), math.ceil(i * math.cos(a) - 0.5)
            for r in range(h):
                for c in range(wd):
                    ref[n, r, c] += w[i] * x[n, min(max(r + dr, 0), h - 1), min(max(c + dc, 0), wd - 1)]
    return ref


def _imagemagick_8bit(x: np.ndarray) -> np.ndarray:
    """ImageMagick Q16: round to the nearest 16-bit level (257 per 8-bit step), export truncating."""
    return np.floor(np.floor(np.clip(x, 0, 255) * 257 + 0.5) / 257)


def test_motion_blur_kernel_matches_per_pixel_reference(images):
    x = images[:2].astype(np.float64)
    angles = np.array([0.0, 30.0])
    got = C.motion_blur_batch(x, 6, 1.5, angles)
    assert np.allclose(got, _per_pixel_motion_blur(x, 6, 1.5, angles), atol=1e-9)


def test_imagemagick_quantisation_rounds_to_16_bit_then_truncates():
    # 16-bit level floor(257 x + 0.5), 8-bit export floor(level / 257): floor(x) except within
    # 0.5/257 below an integer (13 * 257 = 3341, reached from 12 + 256.5/257 = 12.998054...)
    x = np.array([-3.0, 0.0, 12.0, 12.4, 12.5, 12.7, 12.99, 12.998, 12.9981, 12.999, 254.9, 255.0, 300.0])
    assert C.imagemagick_to_uint8(x).tolist() == [0, 0, 12, 12, 12, 12, 12, 12, 13, 13, 254, 255, 255]
    assert C.imagemagick_to_uint8(x).dtype == np.uint8


def test_motion_blur_by_hand_at_zero_degrees():
    # radius 1 -> width 2*1+1 = 3 taps; sigma 1: weights exp(-i^2 / 2), i = 0, 1, 2, normalised
    e = [1.0, math.exp(-0.5), math.exp(-2.0)]
    w = [v / sum(e) for v in e]
    assert [round(v, 6) for v in w] == [0.574097, 0.348207, 0.077696]
    # angle 0: tap i reads column c + ceil(i - 0.5) = c + i of the same row; the last column repeats
    row = [12, 14, 12, 9, 0, 24, 34, 34]
    exact = [w[0] * row[c] + w[1] * row[min(c + 1, 7)] + w[2] * row[min(c + 2, 7)] for c in range(8)]
    assert [round(v, 4) for v in exact] == [12.6964, 12.9151, 10.0230, 7.0316, 10.9986, 28.2590, 34.0, 34.0]
    img = np.array([row, row], dtype=np.uint8).reshape(1, 2, 8, 1)
    angle = np.array([0.0])
    assert np.allclose(C.motion_blur_batch(img.astype(np.float64), 1, 1, angle)[0, :, :, 0], [exact, exact],
                       atol=1e-12)
    # ImageMagick 6.9.11-60 Q16 (`convert row.png -motion-blur 1x1+0 out.png`) writes exactly these:
    # 12.70 and 12.92 truncate to 12 (not 13); 10.9986 lies within 0.5/257 of 11, so its 16-bit level is
    # already 11 * 257 and it stays 11 (plain flooring would give 10)
    imagemagick = [12, 12, 10, 7, 11, 28, 34, 34]
    got = C.imagemagick_motion_blur(img, 1, 1, angle)
    assert got.dtype == np.uint8 and got[0, :, :, 0].tolist() == [imagemagick, imagemagick]
    assert np.rint(exact).astype(int).tolist() == [13, 13, 10, 7, 11, 28, 34, 34]  # what rounding gave


def test_motion_blur_corruption_is_the_quantised_reference(images):
    sub = images[:2]
    for severity in (1, 5):
        radius, sigma = C.SEVERITY_PARAMS["motion_blur"][severity - 1]
        got = C.motion_blur(sub, severity, np.random.default_rng(severity))
        angles = np.random.default_rng(severity).uniform(-45, 45, size=len(sub))  # the same draw
        exact = _per_pixel_motion_blur(sub.astype(np.float64), radius, sigma, angles)
        assert np.array_equal(got, _imagemagick_8bit(exact)), severity
        assert (got != np.rint(exact)).mean() > 0.2  # rounding would differ on many values


def test_snow_layer_is_quantised_like_imagemagick():
    # on black images the whitening is a constant, so the output shows the layer's 8-bit values
    black = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    for severity in (1, 4):
        mean, std, zoom, thr, radius, sigma, blend = C.SEVERITY_PARAMS["snow"][severity - 1]
        got = C.snow(black, severity, np.random.default_rng(severity))
        rng = np.random.default_rng(severity)  # replay the draws: the normal field, then the angles
        field = rng.normal(size=(3, 32, 32), loc=mean, scale=std)
        field = np.stack([_official_clipped_zoom(f[..., None], zoom)[..., 0] for f in field])
        field[field < thr] = 0
        layer8 = (np.clip(field, 0, 1) * 255).astype(np.uint8)
        angles = rng.uniform(-135, -45, size=3)
        blurred = _per_pixel_motion_blur(layer8[..., None].astype(np.float64), radius, sigma, angles)
        x = black.astype(np.float32) / 255
        white = blend * x + (1 - blend) * np.maximum(x, x[..., :1] * 1.5 + 0.5)
        truncated, rounded = _imagemagick_8bit(blurred) / 255, np.rint(blurred) / 255
        expected = np.floor(np.clip(white + truncated + truncated[:, ::-1, ::-1], 0, 1) * 255)
        assert np.array_equal(got, expected), severity
        with_rounding = np.floor(np.clip(white + rounded + rounded[:, ::-1, ::-1], 0, 1) * 255)
        assert not np.array_equal(got, with_rounding), severity


def test_map_coordinates_reflect_matches_scipy():
    rng = np.random.default_rng(0)
    x = rng.random((2, 32, 32, 3))
    rows = rng.uniform(-3, 35, size=(2, 32, 32))
    cols = rng.uniform(-3, 35, size=(2, 32, 32))
    got = C.map_coordinates_reflect(x, rows, cols)
    for n in range(2):
        for ch in range(3):
            ref = ndimage.map_coordinates(x[n, :, :, ch], [rows[n].ravel(), cols[n].ravel()], order=1, mode="reflect")
            assert np.allclose(got[n, :, :, ch].ravel(), ref, atol=1e-12)


def test_affine_warp_identity_and_translation():
    rng = np.random.default_rng(1)
    x = rng.random((2, 32, 32, 3)).astype(np.float32)
    ident = np.tile(np.array([[1.0, 0, 0], [0, 1.0, 0]]), (2, 1, 1))
    assert np.allclose(C.affine_warp_cv2(x, ident), x, atol=1e-6)
    # M moves source (x, y) to (x + 2, y - 1): dst(c, r) = src(c - 2, r + 1), reflect-101 borders
    shift = np.tile(np.array([[1.0, 0, 2], [0, 1.0, -1]]), (2, 1, 1))
    cols = np.abs(np.arange(32) - 2)
    rows = np.arange(32) + 1
    rows = np.where(rows > 31, 62 - rows, rows)
    expected = x[:, rows][:, :, cols]
    assert np.allclose(C.affine_warp_cv2(x, shift), expected, atol=1e-6)


def test_defocus_kernel_is_a_normalised_disk():
    for radius, alias in C.SEVERITY_PARAMS["defocus_blur"]:
        k = C.disk_kernel(radius, alias)
        assert k.shape[0] % 2 == 1 and np.isclose(k.sum(), 1.0, atol=1e-6)
        assert np.allclose(k, k.T) and np.allclose(k, k[::-1, ::-1])


def test_plasma_fractal_is_scaled_per_map():
    maps = C.plasma_fractal(np.random.default_rng(0), 3, 2.0)
    assert maps.shape == (3, 32, 32)
    assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
    assert not np.allclose(maps[0], maps[1])


def test_snow_whitens_and_spatter_adds_water_or_mud(images):
    for severity in C.SEVERITIES:
        snowy = C.corrupt(images, "snow", severity, 0).astype(int)
        assert (snowy.mean(axis=(1, 2, 3)) >= images.mean(axis=(1, 2, 3))).all()
    for severity in (1, 2, 3):  # water only adds turquoise (float32 truncation may lose 1)
        wet = C.corrupt(images, "spatter", severity, 0).astype(int)
        assert (wet >= images.astype(int) - 1).all() and (wet > images).any()
    brown = np.array([63, 42, 20])
    for severity in (4, 5):  # mud replaces pixels by a blend with weight >= 0.8 on brown
        muddy = C.corrupt(images, "spatter", severity, 0).astype(int)
        changed = (muddy != images).any(axis=-1)
        assert changed.any()
        assert (np.abs(muddy[changed] - brown) <= 0.2 * 255 + 1).all()


# ----------------------------------------------------------------------------- spatter helpers

def test_canny_step_edge_is_one_pixel_wide():
    img = np.zeros((1, 32, 32), dtype=np.uint8)
    img[:, :, 16:] = 200
    edges = C.canny(img, 50, 150)
    # Sobel magnitude 800 at columns 15 and 16; OpenCV keeps m > left and m >= right: column 15
    assert edges[0, :, 15].all() and edges.sum() == 32
    assert not C.canny(np.full((1, 32, 32), 90, dtype=np.uint8), 50, 150).any()


def test_canny_hysteresis_keeps_weak_pixels_only_when_connected():
    img = np.zeros((1, 32, 32), dtype=np.uint8)
    img[:, 4:12, 16:] = 200   # strong step (magnitude 800)
    img[:, 12:20, 16:] = 8    # weak step (magnitude 32 < 50): not an edge at all
    img[:, 22:30, 8:] = 20    # isolated step of magnitude 80: above low, below high -> dropped
    edges = C.canny(img, 50, 150)
    assert edges[0, 5:11, 15].all()
    assert not edges[0, 23:29].any()


def _chamfer_reference(sources: np.ndarray, cap: float) -> np.ndarray:
    h, w = sources.shape
    weights = {1: 1.0, 2: 1.4, 5: 2.1969}
    graph = lil_matrix((h * w, h * w))
    for r in range(h):
        for c in range(w):
            for dr in range(-2, 3):
                for dc in range(-2, 3):
                    d2 = dr * dr + dc * dc
                    if d2 in weights and 0 <= r + dr < h and 0 <= c + dc < w:
                        graph[r * w + c, (r + dr) * w + c + dc] = weights[d2]
    src = np.nonzero(sources.ravel())[0]
    if len(src) == 0:
        return np.full((h, w), cap)
    dist = dijkstra(graph.tocsr(), indices=src, min_only=True)
    return np.minimum(dist.reshape(h, w), cap)


def test_chamfer_distance_matches_shortest_paths():
    rng = np.random.default_rng(0)
    sources = np.zeros((2, 32, 32), dtype=bool)
    sources[0, rng.integers(0, 32, 6), rng.integers(0, 32, 6)] = True
    sources[1, 3, 3] = True
    got = C.distance_transform_chamfer5(sources, 20.0)
    for n in range(2):
        assert np.allclose(got[n], _chamfer_reference(sources[n], 20.0), atol=1e-4)
    assert np.all(C.distance_transform_chamfer5(np.zeros((1, 32, 32), bool), 20.0) == 20)


def test_equalize_hist_matches_opencv_algorithm():
    rng = np.random.default_rng(0)
    imgs = np.stack([rng.integers(3, 40, (32, 32)), rng.integers(0, 256, (32, 32)),
                     np.full((32, 32), 7)]).astype(np.uint8)
    got = C.equalize_hist(imgs)
    for img, out in zip(imgs, got):
        hist = np.bincount(img.ravel(), minlength=256)
        first = int(np.nonzero(hist)[0][0])
        if hist[first] == img.size:
            assert (out == first).all()
            continue
        scale = np.float32(255.0) / np.float32(img.size - hist[first])
        lut = np.zeros(256)
        total = 0
        for v in range(first + 1, 256):
            total += hist[v]
            lut[v] = min(max(np.rint(np.float32(total) * scale), 0), 255)
        assert np.array_equal(out, lut[img].astype(np.uint8))


# ----------------------------------------------------------------------------- frost

def test_frost_needs_textures(images, tmp_path):
    with pytest.raises(C.FrostUnavailable):
        C.corrupt(images, "frost", 1, 0, frost_dir=None)
    with pytest.raises(C.FrostUnavailable, match="does not exist"):
        C.corrupt(images, "frost", 1, 0, frost_dir=tmp_path / "nope")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "frost1.png").write_bytes(b"")
    with pytest.raises(C.FrostUnavailable, match="lacks"):
        C.corrupt(images, "frost", 1, 0, frost_dir=tmp_path / "partial")
    assert issubclass(C.FrostUnavailable, MatekdError)


def test_frost_blends_image_and_texture(images, tmp_path):
    folder = write_textures(tmp_path / "flat", value=100)
    for severity, (a, b) in zip(C.SEVERITIES, ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))):
        expected = np.floor(np.clip(a * images.astype(np.float64) + b * 100, 0, 255)).astype(np.uint8)
        assert np.array_equal(C.corrupt(images, "frost", severity, 0, frost_dir=folder), expected)


def test_frost_texture_shrink_is_cv2_subsampling():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (50, 65, 3), dtype=np.uint8)
    # cv2 INTER_LINEAR at fx = 0.2 samples source pixel 5*i + 2 exactly
    assert np.array_equal(C._resize_bilinear_cv2(img, 0.2), img[2::5, 2::5])


@pytest.mark.skipif(not Path(os.environ.get("MATEKD_FROST", "../shared/data/frost")).is_dir(),
                    reason="official frost textures not available")
def test_official_textures_load():
    folder = Path(os.environ.get("MATEKD_FROST", "../shared/data/frost"))
    textures = C.load_frost_textures(folder)
    assert len(textures) == 5 and all(t.dtype == np.uint8 and t.shape[2] == 3 and min(t.shape[:2]) > 32
                                      for t in textures)


# ----------------------------------------------------------------------------- stage

def make_params(**corrupt):
    from matekd.params import validate_params

    recipe = {"epochs": 1, "batch_size": 4, "lr": 0.1}
    return validate_params({"teachers": {"resnet20": recipe}, "distill": {"kd_teacher": "resnet20", "recipe": recipe},
                            "corrupt": corrupt})


def fake_prepared(n_per_class: int = 2, kind: str = "cifar10-python", n_source: int = 40) -> SimpleNamespace:
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(10), n_per_class).astype(np.int64)
    order = rng.permutation(len(labels))
    test_index = np.sort(rng.choice(n_source, size=len(labels), replace=False))
    imgs = np.concatenate([natural_images(8)] * (len(labels) // 8 + 1))[:len(labels)]
    return SimpleNamespace(test_images=imgs[order], test_labels=labels[order], test_index=test_index,
                           manifest={"source": {"kind": kind}}, manifest_hash="f" * 64)


def test_stage_regenerates_in_official_layout(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MATEKD_FROST", raising=False)
    prepared = fake_prepared()
    params = make_params(seed=5, corruptions=["contrast", "gaussian_noise", "frost"])
    out = tmp_path / "cifar10c"
    with pytest.warns(UserWarning, match="frost"):
        manifest = stage.run_corrupt(params, out_dir=out, prepared=prepared, progress=False)
    assert "frost" in capsys.readouterr().err
    n = len(prepared.test_labels)
    assert sorted(p.name for p in out.iterdir()) == ["contrast.npy", "gaussian_noise.npy", "labels.npy",
                                                     "manifest.json"]
    assert manifest["kind"] == "regenerated" and manifest["images"] == n
    assert manifest["corruptions"] == ["gaussian_noise", "contrast"] and "frost" in manifest["skipped"]
    assert manifest["standard_15_complete"] is False
    assert set(manifest["versions"]) >= {"numpy", "scipy", "pillow", "torch"}
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    arrays, labels, loaded = cifar10c.load_corrupted(out)
    assert np.array_equal(labels, np.tile(prepared.test_labels, 5).astype(np.uint8)) and labels.dtype == np.uint8
    for name in ("gaussian_noise", "contrast"):
        assert arrays[name].shape == (5 * n, 32, 32, 3)
        for s in C.SEVERITIES:
            block = arrays[name][(s - 1) * n:s * n]
            assert np.array_equal(block, C.corrupt(prepared.test_images, name, s, 5))
    assert loaded["test_index"] == prepared.test_index.tolist()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_stage_records_frost_textures_and_subsets(tmp_path, monkeypatch, frost_dir):
    monkeypatch.setenv("MATEKD_FROST", str(frost_dir))
    prepared = fake_prepared(n_per_class=3)
    params = make_params(seed=1, images_per_class=1, corruptions=["frost"])
    manifest = stage.run_corrupt(params, out_dir=tmp_path / "c", prepared=prepared, progress=False)
    assert manifest["corruptions"] == ["frost"] and manifest["skipped"] == {}
    assert set(manifest["frost"]["sha256"]) == set(C.FROST_FILES)
    assert manifest["images"] == 10
    _, labels, _ = cifar10c.load_corrupted(tmp_path / "c")
    assert sorted(labels[:10].tolist()) == list(range(10))  # one image per class
    # the subset keeps the prepared order and the same seed picks the same images
    again = stage.run_corrupt(params, out_dir=tmp_path / "d", prepared=prepared, progress=False)
    assert again["test_index"] == manifest["test_index"]
    assert manifest["test_index"] == sorted(manifest["test_index"])
    # the same run twice writes the same bytes: its times go to a DVC metric beside, not into cifar10c/
    for name in ("manifest.json", "frost.npy", "labels.npy"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "d" / name).read_bytes(), name
    assert not set(stage.TIMING_KEYS) & set(json.loads((tmp_path / "c" / "manifest.json").read_text()))
    timings = json.loads((tmp_path / "metrics" / "corrupt.json").read_text())
    assert {"seconds", "cpu_seconds"} <= set(timings) and all(isinstance(v, float) for v in timings.values())


def test_stage_leaves_nothing_on_failure(tmp_path, monkeypatch):
    prepared = fake_prepared()
    out = tmp_path / "cifar10c"
    out.mkdir()
    (out / "old.txt").write_text("previous run")
    calls = []

    def failing(images, name, severity, seed, frost_dir=None):
        calls.append(name)
        if name == "contrast":
            raise RuntimeError("boom")
        return images

    monkeypatch.setattr(cifar10c, "corrupt", failing)
    with pytest.raises(RuntimeError, match="boom"):
        stage.run_corrupt(make_params(corruptions=["gaussian_noise", "contrast"]), out_dir=out,
                          prepared=prepared, progress=False)
    assert "gaussian_noise" in calls
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10c"]   # no temp folder, no timings
    assert [p.name for p in out.iterdir()] == ["old.txt"]


def test_stage_replaces_a_previous_output_completely(tmp_path):
    out = tmp_path / "cifar10c"
    stage.run_corrupt(make_params(corruptions=["contrast", "fog"]), out_dir=out, prepared=fake_prepared(),
                      progress=False)
    manifest = stage.run_corrupt(make_params(corruptions=["fog"], seed=2), out_dir=out,
                                 prepared=fake_prepared(), progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["fog.npy", "labels.npy", "manifest.json"]
    assert manifest["seed"] == 2 and cifar10c.load_corrupted(out)[2]["corruptions"] == ["fog"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar10c", "metrics"]   # no temp folder left


def test_stage_rejects_unknown_corruptions(tmp_path):
    with pytest.raises(ParamsError, match="rain"):
        stage.run_corrupt(make_params(corruptions=["rain"]), out_dir=tmp_path / "c", prepared=fake_prepared(),
                          progress=False)
    assert not (tmp_path / "c").exists()


def write_official(folder: Path, n_source: int, base_labels: np.ndarray) -> None:
    """A tiny official-layout folder: pixel values encode (corruption, severity, test index)."""
    folder.mkdir()
    np.save(folder / "labels.npy", np.tile(base_labels.astype(np.uint8), 5))
    for k, name in enumerate(C.CORRUPTIONS):
        arr = np.zeros((5 * n_source, 32, 32, 3), dtype=np.uint8)
        for s in range(5):
            arr[s * n_source:(s + 1) * n_source, 0, 0, 0] = k
            arr[s * n_source:(s + 1) * n_source, 0, 0, 1] = s
            arr[s * n_source:(s + 1) * n_source, 0, 0, 2] = np.arange(n_source)
        np.save(folder / f"{name}.npy", arr)


def test_stage_reads_official_layout(tmp_path):
    prepared = fake_prepared(n_source=40)
    base = np.zeros(40, dtype=np.uint8)
    base[prepared.test_index] = prepared.test_labels
    src = tmp_path / "CIFAR-10-C"
    write_official(src, 40, base)
    manifest = stage.run_corrupt(make_params(source=str(src)), out_dir=tmp_path / "out", prepared=prepared,
                                 progress=False)
    assert manifest["kind"] == "official" and manifest["corruptions"] == list(C.CORRUPTIONS)
    arrays, labels, _ = cifar10c.load_corrupted(tmp_path / "out")
    n = len(prepared.test_index)
    assert np.array_equal(labels, np.tile(prepared.test_labels, 5))
    for k, name in enumerate(C.CORRUPTIONS):
        arr = arrays[name]
        assert arr.shape == (5 * n, 32, 32, 3)
        assert (arr[:, 0, 0, 0] == k).all()
        assert np.array_equal(arr[:, 0, 0, 1], np.repeat(np.arange(5), n))
        assert np.array_equal(arr[:, 0, 0, 2], np.tile(prepared.test_index, 5))


def test_official_reader_validates(tmp_path):
    prepared = fake_prepared(n_source=40)
    base = np.zeros(40, dtype=np.uint8)
    base[prepared.test_index] = prepared.test_labels
    src = tmp_path / "CIFAR-10-C"
    write_official(src, 40, base)
    # a mirror-prepared test set cannot be matched to the canonical order
    with pytest.raises(MatekdError, match="canonical"):
        stage.run_corrupt(make_params(source=str(src)), out_dir=tmp_path / "o1",
                          prepared=fake_prepared(kind="image-folder"), progress=False)
    # labels that disagree mean a different order
    wrong = SimpleNamespace(**{**vars(prepared), "test_labels": (prepared.test_labels + 1) % 10})
    with pytest.raises(DataError, match="disagree"):
        stage.run_corrupt(make_params(source=str(src)), out_dir=tmp_path / "o2", prepared=wrong, progress=False)
    # indices beyond the files' N
    far = SimpleNamespace(**{**vars(prepared), "test_index": prepared.test_index + 100})
    with pytest.raises(DataError, match="refers to index"):
        stage.run_corrupt(make_params(source=str(src)), out_dir=tmp_path / "o3", prepared=far, progress=False)
    # a file with the wrong shape
    np.save(src / "fog.npy", np.zeros((10, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="fog.npy"):
        stage.run_corrupt(make_params(source=str(src)), out_dir=tmp_path / "o4", prepared=prepared, progress=False)
    # a missing file
    (src / "fog.npy").unlink()
    with pytest.raises(DataError, match="lacks fog.npy"):
        stage.run_corrupt(make_params(source=str(src)), out_dir=tmp_path / "o5", prepared=prepared, progress=False)
    # a pickle is refused
    np.save(src / "fog.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="fog.npy"):
        stage.run_corrupt(make_params(source=str(src)), out_dir=tmp_path / "o6", prepared=prepared, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CIFAR-10-C"]


def test_load_corrupted_reports_missing_and_bad_files(tmp_path):
    with pytest.raises(DataError, match="run the corrupt stage"):
        cifar10c.load_corrupted(tmp_path / "none")
    stage.run_corrupt(make_params(corruptions=["contrast"]), out_dir=tmp_path / "c", prepared=fake_prepared(),
                      progress=False)
    np.save(tmp_path / "c" / "contrast.npy", np.zeros((3, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="contrast.npy"):
        cifar10c.load_corrupted(tmp_path / "c")


def test_stage_refuses_a_subset_larger_than_the_prepared_test_set(tmp_path):
    from matekd.errors import ParamsError

    with pytest.raises(ParamsError, match=r"corrupt.images_per_class = 3 .* 2 images per class"):
        stage.run_corrupt(make_params(images_per_class=3, corruptions=["contrast"]), out_dir=tmp_path / "c",
                          prepared=fake_prepared(n_per_class=2), progress=False)
    assert not (tmp_path / "c").exists()
