"""Stage cache@<teacher>: the teacher's Grad-CAM maps of every training and validation image,
and (distill.teacher_signals: cached) its logits for the crop/flip variants students draw."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..augment import to_device_tensor
from ..cache import cache_metadata, teacher_maps, used_variants, variant_logits
from ..data.prepared import load_prepared
from ..params import Params, flatten
from ..paths import cache_metrics_path, cache_path, teacher_paths
from ..precision import bf16_enabled
from ..storage import save_tensors, sha256_file, write_json
from ..teachers import load_teacher
from ..training.loop import device_labels
from .context import stage


def logged_params(params: Params, name: str) -> dict:
    out = {"teacher": name, **flatten({"cache": params.cache.model_dump(mode="json")}),
           "distill.teacher_signals": params.distill.teacher_signals}
    if params.distill.teacher_signals == "cached" and params.cache.logit_variants == "used":
        # cache.used_variants: the students' seeds and epochs choose which variants get logits
        out.update({"distill.seed": params.distill.seed, "distill.data_seed": params.distill.data_seed,
                    "distill.recipe.epochs": params.distill.recipe.epochs,
                    "ablation.seeds": ",".join(map(str, params.ablation.seeds))})
    return out


def run_cache(params: Params, name: str, prepared_dir: str | Path = "prepared") -> dict:
    data = load_prepared(prepared_dir)
    weights_path = teacher_paths(name)["weights"]
    teacher_sha = sha256_file(weights_path) if weights_path.exists() else None
    with stage(params, name="cache", run_name=f"cache {name}", data_hash=data.manifest_hash,
               tags={"model": name}, log_params=logged_params(params, name)) as ctx:
        device = ctx.device
        model = load_teacher(name, device)
        res = params.cache.resolution
        tic = time.perf_counter()
        tensors = {}
        for split in ("train", "val"):
            images = to_device_tensor(getattr(data, f"{split}_images"), device)
            labels = device_labels(getattr(data, f"{split}_labels"), device)
            tensors[f"{split}_maps"] = teacher_maps(model, images, labels, params.cache.batch_size, res, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        map_seconds = time.perf_counter() - tic
        logit_seconds = 0.0
        if params.distill.teacher_signals == "cached":
            tic = time.perf_counter()
            n = len(data.train_labels)
            wanted = used_variants(params, n) if params.cache.logit_variants == "used" else None
            tensors["train_logits"], tensors["train_logits_mask"] = variant_logits(
                model, to_device_tensor(data.train_images, device), params.cache.batch_size, device, wanted)
            logit_seconds = time.perf_counter() - tic
        metadata = cache_metadata(params, name, model, teacher_sha, data.manifest_hash, "train_logits" in tensors)
        save_tensors(cache_path(name), tensors, metadata)
        # A DVC metrics file: numbers only. Teacher and CAM layer are in the cache's own metadata,
        # the device is a tag of the tracked run.
        summary = {"map_seconds": map_seconds, "logit_seconds": logit_seconds,
                   "images": int(tensors["train_maps"].shape[0] + tensors["val_maps"].shape[0]),
                   "resolution": res, "bf16": int(bf16_enabled(device)),
                   "map_mean": float(tensors["train_maps"].float().mean()),
                   "zero_map_fraction": float((tensors["train_maps"].flatten(1).amax(1) == 0).float().mean())}
        write_json(cache_metrics_path(name), summary)
        ctx.run.log_metrics({"cache/map_seconds": map_seconds, "cache/logit_seconds": logit_seconds,
                             "cache/zero_map_fraction": summary["zero_map_fraction"]})
    return summary
