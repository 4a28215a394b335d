"""Raw CIFAR-10 sources: find the source in data/ and read it safely into memory.

Two formats are read, both without extracting anything to disk and without ever executing
code from the data:
- the canonical python release (`cifar-10-python.tar.gz` or its extracted
  `cifar-10-batches-py/`): pickled batches, loaded with an allow-list unpickler;
- an image folder (`train/<class>/*`, `test/<class>/*`, optionally under one top folder) of
  JPEG/PNG files, as an archive or a directory.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import logging
import lzma
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import DataError
from ..storage import check_tar_member

log = logging.getLogger(__name__)

CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CANONICAL_ARCHIVE = "cifar-10-python.tar.gz"
CANONICAL_DIR = "cifar-10-batches-py"
CANONICAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CANONICAL_MD5 = "c58f30108f718f92721af3b95e74349a"
# Published md5 of each file of the extracted release (same values as torchvision's CIFAR10).
BATCH_MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
TRAIN_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5")
TEST_BATCH = "test_batch"
META_BATCH = "batches.meta"
KIND_CANONICAL = "cifar10-python"
KIND_FOLDER = "image-folder"
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SKIP_MD5_ENV = "MATEKD_SKIP_MD5"
SOURCE_ENV = "MATEKD_CIFAR10"
IMAGE_SHAPE = (32, 32, 3)

# Bounds that no genuine CIFAR-10 source comes near; they stop a hostile archive from
# exhausting memory before any other check runs.
MAX_ARCHIVE_BYTES = 2 << 30
MAX_BATCH_BYTES = 256 << 20
MAX_IMAGE_BYTES = 1 << 20
DECODE_CHUNK = 2048

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

HOW_TO_PROVIDE = (
    "Provide CIFAR-10 in one of these ways: `MATEKD_CIFAR10=/path/to/archive matekd fetch` "
    "(cifar-10-python.tar.gz, an image-folder .tar.gz or a folder); `matekd fetch --download` "
    "(needs internet); or copy the archive into data/ yourself and run `dvc add data`.")


# --------------------------------------------------------------------------------------
# Locating the raw source


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES) and not name.startswith(".")


def skip_md5() -> bool:
    return os.environ.get(SKIP_MD5_ENV, "").strip() not in ("", "0", "false", "no")


def _peek_archive_kind(path: Path) -> str:
    """Classify a non-canonically named archive from its first member (cheap: one header)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            first = tar.next()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path} is truncated or corrupt ({exc}); fetch it again") from exc
    if first is None:
        raise DataError(f"{path} is an empty archive")
    parts = PurePosixPath(first.name).parts
    if CANONICAL_DIR in parts or (parts and parts[-1] in BATCH_MD5):
        return KIND_CANONICAL
    return KIND_FOLDER


def find_source(data_dir: str | os.PathLike = "data") -> tuple[str, Path]:
    """Return (kind, path) of the raw CIFAR-10 source in `data_dir`, or raise DataError.

    Looked for in this order: cifar-10-python.tar.gz, cifar-10-batches-py/, one image-folder
    archive (*.tar.gz, *.tgz, *.tar), train/ + test/ class folders.
    """
    data_dir = Path(data_dir)
    canonical = data_dir / CANONICAL_ARCHIVE
    if canonical.is_file():
        return KIND_CANONICAL, canonical
    batches = data_dir / CANONICAL_DIR
    if batches.is_dir():
        return KIND_CANONICAL, batches
    archives = sorted(p for p in data_dir.iterdir() if p.is_file() and is_archive_name(p.name)) \
        if data_dir.is_dir() else []
    if len(archives) > 1:
        raise DataError(f"{data_dir} holds several archives ({', '.join(p.name for p in archives)}); "
                        "keep exactly one (`matekd fetch` does this) and run `dvc add data`")
    if archives:
        return _peek_archive_kind(archives[0]), archives[0]
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        return KIND_FOLDER, data_dir
    looked = [f"{canonical}", f"{batches}/", f"{data_dir}/*.tar.gz, *.tgz, *.tar (train/<class>/*, "
              "test/<class>/* inside)", f"{data_dir}/train/ + {data_dir}/test/ (class folders)"]
    raise DataError(f"no CIFAR-10 source found; looked for: {'; '.join(looked)}. {HOW_TO_PROVIDE}")


# --------------------------------------------------------------------------------------
# Archives


