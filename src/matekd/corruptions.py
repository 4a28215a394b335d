"""The 19 CIFAR-10-C corruptions (Hendrycks & Dietterich, ICLR 2019), vectorised over a batch.

Pure functions on uint8 NHWC batches of 32x32 RGB images. Each corruption follows the
official CIFAR generator (`make_cifar_c.py`, see docs/cifar10c.md):
float64 on x/255 (float32 where the official code uses float32), clip to [0, 1], times 255,
truncation to uint8; motion blur and frost work on the 0..255 scale, and the two ImageMagick
motion blurs (motion_blur, snow's layer) are quantised as ImageMagick's 8-bit output
(imagemagick_to_uint8).

Randomness comes from a numpy Generator derived from (seed, corruption index, severity,
chunk index), so a corruption's output never depends on which other corruptions ran. The
random draws are made per batch (one array for all images) instead of interleaved per
image as in the official loop: same distributions, different streams. A regenerated set is
therefore never bit-identical to the official release (which was not seeded anyway).

Libraries the official code used and that are not available here (OpenCV, ImageMagick,
scikit-image) are re-implemented in numpy/scipy; each docstring states how exact it is.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import MatekdError

STANDARD_15: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression",
)
EXTRA_4: tuple[str, ...] = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
# The order of docs/cifar10c.md (noise, blur, weather, digital); it also fixes the RNG index.
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur", "gaussian_blur",
    "snow", "frost", "fog", "spatter",
    "brightness", "contrast", "elastic_transform", "pixelate", "jpeg_compression", "saturate",
)
SEVERITIES = (1, 2, 3, 4, 5)
IMAGE_SIZE = 32
CHUNK = 1000  # images per RNG stream and per vectorised step (bounds memory to ~100 MB)

_ZOOM_STOPS = (1.06, 1.11, 1.16, 1.21, 1.26)

# CIFAR parameters per severity 1..5, exactly as in docs/cifar10c.md.
SEVERITY_PARAMS: dict[str, tuple] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "defocus_blur": ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)),
    "glass_blur": ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)),
    "motion_blur": ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)),
    # the official np.arange(1, stop, 0.01): 7, 12, 16, 21, 26 factors
    "zoom_blur": tuple(tuple(float(z) for z in np.arange(1, stop, 0.01)) for stop in _ZOOM_STOPS),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "snow": ((0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
             (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
             (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8)),
    "frost": ((1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)),
    "fog": ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)),
    "spatter": ((0.62, 0.1, 0.7, 0.7, 0.5, "water"), (0.65, 0.1, 0.8, 0.7, 0.5, "water"),
                (0.65, 0.3, 1, 0.69, 0.5, "water"), (0.65, 0.1, 0.7, 0.69, 0.6, "mud"),
                (0.65, 0.1, 0.5, 0.68, 0.6, "mud")),
    "brightness": (0.05, 0.10, 0.15, 0.20, 0.30),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    # (alpha, sigma, affine jitter) in pixels: 32 * the official fractions
    "elastic_transform": ((0, 0, 2.56), (1.6, 6.4, 2.24), (2.56, 1.92, 1.92), (3.2, 1.28, 1.6),
                          (3.2, 0.96, 0.96)),
    "pixelate": (30, 28, 27, 24, 20),  # int(32 * (0.95, 0.9, 0.85, 0.75, 0.65))
    "jpeg_compression": (80, 65, 58, 50, 40),
    "saturate": ((0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)),
}

FROST_FILES = ("frost1.png", "frost2.png", "frost3.png", "frost4.jpg", "frost5.jpg")


class FrostUnavailable(MatekdError):
    """The frost textures (frost1.png .. frost5.jpg) cannot be found."""


# --------------------------------------------------------------------------- entry point

def corruption_rng(seed: int, name: str, severity: int, chunk: int = 0) -> np.random.Generator:
    """The Generator for one (seed, corruption, severity, chunk of CHUNK images)."""
    return np.random.Generator(np.random.PCG64(
        np.random.SeedSequence([int(seed), CORRUPTIONS.index(name), int(severity), int(chunk)])))


def check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
            or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", None)
        raise MatekdError(f"corruptions need uint8 images of shape (N, 32, 32, 3); got {dtype} {shape}")


def corrupt(images: np.ndarray, name: str, severity: int, seed: int,
            frost_dir: str | Path | None = None) -> np.ndarray:
    """Apply corruption `name` at `severity` (1..5) to a uint8 (N, 32, 32, 3) batch.

    Deterministic given (images, name, severity, seed). The batch is processed in chunks of
    CHUNK images, each with its own Generator, so memory stays bounded. `frost_dir` holds
    frost1..frost5 (only used by "frost"; FrostUnavailable when missing).
    """
    if name not in CORRUPTIONS:
        raise MatekdError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise MatekdError(f"severity must be one of 1..5, got {severity!r}")
    check_images(images)
    fn: Callable[..., np.ndarray] = _FUNCTIONS[name]
    extra = {"textures": load_frost_textures(frost_dir)} if name == "frost" else {}
    out = np.empty_like(images)
    for chunk, start in enumerate(range(0, len(images), CHUNK)):
        block = np.ascontiguousarray(images[start:start + CHUNK])
        out[start:start + len(block)] = fn(block, severity, corruption_rng(seed, name, severity, chunk), **extra)
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    """np.uint8 of the official code: truncation (inputs already clipped to 0..255)."""
    return x.astype(np.uint8)


def _finish(x: np.ndarray) -> np.ndarray:
    """clip to [0, 1], * 255, truncate: the last step of most corruptions."""
    return _to_uint8(np.clip(x, 0, 1) * 255)


# --------------------------------------------------------------------------- shared helpers

def gaussian_filter_nearest(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """skimage.filters.gaussian on each image (channels untouched): mode 'nearest', truncate 4."""
    sig = [0.0] * x.ndim
    sig[1] = sig[2] = float(sigma)
    return ndimage.gaussian_filter(x, sigma=sig, mode="nearest", truncate=truncate)


def _pad(x: np.ndarray, r: int, mode: str, **kw) -> np.ndarray:
    """Pad the two spatial axes (1, 2) of a batch by r."""
    width = [(0, 0)] * x.ndim
    width[1] = width[2] = (r, r)
    return np.pad(x, width, mode=mode, **kw)


def gather_pixels(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """x[n, rows[n, i, j], cols[n, i, j]] for x (N, H, W, ...) and in-range int indices
    broadcastable to (N, H', W'); a flat np.take, several times faster than 3-way fancy indexing."""
    n, h, w = x.shape[:3]
    idx = (np.arange(n).reshape(-1, 1, 1) * h + rows) * w + cols
    return np.take(x.reshape(n * h * w, *x.shape[3:]), idx, axis=0)


def correlate_spatial(x: np.ndarray, kernel: np.ndarray, mode: str = "reflect") -> np.ndarray:
    """Correlate each image (axes 1, 2) with an odd square kernel; `mode` is np.pad's.

    np.pad "reflect" is OpenCV's BORDER_REFLECT_101 (cv2.filter2D's default); "edge" is
    BORDER_REPLICATE.
    """
    k = kernel.shape[0]
    r = k // 2
    padded = _pad(x, r, mode)
    h, w = x.shape[1], x.shape[2]
    out = np.zeros(x.shape, dtype=np.result_type(x.dtype, kernel.dtype))
    for i in range(k):
        for j in range(k):
            if kernel[i, j] != 0:
                out += kernel[i, j] * padded[:, i:i + h, j:j + w]
    return out


@functools.lru_cache(maxsize=64)
def zoom_matrix(z: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size) matrix A with clipped_zoom(img, z) = A @ img @ A.T along each axis.

    The official clipped_zoom crops the centred square of side ceil(size/z), enlarges it with
    scipy.ndimage.zoom(order=1) (output side round(side*z), source coordinate
    o * (side-1)/(out-1)) and keeps the central size x size. Linear interpolation is separable,
    so the whole operation is one matrix per axis.
    """
    ch = int(np.ceil(size / z))
    top = (size - ch) // 2
    out_size = round(ch * z)
    trim = (out_size - size) // 2
    step = (ch - 1) / (out_size - 1) if out_size > 1 else 1.0
    src = np.arange(trim, trim + size) * step
    i0 = np.minimum(np.floor(src).astype(np.int64), max(ch - 2, 0))
    frac = src - i0
    a = np.zeros((size, size))
    rows = np.arange(size)
    np.add.at(a, (rows, top + i0), 1 - frac)
    np.add.at(a, (rows, top + np.minimum(i0 + 1, ch - 1)), frac)
    a.setflags(write=False)
    return a


