"""CIFAR-10-C in the official layout: read from the release or regenerated, and loaded back.

Output folder (default `cifar10c/`), the layout of the official `CIFAR-10-C/`:
`<corruption>.npy` uint8 (5n, 32, 32, 3) with rows [(s-1)*n, s*n) at severity s,
`labels.npy` uint8 (5n,), plus `manifest.json` (provenance). The folder is built beside the
target and renamed into place only when complete, so a failure leaves the previous folder
(or nothing) behind.

Regeneration can run in worker processes (`corrupt.workers`): one task per (corruption,
severity), each writing its rows of the corruption's .npy in place. `corrupt` is a function of
(images, name, severity, seed) alone, so the files are byte for byte those of the serial run.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from .corruptions import CORRUPTIONS, SEVERITIES, FrostUnavailable, corrupt, frost_texture_files
from .errors import DataError, MatekdError, ParamsError

# matekd.storage (hashes, JSON) is imported inside the functions that use it: it loads torch, which
# the corruption worker processes (they import this module) never need.

CANONICAL_SOURCE = "cifar10-python"  # prepared data in the canonical CIFAR-10 test order
IMAGE_SHAPE = (32, 32, 3)


def resolve_corruptions(names: list[str] | None) -> list[str]:
    """The requested corruptions in the canonical order (None = all 19)."""
    if names is None:
        return list(CORRUPTIONS)
    if not names:
        raise ParamsError("corrupt.corruptions is an empty list; use null for all 19 or list some")
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown:
        raise ParamsError(f"corrupt.corruptions = {names!r}: unknown {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(CORRUPTIONS)}")
    if len(set(names)) != len(names):
        raise ParamsError(f"corrupt.corruptions = {names!r}: entries must be unique")
    return [n for n in CORRUPTIONS if n in names]


def resolve_frost_dir(frost_dir: str, environ: Mapping[str, str] = os.environ) -> str:
    """params corrupt.frost_dir, else $MATEKD_FROST of `environ`, else "" (frost is then skipped)."""
    return frost_dir or environ.get("MATEKD_FROST", "")


def prepared_source_kind(manifest: dict) -> str:
    """The raw source kind of prepared data: manifest["source"]["kind"] (or "source_kind")."""
    source = manifest.get("source")
    kind = manifest.get("source_kind") or (source.get("kind") if isinstance(source, dict) else None)
    return str(kind or "unknown")


def versions() -> dict[str, str]:
    import PIL
    import scipy

    versions = {"numpy": np.__version__, "scipy": scipy.__version__, "pillow": PIL.__version__}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # the corruptions do not need torch
        versions["torch"] = "not installed"
    return versions


def _warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)
    print(f"warning: {message}", file=sys.stderr)


def open_official(source: str | Path, names: list[str], test_index: np.ndarray,
                  expected_labels: np.ndarray | None = None
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Validate an official-layout folder; return ({name: memory-mapped array}, rows, labels).

    `source` holds `<name>.npy` uint8 (5N, 32, 32, 3) and `labels.npy` (5N,), severity s in
    rows [(s-1)N, sN), each block in the CIFAR-10 test order; N comes from labels.npy (10,000
    for the release). `rows` selects, severity by severity, the given test indices;
    `labels` (uint8, 5n) are the files' labels at those rows. `expected_labels` (the prepared
    test labels) must agree with the files' labels.
    """
    folder = Path(source)
    if not folder.is_dir():
        raise DataError(f"corrupt.source = {str(source)!r} is not a folder; point it at the extracted "
                        "CIFAR-10-C folder (with labels.npy and <corruption>.npy) or leave it empty to regenerate")
    labels_path = folder / "labels.npy"
    all_labels = _load_npy(labels_path)
    if all_labels.ndim != 1 or all_labels.dtype.kind not in "iu" or len(all_labels) == 0 or len(all_labels) % 5:
        raise DataError(f"{labels_path}: expected a 1-D integer array of 5*N labels, got "
                        f"{all_labels.dtype} {all_labels.shape}")
    n_source = len(all_labels) // 5
    blocks = np.asarray(all_labels).reshape(5, n_source)
    if not (blocks == blocks[0]).all():
        raise DataError(f"{labels_path}: the five severity blocks do not carry the same labels; "
                        "this is not the official CIFAR-10-C layout")
    test_index = np.asarray(test_index, dtype=np.int64)
    if len(test_index) and (test_index.min() < 0 or test_index.max() >= n_source):
        raise DataError(f"{folder} holds {n_source} test images per severity but the prepared test set "
                        f"refers to index {int(test_index.max())}")
    if expected_labels is not None:
        got = blocks[0][test_index]
        bad = np.nonzero(got != np.asarray(expected_labels))[0]
        if len(bad):
            raise DataError(f"{folder}: labels disagree with the prepared test labels at {len(bad)} of "
                            f"{len(test_index)} images (first at test index {int(test_index[bad[0]])}); "
                            "the official files must follow the canonical CIFAR-10 test order")
    missing = [n for n in names if not (folder / f"{n}.npy").is_file()]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(f'{n}.npy' for n in missing)}; "
                        "restrict corrupt.corruptions or use the complete release")
    arrays = {}
    for name in names:
        path = folder / f"{name}.npy"
        data = _load_npy(path)
        if data.dtype != np.uint8 or data.shape != (5 * n_source, *IMAGE_SHAPE):
            raise DataError(f"{path}: expected uint8 {(5 * n_source, *IMAGE_SHAPE)} to match labels.npy, "
                            f"got {data.dtype} {data.shape}")
        arrays[name] = data
    rows = (np.arange(5)[:, None] * n_source + test_index[None, :]).ravel()
    return arrays, rows, np.asarray(all_labels[rows], dtype=np.uint8)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"missing file {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable .npy array ({exc})") from exc