class _TarBuffer:
    """A whole (decompressed) tar archive in memory, with its checked regular-file members."""

    def __init__(self, path: Path):
        self.path = path
        self.data = _read_decompressed(path)
        try:
            with tarfile.open(fileobj=io.BytesIO(self.data), mode="r:") as tar:
                members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{path} is truncated or corrupt ({exc}); fetch it again") from exc
        if not members:
            raise DataError(f"{path} is an empty or unreadable archive")
        # tarfile stops silently at a cut header; a complete archive has a zero block (its
        # end-of-archive marker) right after the last member.
        last = members[-1]
        tail = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        marker = self.data[tail:tail + tarfile.BLOCKSIZE]
        if len(marker) < tarfile.BLOCKSIZE or any(marker):
            raise DataError(f"{path} is truncated or corrupt (no end-of-archive marker after "
                            f"{last.name!r}); fetch it again")
        view = memoryview(self.data)
        self.files: dict[tuple[str, ...], memoryview] = {}
        for member in members:
            parts = check_tar_member(path, member)
            if not member.isfile():
                continue
            end = member.offset_data + member.size
            if end > len(self.data):
                raise DataError(f"{path} is truncated (member {member.name!r} is cut off); fetch it again")
            self.files[parts] = view[member.offset_data:end]


def _read_decompressed(path: Path) -> bytearray:
    """Decompress a (gz/bz2/xz/plain) tar into a writable buffer, bounded in size."""
    try:
        with open(path, "rb") as raw:
            magic = raw.read(6)
        opener: Callable[..., Any]
        if magic.startswith(b"\x1f\x8b"):
            opener = gzip.open
        elif magic.startswith(b"BZh"):
            opener = bz2.open
        elif magic.startswith(b"\xfd7zXZ"):
            opener = lzma.open
        else:
            opener = open
        with opener(path, "rb") as handle:
            data = bytearray(handle.read(MAX_ARCHIVE_BYTES + 1))
    except (EOFError, OSError, zlib.error, lzma.LZMAError, ValueError) as exc:
        raise DataError(f"{path} is truncated or corrupt ({exc}); fetch it again") from exc
    if len(data) > MAX_ARCHIVE_BYTES:
        raise DataError(f"{path} unpacks to more than {MAX_ARCHIVE_BYTES >> 30} GiB; not a CIFAR-10 source")
    return data


# --------------------------------------------------------------------------------------
# Canonical python release


