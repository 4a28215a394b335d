"""Stage corrupt: CIFAR-10-C for the prepared test set, in the official layout (`cifar10c/`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..cifar10c import (
    IMAGE_SHAPE,
    prepared_source_kind,
    resolve_corruptions,
    resolve_frost_dir,
    versions,
    write_official,
    write_regenerated,
)
from ..corruptions import EXTRA_4, SEVERITIES, STANDARD_15
from ..data.prepare import stratified_split
from ..data.prepared import load_prepared
from ..errors import DataError
from ..params import Params, flatten
from ..storage import atomic_dir, sha256_array, sha256_file, write_json
from .context import stage

TIMING_KEYS = ("seconds", "cpu_seconds", "wall_seconds")   # wall-clock, written apart from the outputs
# The stage's DVC metric (dvc.yaml), relative to the folder holding cifar10c/. Not in paths.py:
# every stage depends on that file, and a new name there would rerun the whole pipeline.
CORRUPT_METRICS = Path("metrics") / "corrupt.json"


def run_corrupt(params: Params, prepared_dir: str | Path = "prepared", out_dir: str | Path = "cifar10c",
                prepared: Any = None, progress: bool = True) -> dict:
    """Write CIFAR-10-C (official rows or a seeded regeneration) for the prepared test set.

    `prepared` may be passed in (an object with test_images, test_labels, test_index,
    manifest, manifest_hash); otherwise `matekd.data.load_prepared(prepared_dir)` is used.
    Returns the manifest written to `<out_dir>/manifest.json`. The wall-clock and CPU times go
    to `<out_dir>/../metrics/corrupt.json` (a DVC metric), not into the manifest: cifar10c/ is
    an output whose bytes must not change between identical runs.
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
    labels = labels_all[subset]
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
        "versions": versions(), "skipped": {}, "seconds": {}, "cpu_seconds": {},
    }
    with stage(params, name="corrupt", run_name="corrupt", data_hash=prepared.manifest_hash,
               log_params=flatten({"corrupt": cp.model_dump(mode="json")})) as ctx, \
            atomic_dir(out_dir) as build:
        if cp.source:
            written = write_official(cp.source, names, test_index, labels, source_kind, build, manifest)
        else:
            written = write_regenerated(images, names, cp.seed, resolve_frost_dir(cp.frost_dir), build,
                                         manifest, progress, workers=cp.workers)
        labels_5n = np.tile(labels.astype(np.uint8), 5)      # one block per severity
        np.save(build / "labels.npy", labels_5n, allow_pickle=False)
        manifest["corruptions"] = written
        manifest["standard_15_complete"] = all(c in written for c in STANDARD_15)
        manifest["extra_4_complete"] = all(c in written for c in EXTRA_4)
        manifest["array_sha256"] = {name: sha256_file(build / f"{name}.npy") for name in written}
        manifest["labels_sha256"] = sha256_array(labels_5n)
        timings = {key: manifest.pop(key) for key in TIMING_KEYS if key in manifest}
        write_json(build / "manifest.json", manifest)
        ctx.run.set_tags({"cifar10c": manifest["label"], "frost": "skipped" if manifest["skipped"] else "used"})
        ctx.run.log_metrics({f"seconds/{k}": v for k, v in timings["seconds"].items()})
        ctx.run.log_metrics({f"cpu_seconds/{k}": v for k, v in timings["cpu_seconds"].items()})
        ctx.run.log_metrics({"images": n, "corruptions": len(written),
                             "seconds_total": sum(timings["seconds"].values())})
        ctx.run.log_artifact(build / "manifest.json", "cifar10c")
    # Totals only (per corruption: the run's seconds/<name>, cpu_seconds/<name>), so that
    # `dvc metrics show` gains three columns, not one per corruption.
    totals = {key: round(sum(value.values()) if isinstance(value, dict) else value, 3)
              for key, value in timings.items()}
    write_json(Path(out_dir).parent / CORRUPT_METRICS, totals)
    return manifest