def write_official(source: str, names: list[str], test_index: np.ndarray, labels: np.ndarray,
                    source_kind: str, build: Path, manifest: dict) -> list[str]:
    if source_kind != CANONICAL_SOURCE:
        raise MatekdError(f"corrupt.source is set but the prepared data comes from {source_kind!r}: the official "
                          "CIFAR-10-C files follow the canonical CIFAR-10 test order, so they can only be matched "
                          f"to data prepared from the canonical release ({CANONICAL_SOURCE}); prepare from "
                          "cifar-10-python.tar.gz or leave corrupt.source empty to regenerate")
    start = time.perf_counter()
    arrays, rows, _ = open_official(source, names, test_index, expected_labels=labels)
    for name in names:  # one corruption in memory at a time
        np.save(build / f"{name}.npy", np.ascontiguousarray(arrays[name][rows]), allow_pickle=False)
    manifest.update(kind="official", label="CIFAR-10-C (official)", source=str(Path(source).resolve()))
    manifest["seconds"]["read"] = round(time.perf_counter() - start, 3)
    return names


def write_regenerated(images: np.ndarray, names: list[str], seed: int, frost_dir: str, build: Path,
                       manifest: dict, progress: bool, workers: int = 1) -> list[str]:
    """Regenerate `names` for `images` into `build` (one <name>.npy each); frost is skipped,
    with a warning and a manifest entry, when its textures are missing. `workers` > 1 spreads
    the (corruption, severity) tasks over that many processes (same bytes as serial)."""
    from .storage import sha256_file

    n = len(images)
    manifest.update(kind="regenerated", label=f"CIFAR-10-C (regenerated, seed {seed})", frost=None)
    todo = []
    for name in names:
        if name == "frost":
            try:
                files = frost_texture_files(frost_dir)
            except FrostUnavailable as exc:
                reason = f"frost skipped: {exc}"
                manifest["skipped"]["frost"] = reason
                _warn(reason + "; the 15-corruption mean will be incomplete")
                continue
            manifest["frost"] = {"dir": str(Path(frost_dir).resolve()),
                                 "sha256": {f.name: sha256_file(f) for f in files}}
        todo.append(name)
    if workers > 1 and todo:
        _regenerate_parallel(images, todo, seed, frost_dir, build, manifest, progress, workers)
        return todo
    for name in todo:
        start, cpu_start = time.perf_counter(), time.process_time()
        out = np.empty((5 * n, *IMAGE_SHAPE), dtype=np.uint8)
        for s in SEVERITIES:
            out[(s - 1) * n:s * n] = corrupt(images, name, s, seed, frost_dir=frost_dir or None)
        np.save(build / f"{name}.npy", out, allow_pickle=False)
        seconds = time.perf_counter() - start
        manifest["seconds"][name] = round(seconds, 3)
        manifest["cpu_seconds"][name] = round(time.process_time() - cpu_start, 3)
        if progress:
            print(f"corrupt: {name:<18} {seconds:7.1f} s", file=sys.stderr)
    return todo


# --------------------------------------------------------------------------------------
# Parallel regeneration: tasks (corruption, severity) in worker processes

_WORKER: dict = {}   # per worker process: the images (memory-mapped) and the task settings

