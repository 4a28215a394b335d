"""The prepared splits every stage reads: `prepared/cifar10.safetensors` + `manifest.json`.

`load_prepared` verifies every array against the manifest's hashes, so a corrupt or edited
prepared/ folder is refused instead of silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError, MatekdError
from ..storage import load_tensors, sha256_array
from .sources import CLASS_NAMES

PREPARED_FILE = "cifar10.safetensors"
MANIFEST_FILE = "manifest.json"
ARRAY_NAMES = ("train_images", "train_labels", "val_images", "val_labels", "test_images",
               "test_labels", "train_index", "val_index", "test_index")


@dataclass
class Prepared:
    """The prepared splits: uint8 NHWC images, int64 labels and source indices."""

    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    train_index: np.ndarray
    val_index: np.ndarray
    test_index: np.ndarray
    manifest: dict = field(repr=False)
    manifest_hash: str = ""
    class_names: tuple[str, ...] = CLASS_NAMES

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_prepared(dir: str | os.PathLike = "prepared") -> Prepared:  # noqa: A002 (contract name)
    """Load prepared/ and verify every array against the manifest's hashes."""
    folder = Path(dir)
    tensors_path, manifest_path = folder / PREPARED_FILE, folder / MANIFEST_FILE
    for needed in (tensors_path, manifest_path):
        if not needed.is_file():
            raise DataError(f"prepared data not found ({needed} is missing); run `dvc repro prepare` "
                            "(or `matekd prepare`)")
    raw_manifest = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw_manifest)
        expected = {name: manifest["arrays"][name]["sha256"] for name in ARRAY_NAMES}
        class_names = tuple(manifest["class_names"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"prepared data is corrupt ({manifest_path} is unreadable: {exc!r}); "
                        "run `dvc repro prepare` again") from exc
    try:
        tensors, _ = load_tensors(tensors_path)
    except MatekdError as exc:
        raise DataError(f"prepared data is corrupt ({exc}); run `dvc repro prepare` again") from exc
    arrays: dict[str, np.ndarray] = {}
    for name in ARRAY_NAMES:
        if name not in tensors:
            raise DataError(f"prepared data is corrupt ({name} is missing from {tensors_path}); "
                            "run `dvc repro prepare` again")
        arrays[name] = tensors[name].numpy()
        if sha256_array(arrays[name]) != expected[name]:
            raise DataError(f"prepared data is corrupt ({name} hash mismatch with {manifest_path}); "
                            "run `dvc repro prepare` again")
    return Prepared(**arrays, manifest=manifest, manifest_hash=hashlib.sha256(raw_manifest).hexdigest(),
                    class_names=class_names)

