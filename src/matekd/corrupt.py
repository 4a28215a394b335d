"""Stage corrupt: CIFAR-10-C in the official layout, read from the release or regenerated.

Output folder (default `cifar10c/`), the layout of the official `CIFAR-10-C/`:
`<corruption>.npy` uint8 (5n, 32, 32, 3) with rows [(s-1)*n, s*n) at severity s,
`labels.npy` uint8 (5n,), plus `manifest.json` (provenance). The folder is built beside the
target and renamed into place only when complete, so a failure leaves the previous folder
(or nothing) behind.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .corruptions import (CORRUPTIONS, EXTRA_4, SEVERITIES, STANDARD_15, FrostUnavailable, corrupt,
                          frost_texture_files)
from .errors import DataError, MatekdError, ParamsError
from .data import load_prepared, stratified_split
from .params import Params
from .runtime import stage
from .storage import atomic_dir, read_json, sha256_array, sha256_file, write_json

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


def resolve_frost_dir(frost_dir: str) -> str:
    """params corrupt.frost_dir, else $MATEKD_FROST, else "" (frost is then skipped)."""
    return frost_dir or os.environ.get("MATEKD_FROST", "")


def prepared_source_kind(manifest: dict) -> str:
    """The raw source kind of prepared data: manifest["source"]["kind"] (or "source_kind")."""
    source = manifest.get("source")
    kind = manifest.get("source_kind") or (source.get("kind") if isinstance(source, dict) else None)
    return str(kind or "unknown")


def _versions() -> dict[str, str]:
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


def run_corrupt(params: Params, prepared_dir: str | Path = "prepared", out_dir: str | Path = "cifar10c",
                prepared: Any = None, progress: bool = True) -> dict:
    """Write CIFAR-10-C (official rows or a seeded regeneration) for the prepared test set.

    `prepared` may be passed in (an object with test_images, test_labels, test_index,
    manifest, manifest_hash); otherwise `matekd.data.load_prepared(prepared_dir)` is used.
    Returns the manifest written to `<out_dir>/manifest.json`.
    """
    cp = params.corrupt
    names = resolve_corruptions(cp.corruptions)
    if prepared is None:
        prepared = load_prepared(prepared_dir)
    source_kind = prepared_source_kind(prepared.manifest)
    # The prepared test set is already a stratified sample; corrupt a seeded, stratified part of it.
    labels_all = np.asarray(prepared.test_labels)
    subset = np.arange(len(labels_all)) if cp.images_per_class is None else stratified_split(
        labels_all, np.random.default_rng([cp.seed, 0xC10C]), (cp.images_per_class,),
        ("corrupt.images_per_class",))[0]
    images = np.ascontiguousarray(np.asarray(prepared.test_images)[subset])
    labels = np.asarray(prepared.test_labels)[subset]
    test_index = np.asarray(prepared.test_index, dtype=np.int64)[subset]
    if images.dtype != np.uint8 or images.shape[1:] != IMAGE_SHAPE:
        raise DataError(f"prepared test images must be uint8 (N, 32, 32, 3), got {images.dtype} {images.shape}")
    n = len(images)
    if n == 0:
        raise DataError("the prepared test set is empty")

    manifest: dict[str, Any] = {
        "layout": "official CIFAR-10-C: <corruption>.npy uint8 (5n,32,32,3), rows [(s-1)n, sn) = severity s; "
                  "labels.npy uint8 (5n,)",
        "images": n, "severities": list(SEVERITIES), "seed": cp.seed,
        "images_per_class": cp.images_per_class, "test_index": test_index.tolist(),
        "prepared_manifest_sha256": prepared.manifest_hash, "prepared_source_kind": source_kind,
        "versions": _versions(), "skipped": {}, "seconds": {}, "cpu_seconds": {},
    }
    with stage(params, name="corrupt", run_name="corrupt", data_hash=prepared.manifest_hash) as ctx, \
            atomic_dir(out_dir) as build:
        if cp.source:
            written = _write_official(cp.source, names, test_index, labels, source_kind, build, manifest)
        else:
            written = _write_regenerated(images, names, cp.seed, resolve_frost_dir(cp.frost_dir), build,
                                         manifest, progress)
        np.save(build / "labels.npy", np.tile(labels.astype(np.uint8), 5), allow_pickle=False)
        manifest["corruptions"] = written
        manifest["standard_15_complete"] = all(c in written for c in STANDARD_15)
        manifest["extra_4_complete"] = all(c in written for c in EXTRA_4)
        manifest["array_sha256"] = {name: sha256_file(build / f"{name}.npy") for name in written}
        manifest["labels_sha256"] = sha256_array(np.tile(labels.astype(np.uint8), 5))
        write_json(build / "manifest.json", manifest)
        ctx.run.set_tags({"cifar10c": manifest["label"], "frost": "skipped" if manifest["skipped"] else "used"})
        ctx.run.log_metrics({f"seconds/{k}": v for k, v in manifest["seconds"].items()})
        ctx.run.log_metrics({"images": n, "corruptions": len(written),
                             "seconds_total": sum(manifest["seconds"].values())})
        ctx.run.log_artifact(build / "manifest.json", "cifar10c")
    return manifest


def _write_official(source: str, names: list[str], test_index: np.ndarray, labels: np.ndarray,
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


def _write_regenerated(images: np.ndarray, names: list[str], seed: int, frost_dir: str, build: Path,
                       manifest: dict, progress: bool) -> list[str]:
    n = len(images)
    written = []
    manifest.update(kind="regenerated", label=f"CIFAR-10-C (regenerated, seed {seed})", frost=None)
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
        start, cpu_start = time.perf_counter(), time.process_time()
        out = np.empty((5 * n, *IMAGE_SHAPE), dtype=np.uint8)
        for s in SEVERITIES:
            out[(s - 1) * n:s * n] = corrupt(images, name, s, seed, frost_dir=frost_dir or None)
        np.save(build / f"{name}.npy", out, allow_pickle=False)
        seconds = time.perf_counter() - start
        manifest["seconds"][name] = round(seconds, 3)
        manifest["cpu_seconds"][name] = round(time.process_time() - cpu_start, 3)
        written.append(name)
        if progress:
            print(f"corrupt: {name:<18} {seconds:7.1f} s", file=sys.stderr)
    return written


def load_corrupted(dir: str | Path = "cifar10c") -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """({name: uint8 (5n, 32, 32, 3) memory-mapped}, labels (5n,), manifest) of a corrupt output."""
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