def clipped_zoom(x: np.ndarray, z: float) -> np.ndarray:
    """Batched official clipped_zoom on (N, 32, 32, C) (or (N, 32, 32)) float arrays."""
    a = zoom_matrix(float(z), x.shape[1]).astype(x.dtype if x.dtype.kind == "f" else np.float64)
    return np.einsum("ik,nkl...,jl->nij...", a, x, a, optimize=True)


def motion_blur_batch(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """ImageMagick MotionBlurImage on (N, H, W, C) values, one angle per image.

    Width 2*ceil(radius)+1; weight_i proportional to exp(-i^2 / (2 sigma^2)); tap i reads
    the pixel at (column + ceil(i*cos(a) - 0.5), row + ceil(i*sin(a) - 0.5)) with edge
    replication, using ImageMagick's own offset arithmetic. Returns float, unquantised
    (imagemagick_motion_blur adds ImageMagick's 8-bit quantisation).
    """
    h, w = x.shape[1:3]
    width = int(2 * math.ceil(radius) + 1)
    taps = np.arange(width, dtype=np.float64)
    kernel = np.exp(-(taps * taps) / (2.0 * sigma * sigma)) / (math.sqrt(2 * math.pi) * sigma)
    kernel /= kernel.sum()
    rad = math.pi * np.asarray(angles_deg, dtype=np.float64) / 180.0
    px, py = width * np.sin(rad), width * np.cos(rad)
    hyp = np.hypot(px, py)
    off_x = np.ceil(taps[None, :] * py[:, None] / hyp[:, None] - 0.5).astype(np.int64)  # (N, width)
    off_y = np.ceil(taps[None, :] * px[:, None] / hyp[:, None] - 0.5).astype(np.int64)
    rows0, cols0 = np.arange(h), np.arange(w)
    out = np.zeros(x.shape, dtype=np.float64)
    for t in range(width):
        rows = np.clip(rows0[None, :] + off_y[:, t, None], 0, h - 1)
        cols = np.clip(cols0[None, :] + off_x[:, t, None], 0, w - 1)
        out += kernel[t] * gather_pixels(x, rows[:, :, None], cols[:, None, :])
    return out


def imagemagick_to_uint8(x: np.ndarray) -> np.ndarray:
    """The 8-bit values ImageMagick writes for a filter result `x` on the 0..255 scale.

    The official code runs ImageMagick through Wand and reads its 8-bit PNG back. ImageMagick
    6 Q16 without HDRI (its default build, the one Debian and Ubuntu ship) keeps 16-bit
    quanta (an 8-bit v is 257*v): the filter stores its result with ClampToQuantum, which
    rounds to the nearest quantum, and the 8-bit export truncates (range*quantum/QuantumRange
    without +0.5). So this is floor(x) except within 0.5/257 below an integer, where the
    16-bit rounding already reached it: 12.7 -> 12, 12.99 -> 12, 12.999 -> 13. Checked value
    for value against ImageMagick 6.9.11-60 Q16; rounding x to nearest is off by one on about
    half the values. (HDRI builds keep float quanta and round; see docs/cifar10c.md.)
    """
    quanta = np.floor(np.clip(x, 0, 255) * 257.0 + 0.5)  # ClampToQuantum: (Quantum) (v + 0.5)
    return (quanta // 257).astype(np.uint8)


def imagemagick_motion_blur(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """Wand's motion_blur on 8-bit images (N, H, W, C) as the official code gets it back:
    motion_blur_batch, then ImageMagick's 8-bit quantisation (uint8)."""
    return imagemagick_to_uint8(motion_blur_batch(x.astype(np.float64), radius, sigma, angles_deg))


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """skimage.color.rgb2hsv on float arrays (..., 3) in [0, 1] (same tie-breaking)."""
    rgb = rgb.astype(np.float64, copy=False)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.where(delta == 0, 0.0, delta / np.where(v == 0, 1.0, v))
        safe = np.where(delta == 0, 1.0, delta)
        h = np.where(r == v, (g - b) / safe, 0.0)
        h = np.where(g == v, 2.0 + (b - r) / safe, h)  # later cases win, as in skimage
        h = np.where(b == v, 4.0 + (r - g) / safe, h)
    h = (h / 6.0) % 1.0
    h = np.where(delta == 0, 0.0, h)
    return np.stack([h, s, v], axis=-1)


_HSV_SELECT = np.array([[0, 1, 2], [3, 0, 2], [2, 0, 1], [2, 3, 0], [1, 2, 0], [0, 2, 3]])  # into (v, t, p, q)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """skimage.color.hsv2rgb on float arrays (..., 3)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    hi = np.floor(h * 6)
    f = h * 6 - hi
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = hi.astype(np.int64) % 6
    comps = np.stack([v, t, p, q], axis=-1)
    return np.take_along_axis(comps, _HSV_SELECT[sector], axis=-1)


def plasma_fractal(rng: np.random.Generator, n: int, wibbledecay: float, mapsize: int = IMAGE_SIZE) -> np.ndarray:
    """n diamond-square height maps (n, mapsize, mapsize) on a wrapping grid, scaled to [0, 1].

    The official plasma_fractal, vectorised across maps: noise amplitude wibble^2 per level
    (wibble starts at 100, divided by `wibbledecay` each level).
    """
    m = np.zeros((n, mapsize, mapsize))
    step = mapsize
    wibble = 100.0

    def wibbled(arr: np.ndarray) -> np.ndarray:
        return arr / 4 + wibble * rng.uniform(-wibble, wibble, arr.shape)

    while step >= 2:
        half = step // 2
        corner = m[:, 0:mapsize:step, 0:mapsize:step]
        sq = corner + np.roll(corner, -1, axis=1)
        sq = sq + np.roll(sq, -1, axis=2)
        m[:, half:mapsize:step, half:mapsize:step] = wibbled(sq)
        dr = m[:, half:mapsize:step, half:mapsize:step]
        ul = m[:, 0:mapsize:step, 0:mapsize:step]
        lt = dr + np.roll(dr, 1, axis=1) + ul + np.roll(ul, -1, axis=2)
        m[:, 0:mapsize:step, half:mapsize:step] = wibbled(lt)
        tt = dr + np.roll(dr, 1, axis=2) + ul + np.roll(ul, -1, axis=1)
        m[:, half:mapsize:step, 0:mapsize:step] = wibbled(tt)
        step //= 2
        wibble /= wibbledecay
    m -= m.min(axis=(1, 2), keepdims=True)
    return m / m.max(axis=(1, 2), keepdims=True)


# --------------------------------------------------------------------------- noise

def gaussian_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITY_PARAMS["gaussian_noise"][severity - 1]
    x = images / 255.0
    return _finish(x + rng.normal(size=x.shape, scale=c))


def shot_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITY_PARAMS["shot_noise"][severity - 1]
    x = images / 255.0
    return _finish(rng.poisson(x * c) / c)


def impulse_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """skimage random_noise(mode='s&p', amount=c): each element flipped with probability c,
    to 1 or 0 with probability 1/2 each."""
    c = SEVERITY_PARAMS["impulse_noise"][severity - 1]
    x = images / 255.0
    flipped = rng.random(x.shape) <= c
    salted = rng.random(x.shape) <= 0.5
    x[flipped & salted] = 1.0
    x[flipped & ~salted] = 0.0
    return _finish(x)


def speckle_noise(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITY_PARAMS["speckle_noise"][severity - 1]
    x = images / 255.0
    return _finish(x + x * rng.normal(size=x.shape, scale=c))


# --------------------------------------------------------------------------- blur

@functools.lru_cache(maxsize=8)
def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The official disk(): 17x17 aliased disk, normalised, then cv2.GaussianBlur 3x3
    (sigma alias_blur), float32; trimmed to its non-zero support (the disk never reaches
    the 17x17 border, so the blur's border rule does not matter)."""
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    g = np.exp(-(np.arange(-1, 2) ** 2) / (2.0 * alias_blur ** 2))
    g = (g / g.sum()).astype(np.float32)
    blurred = ndimage.correlate1d(ndimage.correlate1d(disk, g, axis=0, mode="mirror"), g, axis=1, mode="mirror")
    nz = np.nonzero(blurred)
    r = int(max(np.abs(nz[0] - 8).max(), np.abs(nz[1] - 8).max()))
    out = blurred[8 - r:9 + r, 8 - r:9 + r].astype(np.float64)
    out.setflags(write=False)
    return out


def defocus_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """cv2.filter2D of each channel with the disk kernel, BORDER_REFLECT_101."""
    radius, alias = SEVERITY_PARAMS["defocus_blur"][severity - 1]
    return _finish(correlate_spatial(images / 255.0, disk_kernel(radius, alias), mode="reflect"))


def glass_blur_deltas(rng: np.random.Generator, n: int, severity: int) -> np.ndarray:
    """The random offsets of glass_blur: int (n, iterations, P, P, 2) with [..., 0] = dx and
    [..., 1] = dy in {-max_delta, .., max_delta-1}; index [i, j] is the scan position
    h = 31 - i, w = 31 - j (the official loop runs h and w from 31 down to 2)."""
    _, delta, iterations = SEVERITY_PARAMS["glass_blur"][severity - 1]
    positions = IMAGE_SIZE - 2 * delta
    return rng.integers(-delta, delta, size=(n, iterations, positions, positions, 2))


def glass_blur(images: np.ndarray, severity: int, rng: np.random.Generator | None = None,
               deltas: np.ndarray | None = None) -> np.ndarray:
    """Gaussian blur, local pixel "swaps", Gaussian blur again.

    The official loop assigns x[h, w] = x[h+dy, w+dx] with dx, dy in {-1, 0}, scanning h and
    w downwards (its tuple "swap" leaves the neighbour unchanged: a copy). The neighbour lies
    at or before (h, w) in raster order, so it has not been written yet in this iteration:
    the sequential scan equals one simultaneous gather from the iteration's input.
    `deltas` (from glass_blur_deltas) can be injected; otherwise they are drawn from `rng`.
    """
    sigma, delta, iterations = SEVERITY_PARAMS["glass_blur"][severity - 1]
    if delta != 1:  # the gather argument needs offsets in {-1, 0}
        raise MatekdError("glass_blur is vectorised for max_delta = 1 only")
    n = len(images)
    if deltas is None:
        if rng is None:
            raise MatekdError("glass_blur needs rng or deltas")
        deltas = glass_blur_deltas(rng, n, severity)
    x = _to_uint8(gaussian_filter_nearest(images / 255.0, sigma) * 255)
    pos = np.arange(IMAGE_SIZE - delta, delta, -1)  # 31 .. 2, scan order
    for it in range(iterations):
        dx, dy = deltas[:, it, ..., 0], deltas[:, it, ..., 1]
        rows = pos[None, :, None] + dy
        cols = pos[None, None, :] + dx
        x[:, pos[:, None], pos[None, :]] = gather_pixels(x, rows, cols)  # all reads before any write
    return _finish(gaussian_filter_nearest(x / 255.0, sigma))


def motion_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """ImageMagick motion blur (angle uniform in [-45, 45] degrees) on 0..255, quantised as
    ImageMagick's 8-bit output (truncation, see imagemagick_to_uint8)."""
    radius, sigma = SEVERITY_PARAMS["motion_blur"][severity - 1]
    angles = rng.uniform(-45, 45, size=len(images))
    return imagemagick_motion_blur(images, radius, sigma, angles)


def zoom_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Mean of the image and its clipped zooms, as the official code computes it.

    Each zoom is evaluated in float64 (as scipy.ndimage.zoom does internally) with the two
    matrix products of zoom_matrix over all images and channels at once, cast to float32 and
    accumulated in float32 in the official order, so the result matches the official
    per-image scipy loop bit for bit (up to float64 rounding of the interpolation).
    """
    zooms = SEVERITY_PARAMS["zoom_blur"][severity - 1]
    n = len(images)
    x = (images / 255.0).astype(np.float32)
    cols = x.astype(np.float64).transpose(1, 2, 0, 3).reshape(IMAGE_SIZE, -1)  # (row, col*n*3)
    acc = np.zeros((IMAGE_SIZE, IMAGE_SIZE, n * 3), dtype=np.float32)  # (row, col, n*3)
    for z in zooms:
        a = zoom_matrix(z)
        y = (a @ cols).reshape(IMAGE_SIZE, IMAGE_SIZE, -1).transpose(1, 0, 2).reshape(IMAGE_SIZE, -1)
        acc += (a @ y).reshape(IMAGE_SIZE, IMAGE_SIZE, -1).transpose(1, 0, 2).astype(np.float32)
    acc = acc.reshape(IMAGE_SIZE, IMAGE_SIZE, n, 3).transpose(2, 0, 1, 3)
    return _finish((x + acc) / np.float32(len(zooms) + 1))


def gaussian_blur(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    sigma = SEVERITY_PARAMS["gaussian_blur"][severity - 1]
    return _finish(gaussian_filter_nearest(images / 255.0, sigma))


# --------------------------------------------------------------------------- weather

def snow(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Snow layer: normal field, clipped zoom, threshold, 8-bit (truncated), ImageMagick
    motion blur (angle in [-135, -45]) read back as ImageMagick's 8-bit output
    (imagemagick_to_uint8); image whitened towards 1.5*gray + 0.5; layer added twice (rot 180)."""
    mean, std, zoom, thr, radius, sigma, blend = SEVERITY_PARAMS["snow"][severity - 1]
    n = len(images)
    x = images.astype(np.float32) / 255.0
    layer = rng.normal(size=(n, IMAGE_SIZE, IMAGE_SIZE), loc=mean, scale=std)
    layer = clipped_zoom(layer, zoom)
    layer[layer < thr] = 0
    layer8 = (np.clip(layer, 0, 1) * 255).astype(np.uint8)
    angles = rng.uniform(-135, -45, size=n)
    layer = imagemagick_motion_blur(layer8[..., None], radius, sigma, angles) / 255.0
    gray = (np.float32(0.299) * x[..., 0] + np.float32(0.587) * x[..., 1] + np.float32(0.114) * x[..., 2])
    x = blend * x + (1 - blend) * np.maximum(x, gray[..., None] * 1.5 + 0.5)
    return _finish(x + layer + layer[:, ::-1, ::-1])


def frost_texture_files(frost_dir: str | Path | None) -> list[Path]:
    """frost1.png .. frost5.jpg in `frost_dir`, or FrostUnavailable saying what is missing."""
    if frost_dir is None or str(frost_dir) == "":
        raise FrostUnavailable("no frost texture folder given (params corrupt.frost_dir or $MATEKD_FROST); "
                               "get frost1.png..frost5.jpg from the official robustness repository")
    folder = Path(frost_dir)
    if not folder.is_dir():
        raise FrostUnavailable(f"frost texture folder {folder} does not exist")
    files = [folder / name for name in FROST_FILES]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise FrostUnavailable(f"frost texture folder {folder} lacks {', '.join(missing)}")
    return files


def _resize_bilinear_cv2(img: np.ndarray, fx: float) -> np.ndarray:
    """cv2.resize(img, (0, 0), fx=fx, fy=fx) with INTER_LINEAR (half-pixel centres, no
    antialiasing). For fx = 0.2 every source coordinate is the integer 5*i + 2, so this is
    exact subsampling, identical to OpenCV."""
    h, w = img.shape[:2]
    out_h, out_w = round(h * fx), round(w * fx)
    scale = 1.0 / fx

    def axis(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        src = (np.arange(n_out) + 0.5) * scale - 0.5
        i0 = np.floor(src).astype(np.int64)
        frac = src - i0
        return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), frac

    r0, r1, fr = axis(out_h, h)
    c0, c1, fc = axis(out_w, w)
    f = img.astype(np.float64)
    top = f[r0][:, c0] * (1 - fc)[None, :, None] + f[r0][:, c1] * fc[None, :, None]
    bot = f[r1][:, c0] * (1 - fc)[None, :, None] + f[r1][:, c1] * fc[None, :, None]
    return np.rint(top * (1 - fr)[:, None, None] + bot * fr[:, None, None]).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _load_textures_cached(folder: str, stamp: tuple) -> tuple[np.ndarray, ...]:
    from PIL import Image

    out = []
    for name in FROST_FILES:
        with Image.open(Path(folder) / name) as im:
            rgb = np.asarray(im.convert("RGB"))  # drops alpha, like cv2.imread(IMREAD_COLOR)
        shrunk = _resize_bilinear_cv2(rgb, 0.2)
        shrunk.setflags(write=False)
        out.append(shrunk)
    return tuple(out)


def load_frost_textures(frost_dir: str | Path | None) -> tuple[np.ndarray, ...]:
    """The five textures as RGB uint8, shrunk by 0.2 (bilinear), cached per folder."""
    files = frost_texture_files(frost_dir)
    stamp = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    try:
        return _load_textures_cached(str(Path(frost_dir).resolve()), stamp)
    except OSError as exc:
        raise FrostUnavailable(f"cannot read the frost textures in {frost_dir}: {exc}") from exc


def frost(images: np.ndarray, severity: int, rng: np.random.Generator,
          textures: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """a*x + b*crop on 0..255: one of the five textures uniformly, a uniform 32x32 crop."""
    if textures is None:
        raise FrostUnavailable("frost needs the textures (load_frost_textures)")
    a, b = SEVERITY_PARAMS["frost"][severity - 1]
    n = len(images)
    which = rng.integers(5, size=n)
    heights = np.array([t.shape[0] for t in textures])
    widths = np.array([t.shape[1] for t in textures])
    # official: randint(0, H - 32) and randint(0, W - 32), both excluding the upper end
    top = rng.integers(0, heights[which] - IMAGE_SIZE)
    left = rng.integers(0, widths[which] - IMAGE_SIZE)
    crops = np.empty_like(images)
    grid = np.arange(IMAGE_SIZE)
    for k, tex in enumerate(textures):  # five groups, each gathered at once
        sel = np.nonzero(which == k)[0]
        if len(sel):
            rows = top[sel, None, None] + grid[None, :, None]
            cols = left[sel, None, None] + grid[None, None, :]
            crops[sel] = tex[rows, cols]
    return _to_uint8(np.clip(a * images.astype(np.float64) + b * crops, 0, 255))


def fog(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    strength, decay = SEVERITY_PARAMS["fog"][severity - 1]
    x = images / 255.0
    max_val = x.max(axis=(1, 2, 3), keepdims=True)
    x = x + strength * plasma_fractal(rng, len(images), decay)[..., None]
    return _finish(x * max_val / (max_val + strength))


# spatter helpers: OpenCV operations re-implemented in numpy ---------------------------

_CANNY_TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)


def canny(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """cv2.Canny(img, low, high) (3x3 Sobel, L1 magnitude) on a uint8 batch (N, H, W) -> bool.

    Sobel with replicated borders; OpenCV's integer non-maximum suppression (tan 22.5 test,
    strict '>' towards one neighbour and '>=' towards the other); hysteresis as 8-connected
    components of the candidates (magnitude > floor(low) after suppression) that contain a
    pixel with magnitude > floor(high). Equivalent to OpenCV's stack-based hysteresis.
    """
    f = img.astype(np.int64)
    p = _pad(f, 1, "edge")
    h, w = f.shape[1], f.shape[2]

    def at(di: int, dj: int) -> np.ndarray:
        return p[:, 1 + di:1 + di + h, 1 + dj:1 + dj + w]

    gx = (at(-1, 1) + 2 * at(0, 1) + at(1, 1)) - (at(-1, -1) + 2 * at(0, -1) + at(1, -1))
    gy = (at(1, -1) + 2 * at(1, 0) + at(1, 1)) - (at(-1, -1) + 2 * at(-1, 0) + at(-1, 1))
    mag = np.abs(gx) + np.abs(gy)
    mp = _pad(mag, 1, "constant")  # OpenCV's magnitude buffer is zero outside the image

    def nb(di: int, dj: int) -> np.ndarray:
        return mp[:, 1 + di:1 + di + h, 1 + dj:1 + dj + w]

    ax = np.abs(gx)
    ay = np.abs(gy) << 15
    tg22x = ax * _CANNY_TG22
    tg67x = tg22x + (ax << 16)
    horizontal = ay < tg22x
    vertical = ~horizontal & (ay > tg67x)
    same_sign = (gx ^ gy) >= 0
    keep_h = (mag > nb(0, -1)) & (mag >= nb(0, 1))
    keep_v = (mag > nb(-1, 0)) & (mag >= nb(1, 0))
    keep_d = np.where(same_sign, (mag > nb(-1, -1)) & (mag > nb(1, 1)), (mag > nb(-1, 1)) & (mag > nb(1, -1)))
    keep = np.where(horizontal, keep_h, np.where(vertical, keep_v, keep_d))
    candidate = keep & (mag > math.floor(low))
    strong = candidate & (mag > math.floor(high))
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = True  # 8-connectivity inside an image, none across the batch
    labels, _ = ndimage.label(candidate, structure=structure)
    good = np.zeros(labels.max() + 1, dtype=bool)
    good[labels[strong]] = True
    good[0] = False
    return good[labels]


_CHAMFER_SHIFT = 16
_CHAMFER = {1: round(1.0 * 65536), 2: round(1.4 * 65536), 5: round(2.1969 * 65536)}  # by dy^2+dx^2


def distance_transform_chamfer5(sources: np.ndarray, cap: float) -> np.ndarray:
    """cv2.distanceTransform(DIST_L2, maskSize=5) capped at `cap`, on (N, H, W) bool sources.

    OpenCV's 5x5 chamfer (weights 1, 1.4, 2.1969 in 16-bit fixed point) equals the shortest
    path over those moves; min-plus relaxation reaches every distance <= cap after ceil(cap)
    rounds (each move costs >= 1), so the capped result is exact. Outside the image is not a
    source. Returns float32 distances, capped.
    """
    big = np.int32(1 << 30)  # "no source yet"; big + the largest weight still fits in int32
    h, w = sources.shape[1], sources.shape[2]
    padded = np.full((sources.shape[0], h + 4, w + 4), big, dtype=np.int32)
    d = padded[:, 2:2 + h, 2:2 + w]
    d[...] = np.where(sources, 0, big)
    moves = [(di, dj, np.int32(_CHAMFER[di * di + dj * dj])) for di in range(-2, 3) for dj in range(-2, 3)
             if (di * di + dj * dj) in _CHAMFER]
    new = np.empty_like(d)
    tmp = np.empty_like(d)
    for _ in range(math.ceil(cap)):
        new[...] = d
        for di, dj, weight in moves:
            np.add(padded[:, 2 + di:2 + di + h, 2 + dj:2 + dj + w], weight, out=tmp)
            np.minimum(new, tmp, out=new)
        if np.array_equal(new, d):
            break
        d[...] = new
    dist = np.where(d >= big, np.float32(1e9), (d * (1.0 / (1 << _CHAMFER_SHIFT))).astype(np.float32))
    return np.minimum(dist, np.float32(cap))


def equalize_hist(img: np.ndarray) -> np.ndarray:
    """cv2.equalizeHist per image of a uint8 batch (N, H, W)."""
    n = img.shape[0]
    flat = img.reshape(n, -1).astype(np.int64)
    total = flat.shape[1]
    hist = np.bincount((flat + 256 * np.arange(n)[:, None]).ravel(), minlength=256 * n).reshape(n, 256)
    first = np.argmax(hist > 0, axis=1)
    h_first = hist[np.arange(n), first]
    cum = np.cumsum(hist, axis=1) - h_first[:, None]
    denom = np.maximum(total - h_first, 1).astype(np.float32)
    scale = np.float32(255.0) / denom
    lut = np.clip(np.rint(cum.astype(np.float32) * scale[:, None]), 0, 255)
    lut[np.arange(256)[None, :] <= first[:, None]] = 0
    constant = h_first == total
    lut[constant, :] = first[constant, None]  # OpenCV sets a constant image to its value
    return np.take_along_axis(lut, flat, axis=1).astype(np.uint8).reshape(img.shape)


def _box3(x: np.ndarray) -> np.ndarray:
    """cv2.blur(x, (3, 3)) sums (BORDER_REFLECT_101), divided by 9 in float64."""
    return correlate_spatial(x.astype(np.float64), np.ones((3, 3)), mode="reflect") * (1.0 / 9.0)


_EMBOSS = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)


def spatter(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Water (turquoise, embossed liquid edges) or mud (brown blobs), per the official code.

    Approximations of the OpenCV calls (documented per helper): Canny and the 5x5 chamfer
    distance transform are re-implemented exactly; liquid*255 is clipped to 255 before the
    uint8 cast (OpenCV/numpy would wrap the rare values above 1); an image without any
    liquid stays unchanged where the official code would divide 0 by 0.
    """
    mean, std, sigma, thr, intensity, mode = SEVERITY_PARAMS["spatter"][severity - 1]
    n = len(images)
    x = images.astype(np.float32) / 255.0
    liquid = rng.normal(size=(n, IMAGE_SIZE, IMAGE_SIZE), loc=mean, scale=std)
    liquid = gaussian_filter_nearest(liquid, sigma)
    liquid[liquid < thr] = 0
    if mode == "water":
        liquid8 = np.clip(liquid * 255, 0, 255).astype(np.uint8)
        edges = canny(liquid8, 50, 150)
        dist = distance_transform_chamfer5(edges, 20.0)  # 255 - canny: distance to an edge
        dist = _box3(dist).astype(np.float32).astype(np.uint8)
        dist = equalize_hist(dist)
        dist = np.clip(np.rint(correlate_spatial(dist.astype(np.float64), _EMBOSS, mode="reflect")), 0, 255)
        dist = np.rint(_box3(dist)).astype(np.float32)
        m = liquid8.astype(np.float32) * dist
        peak = m.max(axis=(1, 2), keepdims=True)
        m = np.where(peak > 0, m / np.where(peak > 0, peak, 1), 0).astype(np.float32) * np.float32(intensity)
        color = np.array([175, 238, 238], dtype=np.float64) / 255.0
        return _finish(x + m[..., None] * color)
    mask = (liquid > thr).astype(np.float32)
    m = gaussian_filter_nearest(mask, intensity)
    m[m < 0.8] = 0
    color = np.array([63, 42, 20], dtype=np.float64) / 255.0
    return _finish(x * (1 - m[..., None]) + color * m[..., None])


# --------------------------------------------------------------------------- digital

def brightness(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITY_PARAMS["brightness"][severity - 1]
    hsv = rgb_to_hsv(images / 255.0)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _finish(hsv_to_rgb(hsv))


def saturate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    scale, offset = SEVERITY_PARAMS["saturate"][severity - 1]
    hsv = rgb_to_hsv(images / 255.0)
    hsv[..., 1] = np.clip(hsv[..., 1] * scale + offset, 0, 1)
    return _finish(hsv_to_rgb(hsv))


def contrast(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    c = SEVERITY_PARAMS["contrast"][severity - 1]
    x = images / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    return _finish((x - means) * c + means)


def _reflect101(idx: np.ndarray, n: int) -> np.ndarray:
    period = 2 * n - 2
    idx = np.abs(idx) % period
    return np.where(idx >= n, period - idx, idx)


def _reflect_half(idx: np.ndarray, n: int) -> np.ndarray:
    """scipy 'reflect' (d c b a | a b c d | d c b a) for integer indices."""
    idx = idx % (2 * n)
    return np.where(idx >= n, 2 * n - 1 - idx, idx)


def affine_warp_cv2(x: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """cv2.warpAffine(x, M, (32, 32), INTER_LINEAR, BORDER_REFLECT_101) for a float32 batch.

    M (N, 2, 3) maps source to destination; it is inverted as cv2.invertAffineTransform does
    and the source coordinates are computed with OpenCV's fixed-point arithmetic (1/1024,
    then rounded to 1/32 of a pixel), so the sampling positions match OpenCV exactly.
    """
    h, w = x.shape[1:3]
    m = matrices.astype(np.float64)
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    det = np.where(det != 0, 1.0 / np.where(det != 0, det, 1), 0.0)
    a11, a22 = m[:, 1, 1] * det, m[:, 0, 0] * det
    a12, a21 = -m[:, 0, 1] * det, -m[:, 1, 0] * det
    b1 = -a11 * m[:, 0, 2] - a12 * m[:, 1, 2]
    b2 = -a21 * m[:, 0, 2] - a22 * m[:, 1, 2]
    cols = np.arange(w, dtype=np.float64)
    rows = np.arange(h, dtype=np.float64)
    adelta = np.rint(a11[:, None] * cols[None, :] * 1024).astype(np.int64)  # (N, W)
    bdelta = np.rint(a21[:, None] * cols[None, :] * 1024).astype(np.int64)
    x0 = np.rint((a12[:, None] * rows[None, :] + b1[:, None]) * 1024).astype(np.int64) + 16  # (N, H)
    y0 = np.rint((a22[:, None] * rows[None, :] + b2[:, None]) * 1024).astype(np.int64) + 16
    xx = (x0[:, :, None] + adelta[:, None, :]) >> 5
    yy = (y0[:, :, None] + bdelta[:, None, :]) >> 5
    ix, fx = xx >> 5, (xx & 31).astype(np.float32) / np.float32(32)
    iy, fy = yy >> 5, (yy & 31).astype(np.float32) / np.float32(32)
    c0, c1 = _reflect101(ix, w), _reflect101(ix + 1, w)
    r0, r1 = _reflect101(iy, h), _reflect101(iy + 1, h)
    wx, wy = fx[..., None], fy[..., None]
    return ((gather_pixels(x, r0, c0) * (1 - wx) + gather_pixels(x, r0, c1) * wx) * (1 - wy)
            + (gather_pixels(x, r1, c0) * (1 - wx) + gather_pixels(x, r1, c1) * wx) * wy).astype(np.float32)


def map_coordinates_reflect(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """scipy.ndimage.map_coordinates(order=1, mode='reflect') on each image of (N, H, W, C)
    at per-pixel coordinates rows, cols (N, H, W); channels share the coordinates."""
    h, w = x.shape[1:3]
    r0f, c0f = np.floor(rows), np.floor(cols)
    fr, fc = (rows - r0f)[..., None], (cols - c0f)[..., None]
    r0, c0 = r0f.astype(np.int64), c0f.astype(np.int64)
    ra, rb = _reflect_half(r0, h), _reflect_half(r0 + 1, h)
    ca, cb = _reflect_half(c0, w), _reflect_half(c0 + 1, w)
    xd = x.astype(np.float64)
    return ((gather_pixels(xd, ra, ca) * (1 - fc) + gather_pixels(xd, ra, cb) * fc) * (1 - fr)
            + (gather_pixels(xd, rb, ca) * (1 - fc) + gather_pixels(xd, rb, cb) * fc) * fr)


_ELASTIC_PTS = np.array([[26, 26], [26, 6], [6, 6]], dtype=np.float32)  # (x, y) control points


def elastic_transform(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Random affine (3 jittered control points, cv2.warpAffine re-implemented exactly, see
    affine_warp_cv2), then a smooth random displacement field (uniform noise, Gaussian
    'reflect' smoothing with truncate 3, times alpha) sampled bilinearly with 'reflect'
    borders, as scipy.ndimage.map_coordinates(order=1)."""
    alpha, sigma, jitter = SEVERITY_PARAMS["elastic_transform"][severity - 1]
    n = len(images)
    x = images.astype(np.float32) / np.float32(255)
    pts2 = _ELASTIC_PTS[None] + rng.uniform(-jitter, jitter, size=(n, 3, 2)).astype(np.float32)
    src = np.concatenate([_ELASTIC_PTS.astype(np.float64), np.ones((3, 1))], axis=1)  # rows [x, y, 1]
    mats = np.linalg.solve(np.broadcast_to(src, (n, 3, 3)), pts2.astype(np.float64)).transpose(0, 2, 1)
    x = affine_warp_cv2(x, mats)
    shape = (n, IMAGE_SIZE, IMAGE_SIZE)
    fields = []
    for _ in range(2):  # dx then dy, as drawn by the official code
        noise = rng.uniform(-1, 1, size=shape)
        smooth = ndimage.gaussian_filter(noise, sigma=(0, sigma, sigma), mode="reflect", truncate=3)
        fields.append((smooth * alpha).astype(np.float32))
    dx, dy = fields
    grid_r, grid_c = np.meshgrid(np.arange(IMAGE_SIZE), np.arange(IMAGE_SIZE), indexing="ij")
    out = map_coordinates_reflect(x, grid_r[None] + dy.astype(np.float64), grid_c[None] + dx.astype(np.float64))
    return _finish(out.astype(np.float32))


def pixelate(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """PIL box resize down to s x s and back up to 32 x 32 (its exact definition)."""
    from PIL import Image

    size = SEVERITY_PARAMS["pixelate"][severity - 1]
    out = np.empty_like(images)
    for i, img in enumerate(images):  # PIL works per image; each call is a few microseconds
        small = Image.fromarray(img).resize((size, size), Image.Resampling.BOX)
        out[i] = np.asarray(small.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX))
    return out


def jpeg_compression(images: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """PIL JPEG re-encode at the severity's quality (its exact definition)."""
    from PIL import Image

    quality = SEVERITY_PARAMS["jpeg_compression"][severity - 1]
    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB"))
    return out


_FUNCTIONS: dict[str, Callable[..., np.ndarray]] = {
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "speckle_noise": speckle_noise, "defocus_blur": defocus_blur, "glass_blur": glass_blur,
    "motion_blur": motion_blur, "zoom_blur": zoom_blur, "gaussian_blur": gaussian_blur, "snow": snow,
    "frost": frost, "fog": fog, "spatter": spatter, "brightness": brightness, "contrast": contrast,
    "elastic_transform": elastic_transform, "pixelate": pixelate, "jpeg_compression": jpeg_compression,
    "saturate": saturate,
}
assert tuple(_FUNCTIONS) == CORRUPTIONS

