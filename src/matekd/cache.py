"""Stage cache: each teacher's Grad-CAM map of every training and validation image.

Maps use the ground-truth class and the teacher's CAM layer, are resized to
`cache.resolution`, divided by their maximum (every use downstream is scale-invariant, and this
keeps fp16 far from overflow) and stored as fp16 with the hashes of the teacher weights and the prepared
data, so a cache built for other weights or data is refused instead of silently used. With
`distill.teacher_signals: cached` the file also holds the teacher's logits for every
crop/flip variant of every training image, which keeps cached logits exact under augmentation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .attribution import grad_cam, normalize_maps, resize_maps
from .augment import crop_flip, num_variants, to_device_tensor, variant_params
from .data import load_prepared
from .errors import CacheError, MatekdError
from .params import Params
from .runtime import stage
from .storage import load_tensors, save_tensors, sha256_file, write_json
from .teachers import load_teacher, teacher_paths
from .train import PAD, autocast, device_labels, image_variants, model_input

CACHE_VERSION = "1"


def cache_path(name: str, root: Path = Path(".")) -> Path:
    return root / "cams" / f"{name}.safetensors"


@torch.no_grad()
def _maps(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int, resolution: int,
          device: torch.device) -> torch.Tensor:
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = model_input(images[start:start + batch_size].to(device), device)
        with autocast(device):
            maps = grad_cam(model, x, labels[start:start + batch_size].to(device))
        maps = normalize_maps(resize_maps(maps.float(), resolution), "max")
        out.append(maps.half())
    return torch.cat(out)


@torch.inference_mode()
def variant_logits(model, images: torch.Tensor, batch_size: int, device: torch.device,
                   wanted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [N, V, C] (fp16) of the crop/flip variants of every image (V = num_variants(PAD))
    and the mask [N, V] of the (image, variant) pairs computed: `wanted`, or all of them."""
    n, n_var = images.shape[0], num_variants(PAD)
    mask = torch.ones(n, n_var, dtype=torch.bool) if wanted is None else wanted.cpu().bool()
    pairs = mask.nonzero()
    logits = None
    for start in range(0, pairs.shape[0], batch_size):
        image_idx, variant = pairs[start:start + batch_size].to(device).unbind(1)
        offsets, flips = variant_params(variant, PAD)
        views = crop_flip(images[image_idx].to(device), offsets, flips, PAD)
        with autocast(device):
            out = model(model_input(views, device)).float().half()
        if logits is None:
            logits = torch.zeros(n, n_var, out.shape[1], dtype=torch.float16, device=device)
        logits[image_idx, variant] = out
    if logits is None:
        logits = torch.zeros(n, n_var, 10, dtype=torch.float16, device=device)
    return logits, mask


def used_variants(params: Params, n: int) -> torch.Tensor:
    """[N, V] mask of the variants that the distill and ablation students will gather: their
    seeds and epochs fix every image's augmentation (train.image_variants)."""
    mask = torch.zeros(n, num_variants(PAD), dtype=torch.bool)
    for seed in sorted({params.distill.seed, *params.ablation.seeds}):
        variants = image_variants(seed, params.distill.recipe.epochs, n)
        mask[torch.arange(n).expand_as(variants), variants] = True
    return mask


def run_cache(params: Params, name: str, prepared_dir: str | Path = "prepared") -> dict:
    data = load_prepared(prepared_dir)
    weights_path = teacher_paths(name)["weights"]
    teacher_sha = sha256_file(weights_path) if weights_path.exists() else None
    with stage(params, name="cache", run_name=f"cache-{name}", data_hash=data.manifest_hash,
               tags={"model": name}) as ctx:
        device = ctx.device
        model = load_teacher(name, device)
        res = params.cache.resolution
        tic = time.perf_counter()
        tensors = {}
        for split in ("train", "val"):
            images = to_device_tensor(getattr(data, f"{split}_images"), device)
            labels = device_labels(getattr(data, f"{split}_labels"), device)
            tensors[f"{split}_maps"] = _maps(model, images, labels, params.cache.batch_size, res, device)
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
        metadata = {"version": CACHE_VERSION, "teacher": name, "teacher_sha256": teacher_sha,
                    "dataset_sha256": data.manifest_hash, "layer": model.cam_layer,
                    "resolution": str(res), "target": "label", "pad": str(PAD),
                    "logits": str("train_logits" in tensors).lower(),
                    "logit_variants": params.cache.logit_variants}
        save_tensors(cache_path(name), tensors, metadata)
        summary = {"teacher": name, "map_seconds": map_seconds, "logit_seconds": logit_seconds,
                   "images": int(tensors["train_maps"].shape[0] + tensors["val_maps"].shape[0]),
                   "resolution": res, "layer": model.cam_layer, "device": device.type,
                   "map_mean": float(tensors["train_maps"].float().mean()),
                   "zero_map_fraction": float((tensors["train_maps"].flatten(1).amax(1) == 0).float().mean())}
        write_json(Path("metrics") / "cache" / f"{name}.json", summary)
        ctx.run.log_metrics({"cache/map_seconds": map_seconds, "cache/logit_seconds": logit_seconds,
                             "cache/zero_map_fraction": summary["zero_map_fraction"]})
    return summary


@dataclass
class TeacherCache:
    name: str
    train_maps: torch.Tensor               # [N, h, w] fp16
    val_maps: torch.Tensor                 # [Nv, h, w] fp16
    train_logits: torch.Tensor | None      # [N, V, C] fp16 or None
    train_logits_mask: torch.Tensor | None  # [N, V] bool: which variants hold logits
    metadata: dict[str, str]


def load_cache(name: str, dataset_sha256: str, device: torch.device | str = "cpu",
               need_logits: bool = False) -> TeacherCache:
    """Load a teacher's cache, refusing one built from other weights or data."""
    path = cache_path(name)
    if not path.exists():
        raise CacheError(f"missing CAM cache {path}; run `dvc repro cache@{name}` (or `matekd cache {name}`)")
    try:
        tensors, meta = load_tensors(path, device)
    except MatekdError as exc:
        raise CacheError(f"CAM cache {path} is corrupt ({exc}); delete it and run `dvc repro cache@{name}`") from exc
    weights = teacher_paths(name)["weights"]
    current_teacher = sha256_file(weights) if weights.exists() else "missing"
    problems = []
    if meta.get("version") != CACHE_VERSION:
        problems.append(f"format version {meta.get('version')} != {CACHE_VERSION}")
    if meta.get("teacher_sha256") != current_teacher:
        problems.append(f"teacher weights changed (cache {str(meta.get('teacher_sha256'))[:12]}, "
                        f"now {current_teacher[:12]})")
    if meta.get("dataset_sha256") != dataset_sha256:
        problems.append(f"prepared data changed (cache {str(meta.get('dataset_sha256'))[:12]}, "
                        f"now {dataset_sha256[:12]})")
    missing = [k for k in ("train_maps", "val_maps") if k not in tensors]
    if missing:
        problems.append(f"missing tensors {missing}")
    if need_logits and "train_logits" not in tensors:
        problems.append("no cached logits (built with distill.teacher_signals: online)")
    if problems:
        raise CacheError(f"stale CAM cache {path}: {'; '.join(problems)}. Rebuild it with "
                         f"`dvc repro cache@{name}`")
    return TeacherCache(name, tensors["train_maps"], tensors["val_maps"], tensors.get("train_logits"),
                        tensors.get("train_logits_mask"), meta)
