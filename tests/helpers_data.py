"""Builders of small synthetic CIFAR-10 sources for tests (both raw formats).

Images are flat colours that survive JPEG almost exactly: red encodes the class
(20 * label + 10), green and blue a per-image id, so a test can check that every decoded
image carries the right label without trusting the reader under test.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
JPEG_TOLERANCE = 4  # max |decoded - truth| for a flat-colour JPEG at quality 95


def synthetic_split(per_class: int | list[int], start_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Flat-colour images grouped by class (class order, then id): (N,32,32,3) uint8, (N,) int64."""
    counts = [per_class] * len(CLASSES) if isinstance(per_class, int) else list(per_class)
    labels = np.repeat(np.arange(len(CLASSES), dtype=np.int64), counts)
    ids = np.arange(labels.size) + start_id
    colour = np.stack([20 * labels + 10, (8 * ids) % 256, (8 * (ids // 32)) % 256], axis=1).astype(np.uint8)
    images = np.broadcast_to(colour[:, None, None, :], (labels.size, 32, 32, 3)).copy()
    return images, labels


def label_from_image(images: np.ndarray) -> np.ndarray:
    """Invert the red-channel class code of `synthetic_split` (robust to JPEG error)."""
    return np.rint((images[:, :, :, 0].astype(np.float64).mean(axis=(1, 2)) - 10) / 20).astype(np.int64)


# ----------------------------------------------------------------------------------------
# Canonical python release


class Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way the official (Python 2 cPickle) CIFAR batches are written:
    byte strings as BINSTRING opcodes and numpy's constructor as numpy.core.multiarray."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_py2_native_str(self, obj: str) -> None:
        # Python 2's native str is a byte string: dtype codes ('u1', '|') were written so.
        self.save_py2_str(obj.encode("latin1"))

    dispatch[str] = save_py2_native_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def pickle_batch(batch: dict, style: str = "py2") -> bytes:
    """Serialise a batch dict: "py2" (like the real files) or "py3" (protocol 2, _codecs)."""
    buffer = io.BytesIO()
    if style == "py2":
        Py2StylePickler(buffer, protocol=2).dump(batch)
    else:
        pickle.dump(batch, buffer, protocol=2)
    return buffer.getvalue()


def canonical_batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict:
    """A batch dict in the official layout (channel-planar rows of 3072 bytes)."""
    planar = np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))
    return {b"batch_label": name.encode(), b"labels": [int(v) for v in labels], b"data": planar,
            b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}


def canonical_files(train_per_class: int = 3, test_per_class: int = 2, seed: int = 0,
                    style: str = "py2") -> tuple[dict[str, bytes], tuple[np.ndarray, ...]]:
    """Files of a fake cifar-10-batches-py folder, and the truth (train_x, train_y, test_x, test_y)
    in source order (training batches concatenated; rows shuffled like the real release)."""
    rng = np.random.default_rng(seed)
    train_x, train_y = synthetic_split(train_per_class)
    test_x, test_y = synthetic_split(test_per_class, start_id=len(train_y))
    order = rng.permutation(len(train_y))
    train_x, train_y = train_x[order], train_y[order]
    order = rng.permutation(len(test_y))
    test_x, test_y = test_x[order], test_y[order]
    files = {}
    for i, chunk in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        name = f"data_batch_{i}"
        files[name] = pickle_batch(canonical_batch(train_x[chunk], train_y[chunk], name), style)
    files["test_batch"] = pickle_batch(canonical_batch(test_x, test_y, "test_batch"), style)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": 10000, b"num_vis": 3072}
    files["batches.meta"] = pickle_batch(meta, style)
    files["readme.html"] = b"<html>fake</html>"
    return files, (train_x, train_y, test_x, test_y)


def write_canonical(path: str | os.PathLike, train_per_class: int = 3, test_per_class: int = 2,
                    seed: int = 0, style: str = "py2", replace: dict[str, bytes] | None = None,
                    as_dir: bool = False) -> tuple[np.ndarray, ...]:
    """Write a fake canonical archive (or, `as_dir`, the extracted folder) at `path`.

    `replace` overrides the bytes of named batch files (e.g. a hostile pickle). Returns the truth.
    """
    files, truth = canonical_files(train_per_class, test_per_class, seed, style)
    files.update(replace or {})
    path = Path(path)
    if as_dir:
        path.mkdir(parents=True)
        for name, blob in files.items():
            (path / name).write_bytes(blob)
    else:
        write_tar(path, {f"cifar-10-batches-py/{name}": blob for name, blob in files.items()},
                  dirs=["cifar-10-batches-py"])
    return truth


# ----------------------------------------------------------------------------------------
# Image folders


def encode_image(array: np.ndarray, fmt: str = "jpg", mode: str | None = None) -> bytes:
    """JPEG (quality 95) or PNG bytes of an HxWxC uint8 array (or a converted `mode`)."""
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG" if fmt == "jpg" else "PNG", **({"quality": 95} if fmt == "jpg" else {}))
    return buffer.getvalue()


def image_folder_files(train_per_class: int = 3, test_per_class: int = 2, fmt: str = "jpg",
                       top: str | None = None) -> tuple[dict[str, bytes], tuple[np.ndarray, ...]]:
    """Files of an image folder and its truth (train_x, train_y, test_x, test_y) in the order
    a reader must produce: split, class, file name."""
    files: dict[str, bytes] = {}
    truth = []
    start = 0
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        images, labels = synthetic_split(per_class, start_id=start)
        start += len(labels)
        for i, (image, label) in enumerate(zip(images, labels)):
            name = f"{split}/{CLASSES[label]}/{i:04d}.{fmt}"
            files[f"{top}/{name}" if top else name] = encode_image(image, fmt)
        truth += [images, labels]
    return files, tuple(truth)


def write_image_folder(path: str | os.PathLike, train_per_class: int = 3, test_per_class: int = 2,
                       fmt: str = "jpg", top: str | None = None, as_dir: bool = False,
                       drop: tuple[str, ...] = (), extra: dict[str, bytes] | None = None,
                       symlinks: dict[str, str] | None = None,
                       shuffle_members: bool = True) -> tuple[np.ndarray, ...]:
    """Write an image-folder archive (or folder) at `path`; return its truth.

    `drop` removes files whose name starts with one of the prefixes; `extra` adds raw members;
    `symlinks` adds symlink members (archive only). Members are written in a shuffled order so
    that readers must sort them.
    """
    files, truth = image_folder_files(train_per_class, test_per_class, fmt, top)
    files = {k: v for k, v in files.items() if not any(k.startswith(p) for p in drop)}
    files.update(extra or {})
    path = Path(path)
    if as_dir:
        for name, blob in files.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(blob)
    else:
        names = list(files)
        if shuffle_members:
            names = [names[i] for i in np.random.default_rng(1).permutation(len(names))]
        write_tar(path, {n: files[n] for n in names}, symlinks=symlinks)
    return truth


# ----------------------------------------------------------------------------------------
# Low-level archive tools


def write_tar(path: str | os.PathLike, files: dict[str, bytes], dirs: list[str] | None = None,
              symlinks: dict[str, str] | None = None) -> None:
    """Write a tar (gzip-compressed when the name ends in .gz/.tgz) with exactly these members."""
    path = Path(path)
    mode = "w:gz" if path.name.endswith((".gz", ".tgz")) else "w"
    with tarfile.open(path, mode) as tar:
        for name in dirs or []:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(blob))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)


def truncate_half(path: str | os.PathLike) -> None:
    """Cut a file to half its length (a partial download)."""
    path = Path(path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])


class _Evil:
    """Unpickling this runs `touch <sentinel>`: the hostile payload a reader must refuse."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.sentinel}",))


def hostile_batch(sentinel: Path) -> bytes:
    """A data_batch whose data field would execute a shell command if plainly unpickled."""
    return pickle.dumps({b"data": _Evil(sentinel), b"labels": [0]}, protocol=2)


def make_params(seed: int = 0, train_per_class: int | None = None, val_per_class: int = 1,
                test_per_class: int | None = None) -> Any:
    """A validated Params with the given data section (other sections minimal)."""
    from matekd.params import validate_params

    recipe = {"epochs": 1, "batch_size": 4, "lr": 0.1}
    return validate_params({
        "seed": seed,
        "data": {"train_per_class": train_per_class, "val_per_class": val_per_class,
                 "test_per_class": test_per_class},
        "teachers": {"resnet20": recipe},
        "distill": {"kd_teacher": "resnet20", "recipe": recipe},
    })