def _reconstruct_guarded(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's pickle constructor, limited to plain ndarrays of the tiny placeholder shape."""
    if subtype is not np.ndarray or not isinstance(shape, tuple) or int(np.prod(shape)) > 1024:
        raise pickle.UnpicklingError("unexpected ndarray reconstruction arguments")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _encode_latin1(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python-3 protocol-2 pickles use it for bytes (latin1 only)."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"unexpected _codecs.encode encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_guarded,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_guarded,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _encode_latin1,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads CIFAR batch dicts; any global outside the allow-list is refused, never imported."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"refusing to unpickle {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError("refusing to unpickle a persistent reference")


def _load_batch(raw: bytes | memoryview, where: str) -> dict:
    """Unpickle one CIFAR batch with the allow-list unpickler; DataError on anything else."""
    if len(raw) > MAX_BATCH_BYTES:
        raise DataError(f"{where} is {len(raw)} bytes, too large for a CIFAR-10 batch")
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    except Exception as exc:  # any malformed pickle: UnpicklingError, EOFError, ValueError, ...
        raise DataError(f"{where} is not a valid CIFAR-10 batch ({type(exc).__name__}: {exc})") from exc
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a valid CIFAR-10 batch (holds a {type(obj).__name__}, not a dict)")
    return obj


def _batch_arrays(batch: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images NHWC uint8, labels int64) of one batch dict, validated."""
    data, labels = batch.get(b"data"), batch.get(b"labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        shape = getattr(data, "shape", None)
        raise DataError(f"{where}: b'data' must be a uint8 array of shape (N, 3072), got "
                        f"{type(data).__name__} {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: b'labels' is not a list of integers") from exc
    if labels.shape != (data.shape[0],):
        raise DataError(f"{where}: {labels.shape} labels for {data.shape[0]} images")
    if labels.size and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
        raise DataError(f"{where}: labels outside 0..{len(CLASS_NAMES) - 1}")
    # Rows are channel-planar (1024 R, 1024 G, 1024 B); convert to NHWC.
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, labels


def _check_meta(meta: dict, where: str) -> None:
    names = meta.get(b"label_names")
    if names is None:
        return
    decoded = tuple(n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names)
    if decoded != CLASS_NAMES:
        raise DataError(f"{where}: label names {list(decoded)} differ from CIFAR-10's {list(CLASS_NAMES)}")


def _md5(data: bytes | memoryview) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def md5_error(what: str, expected: str, actual: str) -> DataError:
    return DataError(f"md5 mismatch for {what}: expected {expected}, got {actual}; the file is corrupt "
                     "or not the official CIFAR-10 release (fetch it again, or set "
                     f"{SKIP_MD5_ENV}=1 to accept it anyway)")


def _read_canonical(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) from the python release (archive or folder)."""
    check = not skip_md5()
    if path.is_dir():
        files: dict[str, bytes | memoryview] = {}
        for name in (*TRAIN_BATCHES, TEST_BATCH, META_BATCH):
            file = path / name
            if not file.is_file():
                if name == META_BATCH:
                    continue
                raise DataError(f"{path}: missing {name} (an incomplete cifar-10-batches-py folder)")
            if file.stat().st_size > MAX_BATCH_BYTES:
                raise DataError(f"{file} is too large for a CIFAR-10 batch")
            files[name] = file.read_bytes()
        label = str(path)
    else:
        if check and path.name == CANONICAL_ARCHIVE:
            actual = file_md5(path)
            if actual != CANONICAL_MD5:
                raise md5_error(str(path), CANONICAL_MD5, actual)
            check = False  # the archive checksum covers every member
        tar = _TarBuffer(path)
        files = {}
        for parts, view in tar.files.items():
            if parts[-1] in (*BATCH_MD5, META_BATCH):
                if parts[-1] in files:
                    raise DataError(f"{path}: more than one member named {parts[-1]}")
                files[parts[-1]] = view
        for name in (*TRAIN_BATCHES, TEST_BATCH):
            if name not in files:
                raise DataError(f"{path}: missing member {CANONICAL_DIR}/{name}")
        label = str(path)
    if check:
        for name, expected in BATCH_MD5.items():
            actual = _md5(files[name])
            if actual != expected:
                raise md5_error(f"{label}/{name}", expected, actual)
    if META_BATCH in files:
        _check_meta(_load_batch(files[META_BATCH], f"{label}/{META_BATCH}"), f"{label}/{META_BATCH}")
    train = [_batch_arrays(_load_batch(files[n], f"{label}/{n}"), f"{label}/{n}") for n in TRAIN_BATCHES]
    test_x, test_y = _batch_arrays(_load_batch(files[TEST_BATCH], f"{label}/{TEST_BATCH}"),
                                   f"{label}/{TEST_BATCH}")
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y)


# --------------------------------------------------------------------------------------
# Image folders


@dataclass
class _Entry:
    split: str
    label: int
    name: str  # path shown in messages
    data: bytes | memoryview


def _folder_entries(files: dict[tuple[str, ...], bytes | memoryview | Path], where: str) -> list[_Entry]:
    """Map relative path parts to entries, after checking the train/test/<class> layout."""
    file_parts = [parts for parts in files if parts and not parts[-1].startswith(".")]
    if any(p[0] in ("train", "test") for p in file_parts):
        prefix: tuple[str, ...] = ()
    else:
        tops = {p[0] for p in file_parts if len(p) > 2 and p[1] in ("train", "test")}
        if len(tops) != 1:
            raise DataError(f"{where}: found no train/<class>/ and test/<class>/ folders (at the top or "
                            "under a single top folder)")
        prefix = (tops.pop(),)
    entries: list[_Entry] = []
    seen: dict[str, set[int]] = {"train": set(), "test": set()}
    for parts in file_parts:
        if parts[:len(prefix)] != prefix:
            continue
        rel = parts[len(prefix):]
        if rel[0] not in ("train", "test"):
            continue  # README, LICENSE and the like beside the splits
        shown = "/".join(parts)
        if len(rel) != 3:
            raise DataError(f"{where}: unexpected member {shown} (expected {rel[0]}/<class>/<image>)")
        if rel[1] not in CLASS_NAMES:
            raise DataError(f"{where}: unexpected class folder {'/'.join(parts[:-1])}; allowed: "
                            f"{', '.join(CLASS_NAMES)}")
        label = CLASS_NAMES.index(rel[1])
        seen[rel[0]].add(label)
        entries.append(_Entry(rel[0], label, shown, files[parts]))  # type: ignore[arg-type]
    for split in ("train", "test"):
        missing = [CLASS_NAMES[c] for c in range(len(CLASS_NAMES)) if c not in seen[split]]
        if missing:
            base = "/".join((*prefix, split))
            raise DataError(f"{where}: missing class folder(s) {', '.join(f'{base}/{m}' for m in missing)} "
                            f"(every split needs all of {', '.join(CLASS_NAMES)})")
    return entries


# How a JPEG's PIL mode reads in a message (a PNG keeps PIL's mode name, e.g. RGBA or L).
_JPEG_KINDS = {"L": "grayscale", "LA": "grayscale+alpha", "CMYK": "4-channel (CMYK/alpha)"}


def _decode_pil(entry: _Entry, where: str, kinds: dict[str, str] | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(bytes(entry.data))) as image:
            if image.size != IMAGE_SHAPE[:2] or image.mode != "RGB":
                kind = (kinds or {}).get(image.mode, image.mode)
                raise DataError(f"{where}: member {entry.name} is {image.size[0]}x{image.size[1]} "
                                f"{kind}; every image must be 32x32 RGB")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except DataError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"{where}: member {entry.name} cannot be decoded ({exc})") from exc


def _decode_jpeg_chunk(chunk: list[_Entry], out: np.ndarray, where: str) -> None:
    """Decode a chunk of JPEG entries into `out` (one row per entry), checking 32x32 RGB.

    Through PIL (libjpeg-turbo): torchvision's batched decode_jpeg is deprecated since 0.29 (for
    TorchCodec, not a dependency), and PIL gives the same pixels (checked on all 60,000 images of
    the CIFAR-10 JPEG archive), so prepared data keeps its hashes."""
    out[:] = np.stack([_decode_pil(e, where, _JPEG_KINDS) for e in chunk])


def _decode_entries(entries: list[_Entry], where: str) -> tuple[np.ndarray, bool]:
    """Decode entries (JPEG in chunks on threads, PNG one by one; both through PIL) into NHWC uint8.

    Returns the images and whether any was a (lossy) JPEG.
    """
    images = np.empty((len(entries), *IMAGE_SHAPE), dtype=np.uint8)
    jpeg_rows: list[int] = []
    for row, entry in enumerate(entries):
        head = bytes(entry.data[:8])
        if len(entry.data) > MAX_IMAGE_BYTES:
            raise DataError(f"{where}: member {entry.name} is {len(entry.data)} bytes, too large for a 32x32 image")
        if head.startswith(_JPEG_MAGIC):
            jpeg_rows.append(row)
        elif head.startswith(_PNG_MAGIC):
            images[row] = _decode_pil(entry, where)
        else:
            raise DataError(f"{where}: member {entry.name} is neither a JPEG nor a PNG image")
    if jpeg_rows:
        jpeg_out = np.empty((len(jpeg_rows), *IMAGE_SHAPE), dtype=np.uint8)
        starts = range(0, len(jpeg_rows), DECODE_CHUNK)

        def work(start: int) -> None:
            rows = jpeg_rows[start:start + DECODE_CHUNK]
            _decode_jpeg_chunk([entries[r] for r in rows], jpeg_out[start:start + len(rows)], where)

        # PIL's decoder releases the GIL, so threads overlap the decoding of separate chunks.
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            list(pool.map(work, starts))
        images[np.asarray(jpeg_rows)] = jpeg_out
    return images, bool(jpeg_rows)


def _read_image_folder(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """(train_x, train_y, test_x, test_y, lossy) from an image-folder archive or directory."""
    files: dict[tuple[str, ...], Any]
    if path.is_dir():
        files = {}
        for split in ("train", "test"):
            for file in (path / split).rglob("*"):
                if file.is_file():
                    files[file.relative_to(path).parts] = file
        where = str(path)
    else:
        files = _TarBuffer(path).files  # type: ignore[assignment]
        where = str(path)
    entries = _folder_entries(files, where)
    if path.is_dir():
        for entry in entries:
            # bytearray: torch.frombuffer wants a writable buffer (it never writes to it).
            entry.data = bytearray(Path(entry.data).read_bytes())  # type: ignore[arg-type]
    # Deterministic order: split, class, file name.
    entries.sort(key=lambda e: (e.split, e.label, e.name))
    images, lossy = _decode_entries(entries, where)
    labels = np.fromiter((e.label for e in entries), dtype=np.int64, count=len(entries))
    is_train = np.fromiter((e.split == "train" for e in entries), dtype=bool, count=len(entries))
    return images[is_train], labels[is_train], images[~is_train], labels[~is_train], lossy


@dataclass
class RawData:
    """The full source: the 50k training and 10k test images in source order."""

    kind: str
    path: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    lossy: bool = False


def read_source(kind: str, path: str | os.PathLike) -> RawData:
    """Read a raw source (as returned by `find_source`) into memory."""
    path = Path(path)
    if kind == KIND_CANONICAL:
        tx, ty, vx, vy = _read_canonical(path)
        return RawData(kind, path, tx, ty, vx, vy, lossy=False)
    if kind == KIND_FOLDER:
        tx, ty, vx, vy, lossy = _read_image_folder(path)
        return RawData(kind, path, tx, ty, vx, vy, lossy=lossy)
    raise DataError(f"unknown source kind {kind!r}")


