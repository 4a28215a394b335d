"""Seeded, stratified train/validation/test splits of a raw source, written as prepared/."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ParamsError
from ..storage import atomic_dir, save_tensors, sha256_array, sha256_file, write_json
from .prepared import MANIFEST_FILE, PREPARED_FILE
from .sources import CLASS_NAMES, KIND_CANONICAL, find_source, read_source

log = logging.getLogger(__name__)


def stratified_split(labels: np.ndarray, rng: np.random.Generator, sizes: tuple[int | None, ...],
                     keys: tuple[str, ...], num_classes: int = len(CLASS_NAMES)) -> list[np.ndarray]:
    """Per class, permute that class's indices and cut consecutive blocks of `sizes` (None = rest).

    Returns one sorted int64 index array per size. Classes are visited in label order and every
    class consumes one permutation, so a block's content depends only on the seed, the labels and
    the sizes of the blocks before it (later blocks never change earlier ones).
    """
    counts = np.bincount(labels, minlength=num_classes)
    smallest = int(counts.argmin())
    start = 0
    for size, key in zip(sizes, keys):
        available = int(counts[smallest]) - start
        if size is not None and size > available:
            after = " after the earlier split(s)" if start else ""
            raise ParamsError(f"{key} = {size} is more than the {available} images per class available"
                              f"{after} (the maximum; class {CLASS_NAMES[smallest]!r} has {counts[smallest]})")
        start += available if size is None else size
    picks: list[list[np.ndarray]] = [[] for _ in sizes]
    for cls in range(num_classes):
        members = np.flatnonzero(labels == cls)
        order = members[rng.permutation(members.size)]
        start = 0
        for block, size in enumerate(sizes):
            take = order.size - start if size is None else size
            picks[block].append(order[start:start + take])
            start += take
    return [np.sort(np.concatenate(p)).astype(np.int64) for p in picks]



def _versions() -> dict[str, str]:
    versions = {"numpy": np.__version__}
    for module in ("torch", "torchvision", "PIL"):
        try:
            versions["pillow" if module == "PIL" else module] = __import__(module).__version__
        except ImportError:
            versions["pillow" if module == "PIL" else module] = "absent"
    return versions


def _counts(labels: np.ndarray) -> dict[str, int]:
    counts = np.bincount(labels, minlength=len(CLASS_NAMES))
    return {name: int(n) for name, n in zip(CLASS_NAMES, counts)}


def prepare(params: Any, data_dir: str | os.PathLike = "data", out_dir: str | os.PathLike = "prepared") -> dict:
    """Read data/, draw seeded stratified train/val/test, write prepared/ (all or nothing).

    The validation split is carved from the 50k training images (never from test). Returns the
    manifest. On any error nothing new is left behind.
    """
    data = params.data
    kind, path = find_source(data_dir)
    log.info("reading %s (%s)", path, kind)
    raw = read_source(kind, path)
    rng = np.random.default_rng(params.seed)
    val_index, train_index = stratified_split(
        raw.train_labels, rng, (data.val_per_class, data.train_per_class),
        ("data.val_per_class", "data.train_per_class"))
    if train_index.size == 0:
        raise ParamsError(f"data.val_per_class = {data.val_per_class} leaves no training images")
    (test_index,) = stratified_split(raw.test_labels, rng, (data.test_per_class,), ("data.test_per_class",))
    arrays = {
        "train_images": raw.train_images[train_index], "train_labels": raw.train_labels[train_index],
        "val_images": raw.train_images[val_index], "val_labels": raw.train_labels[val_index],
        "test_images": raw.test_images[test_index], "test_labels": raw.test_labels[test_index],
        "train_index": train_index, "val_index": val_index, "test_index": test_index,
    }
    if kind == KIND_CANONICAL:
        label = "CIFAR-10"
    else:
        label = "CIFAR-10 (JPEG mirror)" if raw.lossy else "CIFAR-10 (image-folder copy)"
    manifest = {
        "format": 1,
        "dataset": label,
        "source": {"kind": kind, "file": path.name if path != Path(data_dir) else ".",
                   "sha256": sha256_file(path), "lossy_jpeg": raw.lossy,
                   "train_images": int(raw.train_labels.size), "test_images": int(raw.test_labels.size)},
        "class_names": list(CLASS_NAMES),
        "seed": params.seed,
        "params": data.model_dump(mode="json"),
        "sizes": {"train": int(train_index.size), "val": int(val_index.size), "test": int(test_index.size)},
        "counts": {split: _counts(arrays[f"{split}_labels"]) for split in ("train", "val", "test")},
        "arrays": {name: {"sha256": sha256_array(a), "shape": list(a.shape), "dtype": str(a.dtype)}
                   for name, a in arrays.items()},
        "versions": _versions(),
    }
    import torch

    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_tensors(tmp / PREPARED_FILE, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()},
                     metadata={"format": "matekd-prepared-1"})
        write_json(tmp / MANIFEST_FILE, manifest)
    log.info("prepared %s: %d train, %d val, %d test", out, train_index.size, val_index.size, test_index.size)
    return manifest