# BLAS/OpenMP thread pools per worker: one thread each, or N workers x N threads oversubscribe.
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@contextlib.contextmanager
def _single_threaded_children() -> Iterator[None]:
    """Set the thread-count variables while worker processes are spawned (they inherit the
    environment then); restore the parent's afterwards."""
    saved = {k: os.environ.get(k) for k in _THREAD_VARIABLES}
    os.environ.update({k: "1" for k in _THREAD_VARIABLES})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _init_worker(images_path: str, seed: int, frost_dir: str, build: str) -> None:
    _WORKER.update(images=np.load(images_path, mmap_mode="r"), seed=seed, frost_dir=frost_dir or None,
                   build=Path(build))


def _corrupt_task(task: tuple[str, int]) -> tuple[str, int, float, float]:
    """Corrupt all images with (name, severity) and write them into rows [(s-1)n, sn) of the
    corruption's .npy (created by the parent). Returns (name, severity, wall s, CPU s)."""
    name, severity = task
    start, cpu_start = time.perf_counter(), time.process_time()
    images = np.ascontiguousarray(_WORKER["images"])
    n = len(images)
    rows = corrupt(images, name, severity, _WORKER["seed"], frost_dir=_WORKER["frost_dir"])
    out = np.load(_WORKER["build"] / f"{name}.npy", mmap_mode="r+")
    out[(severity - 1) * n:severity * n] = rows
    out.flush()
    del out
    return name, severity, time.perf_counter() - start, time.process_time() - cpu_start


def _regenerate_parallel(images: np.ndarray, names: list[str], seed: int, frost_dir: str, build: Path,
                         manifest: dict, progress: bool, workers: int) -> None:
    """Every (corruption, severity) as one task over `workers` spawned processes. Each .npy is
    created here with its final header and shape (what np.save writes), then filled in place.
    manifest seconds/cpu_seconds per corruption are the sums over its severities (worker time);
    manifest["wall_seconds"] is the elapsed time of the whole regeneration."""
    n = len(images)
    for name in names:
        np.lib.format.open_memmap(build / f"{name}.npy", mode="w+", dtype=np.uint8,
                                  shape=(5 * n, *IMAGE_SHAPE)).flush()
    tasks = [(name, s) for name in names for s in SEVERITIES]
    seconds = {name: 0.0 for name in names}
    cpu_seconds = {name: 0.0 for name in names}
    remaining = {name: len(SEVERITIES) for name in names}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="matekd-corrupt-") as scratch:
        images_path = os.path.join(scratch, "images.npy")
        np.save(images_path, np.ascontiguousarray(images), allow_pickle=False)
        # spawn, not fork: the parent has torch (and its thread pools) loaded.
        context = mp.get_context("spawn")
        with _single_threaded_children():
            pool = context.Pool(min(workers, len(tasks)), initializer=_init_worker,
                                initargs=(images_path, seed, frost_dir, str(build)))
        with pool:
            for name, _, wall, cpu in pool.imap_unordered(_corrupt_task, tasks):
                seconds[name] += wall
                cpu_seconds[name] += cpu
                remaining[name] -= 1
                if progress and remaining[name] == 0:
                    print(f"corrupt: {name:<18} {seconds[name]:7.1f} s (worker time)", file=sys.stderr)
    for name in names:
        manifest["seconds"][name] = round(seconds[name], 3)
        manifest["cpu_seconds"][name] = round(cpu_seconds[name], 3)
    manifest["workers"] = workers
    manifest["wall_seconds"] = round(time.perf_counter() - start, 3)


def load_corrupted(dir: str | Path = "cifar10c") -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """({name: uint8 (5n, 32, 32, 3) memory-mapped}, labels (5n,), manifest) of a corrupt output."""
    from .storage import read_json

    folder = Path(dir)
    if not (folder / "manifest.json").exists():
        raise DataError(f"{folder}/manifest.json not found; run the corrupt stage first")
    manifest = read_json(folder / "manifest.json")
    labels = _load_npy(folder / "labels.npy")
    if labels.ndim != 1 or len(labels) % 5:
        raise DataError(f"{folder}/labels.npy: expected 5n labels, got shape {labels.shape}")
    arrays = {}
    for name in manifest.get("corruptions", []):
        data = _load_npy(folder / f"{name}.npy")
        if data.dtype != np.uint8 or data.shape != (len(labels), *IMAGE_SHAPE):
            raise DataError(f"{folder}/{name}.npy: expected uint8 {(len(labels), *IMAGE_SHAPE)}, "
                            f"got {data.dtype} {data.shape}; rerun the corrupt stage")
        arrays[name] = data
    return arrays, np.asarray(labels), manifest
