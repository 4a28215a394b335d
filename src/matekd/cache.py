"""Teacher signal caches: each teacher's Grad-CAM map of every training and validation image.

Maps use the ground-truth class and the teacher's CAM layer, are resized to
`cache.resolution`, divided by their maximum (every use downstream is scale-invariant, and this
keeps fp16 far from overflow) and stored as fp16 with the hashes of the teacher weights and the prepared
data, so a cache built for other weights or data is refused instead of silently used. With
`distill.teacher_signals: cached` the file also holds the teacher's logits for every
crop/flip variant of every training image, which keeps cached logits exact under augmentation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attribution import grad_cam, normalize_maps, resize_maps
from .augment import crop_flip, num_variants, variant_params
from .errors import CacheError, MatekdError
from .params import Params
from .paths import cache_path, teacher_paths
from .precision import autocast
from .storage import load_tensors, sha256_file
from .training.loop import PAD, image_variants, model_input

CACHE_VERSION = "1"


@torch.no_grad()
def teacher_maps(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int, resolution: int,
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
    logits = torch.zeros(n, n_var, 10, dtype=torch.float16, device=device)
    peak = torch.zeros((), device=device)   # largest |logit|, checked once at the end (no sync per batch)
    for start in range(0, pairs.shape[0], batch_size):
        image_idx, variant = pairs[start:start + batch_size].to(device).unbind(1)
        offsets, flips = variant_params(variant, PAD)
        views = crop_flip(images[image_idx].to(device), offsets, flips, PAD)
        with autocast(device):
            out = model(model_input(views, device)).float()
        if logits.shape[-1] != out.shape[1]:
            logits = torch.zeros(n, n_var, out.shape[1], dtype=torch.float16, device=device)
        peak = torch.maximum(peak, out.abs().max())
        logits[image_idx, variant] = out.half()
    if not float(peak) <= float(torch.finfo(torch.float16).max):
        raise CacheError(f"teacher logits reach {float(peak):.3g}, beyond the fp16 range of the cache (65504): "
                         "the teacher looks untrained or diverged; retrain it")
    return logits, mask


def used_variants(params: Params, n: int) -> torch.Tensor:
    """[N, V] mask of the variants that the distill and ablation students will gather: their
    seeds and epochs fix every image's augmentation (train.image_variants)."""
    mask = torch.zeros(n, num_variants(PAD), dtype=torch.bool)
    seeds = {params.distill.seed, *params.ablation.seeds} if params.distill.data_seed is None \
        else {params.distill.data_seed}
    for seed in sorted(seeds):
        variants = image_variants(seed, params.distill.recipe.epochs, n)
        mask[torch.arange(n).expand_as(variants), variants] = True
    return mask


def cache_metadata(params: Params, name: str, model, teacher_sha: str | None, dataset_sha: str,
                   with_logits: bool) -> dict[str, str]:
    return {"version": CACHE_VERSION, "teacher": name, "teacher_sha256": teacher_sha,
            "dataset_sha256": dataset_sha, "layer": model.cam_layer,
            "resolution": str(params.cache.resolution), "target": "label", "pad": str(PAD),
            "logits": str(with_logits).lower(), "logit_variants": params.cache.logit_variants}


@dataclass
class TeacherCache:
    name: str
    train_maps: torch.Tensor               # [N, h, w] fp16
    val_maps: torch.Tensor                 # [Nv, h, w] fp16
    train_logits: torch.Tensor | None      # [N, V, C] fp16 or None
    train_logits_mask: torch.Tensor | None  # [N, V] bool: which variants hold logits
    metadata: dict[str, str]


def load_cache(name: str, dataset_sha256: str, device: torch.device | str = "cpu",
               need_logits: bool = False, teacher_sha256: str | None = None) -> TeacherCache:
    """Load a teacher's cache, refusing one built from other weights or data. `teacher_sha256`:
    the teacher weights' hash when the caller already has it (else the file is hashed here)."""
    path = cache_path(name)
    if not path.exists():
        raise CacheError(f"missing CAM cache {path}; run `dvc repro cache@{name}` (or `matekd cache {name}`)")
    try:
        tensors, meta = load_tensors(path, device)
    except MatekdError as exc:
        raise CacheError(f"CAM cache {path} is corrupt ({exc}); delete it and run `dvc repro cache@{name}`") from exc
    weights = teacher_paths(name)["weights"]
    current_teacher = teacher_sha256 or (sha256_file(weights) if weights.exists() else "missing")
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
