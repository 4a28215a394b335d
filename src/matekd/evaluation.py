"""Evaluation maths and helpers: accuracy, confusion, CIFAR-10-C summaries, Grad-CAM agreement.

Used by the evaluate stage (matekd.stages.evaluate); the report reads only what it writes.

CIFAR-10-C convention (docs/cifar10c.md): the headline number is the mean over the 15
standard corruptions x 5 severities; the 4 extra corruptions and the 19-mean are reported
separately, and so are per-corruption and per-severity accuracies.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .attribution import grad_cam, resize_maps
from .augment import to_device_tensor
from .corruptions import CORRUPTIONS as ALL_CORRUPTIONS
from .corruptions import EXTRA_4 as EXTRA_CORRUPTIONS
from .corruptions import SEVERITIES
from .corruptions import STANDARD_15 as STANDARD_CORRUPTIONS
from .errors import MatekdError
from .models import build_model
from .models.fused import FusedCifarResNet
from .models.resnet import CifarResNet
from .plotting import pyplot
from .storage import load_tensors
from .training.loop import device_labels, model_input, predict_logits, prepare_model
from .weighting import similarity, teacher_weights, weight_statistics

# sha256 of shared/data/cifar10-jpeg.tar.gz (the JPEG q75 mirror, shared/data/README.md)
JPEG_MIRROR_SHA256 = "45b041e867f5a40f79bfde38d3dd1fd511103d50068c1afecf6445e25234d4db"


# --------------------------------------------------------------------------------------
# Pure maths


def confusion_matrix(pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                     num_classes: int) -> np.ndarray:
    """Counts [C,C] (int64): row = true class, column = predicted class."""
    pred = _as_numpy(pred).astype(np.int64).ravel()
    labels = _as_numpy(labels).astype(np.int64).ravel()
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.size} predictions but {labels.size} labels")
    for name, values in (("predictions", pred), ("labels", labels)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} outside 0..{num_classes - 1}")
    flat = np.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_accuracy(matrix: np.ndarray) -> np.ndarray:
    """Recall per true class from a confusion matrix; NaN for classes without samples."""
    totals = matrix.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)


def evaluate_predictions(pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
                         num_classes: int) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of predicted classes."""
    matrix = confusion_matrix(pred, labels, num_classes)
    total = int(matrix.sum())
    return {"accuracy": float(np.trace(matrix) / total) if total else float("nan"),
            "per_class_accuracy": per_class_accuracy(matrix), "confusion_matrix": matrix,
            "images": total}


def severity_accuracy(correct: np.ndarray | torch.Tensor, severities: int = len(SEVERITIES)) -> np.ndarray:
    """Accuracy per severity of a 0/1 vector laid out as severity blocks [(s-1)n, sn)."""
    correct = _as_numpy(correct).astype(np.float64).ravel()
    if correct.size == 0 or correct.size % severities:
        raise ValueError(f"{correct.size} results do not split into {severities} equal severity blocks")
    return correct.reshape(severities, -1).mean(axis=1)


def summarise_corruption(acc_table: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Summarise accuracies per corruption x severity ({name: [acc at severity 1..5]}).

    `standard_mean` (the headline) averages the available standard corruptions; when any of
    the 15 is absent `standard_mean_complete` is False and `standard_missing` lists them.
    `all_mean` is the mean over all available of the 19 (not comparable with published
    15-means); `extra_mean` covers the 4 extra corruptions. Per-severity means are given for
    the standard set and for all corruptions. Means are None when nothing is available.
    """
    unknown = sorted(set(acc_table) - set(ALL_CORRUPTIONS))
    if unknown:
        raise ValueError(f"unknown corruptions {unknown}; expected names among {', '.join(ALL_CORRUPTIONS)}")
    table = {name: np.asarray(values, dtype=np.float64) for name, values in acc_table.items()}
    for name, values in table.items():
        if values.shape != (len(SEVERITIES),):
            raise ValueError(f"{name}: expected {len(SEVERITIES)} severity accuracies, got shape {values.shape}")

    def block(names: Sequence[str]) -> np.ndarray | None:
        present = [table[n] for n in names if n in table]
        return np.stack(present) if present else None

    standard, extra = block(STANDARD_CORRUPTIONS), block(EXTRA_CORRUPTIONS)
    everything = block(ALL_CORRUPTIONS)

    def mean(x: np.ndarray | None) -> float | None:
        return None if x is None else float(x.mean())

    def per_severity(x: np.ndarray | None) -> list[float] | None:
        return None if x is None else x.mean(axis=0).tolist()

    standard_missing = [n for n in STANDARD_CORRUPTIONS if n not in table]
    extra_missing = [n for n in EXTRA_CORRUPTIONS if n not in table]
    return {
        "standard_mean": mean(standard),
        "standard_mean_complete": not standard_missing,
        "standard_missing": standard_missing,
        "standard_count": len(STANDARD_CORRUPTIONS) - len(standard_missing),
        "extra_mean": mean(extra),
        "extra_missing": extra_missing,
        "all_mean": mean(everything),
        "all_mean_complete": not standard_missing and not extra_missing,
        "all_count": 0 if everything is None else int(everything.shape[0]),
        "per_severity_standard": per_severity(standard),
        "per_severity_all": per_severity(everything),
        "per_corruption": {n: float(table[n].mean()) for n in ALL_CORRUPTIONS if n in table},
    }


def stratified_order(labels: np.ndarray | torch.Tensor) -> np.ndarray:
    """A permutation that interleaves classes: the k-th image of every class comes before the
    (k+1)-th of any class (classes in label order, images in their original order)."""
    labels = _as_numpy(labels).astype(np.int64).ravel()
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    rank = np.empty_like(order)
    rank[order] = np.arange(labels.size) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    return np.lexsort((labels, rank))


def gradcam_agreement(student_maps: torch.Tensor, teacher_maps: Sequence[torch.Tensor], tau: float,
                      kind: str = "cosine", clip: bool = False, rescale: bool = False,
                      bins: int = 20) -> dict[str, torch.Tensor]:
    """Similarity [K,B] of the student's maps to each teacher's (resized to the student grid),
    the teacher weights softmax(sim/tau) [K,B], and weight_statistics of both."""
    grid = tuple(student_maps.shape[-2:])
    stacked = torch.stack([resize_maps(m.float(), grid) for m in teacher_maps])
    sim = similarity(student_maps.float(), stacked, kind=kind, clip=clip)
    weights = teacher_weights(sim, tau, rescale=rescale)
    stats = weight_statistics(weights, sim, bins=bins)
    return {"similarity": sim, "weights": weights, "teacher_maps": stacked, **stats}


# --------------------------------------------------------------------------------------
# Inference


def evaluate_clean(model: nn.Module, images: torch.Tensor, labels: torch.Tensor | np.ndarray,
                   batch_size: int, device: torch.device, num_classes: int = 10) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix of `model` on uint8 NCHW images."""
    pred = predict_logits(model, images, batch_size, device).argmax(1)
    return evaluate_predictions(pred.cpu(), labels, num_classes)


class _FusedPredictor:
    """Several CIFAR ResNets of one depth evaluated as one network (models/fused.py): on a GPU one
    pass serves all of them instead of one launch-bound pass each; outputs are each model's own."""

    def __init__(self, models: Sequence[nn.Module], device: torch.device):
        self.fused = prepare_model(FusedCifarResNet.from_students(list(models)), device).eval()
        self.count = len(models)

    def __call__(self, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
        return predict_logits(self.fused, images, batch_size, device, batch_dim=1,
                              forward=lambda x: self.fused(x.unsqueeze(0).expand(self.count, *x.shape)))


def prediction_groups(models: Mapping[str, nn.Module], device: torch.device
                      ) -> list[tuple[list[str], Callable[[torch.Tensor, int, torch.device], torch.Tensor]]]:
    """Who is evaluated with whom: on CUDA, CIFAR ResNets of one depth share one fused network;
    on the CPU (where grouped convolutions gain nothing) every model runs alone. Each predictor
    maps (uint8 images, batch size, device) to logits [models, N, C]."""
    groups: dict[Any, list[str]] = {}
    for name, model in models.items():
        key = ("resnet", model.depth) if device.type == "cuda" and isinstance(model, CifarResNet) else name
        groups.setdefault(key, []).append(name)
    out = []
    for names in groups.values():
        if len(names) > 1:
            out.append((names, _FusedPredictor([models[n] for n in names], device)))
        else:
            model = models[names[0]]
            out.append((names, lambda x, bs, dev, m=model: predict_logits(m, x, bs, dev)[None]))
    return out


def corruption_table(models: Mapping[str, nn.Module], corrupted: Mapping[str, np.ndarray],
                     labels: np.ndarray, batch_size: int, device: torch.device,
                     progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """{model: {corruption: [accuracy at severity 1..5]}}; each corruption's images (NHWC uint8,
    severity blocks) are moved to the device once and shared by all models."""
    from tqdm.auto import tqdm

    y = device_labels(labels, device)
    out: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    groups = prediction_groups(models, device)
    for corruption in tqdm(list(corrupted), desc="CIFAR-10-C", disable=not progress, leave=False):
        images = corrupted[corruption]
        if images.shape[0] != y.shape[0]:
            raise MatekdError(f"CIFAR-10-C {corruption}: {images.shape[0]} images but {y.shape[0]} labels; "
                              "rerun `dvc repro corrupt`")
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = np.array(images)   # memory-mapped read-only .npy: torch wants a writable array
        x = to_device_tensor(images, device)
        for names, predict in groups:
            correct = (predict(x, batch_size, device).argmax(-1) == y).cpu()
            for name, row in zip(names, correct):
                out[name][corruption] = severity_accuracy(row).tolist()
        del x
    return out


def cams_in_batches(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int,
                    device: torch.device) -> torch.Tensor:
    """Grad-CAM maps [N,h,w] (fp32, detached) of uint8 NCHW images for the given classes."""
    maps = []
    for start in range(0, images.shape[0], batch_size):
        x = model_input(images[start:start + batch_size].to(device), device)
        maps.append(grad_cam(model, x, targets[start:start + batch_size].to(device)).float())
    return torch.cat(maps)


# --------------------------------------------------------------------------------------
# Labels and provenance


def dataset_label(manifest: Mapping[str, Any]) -> str:
    """The name numbers on this data must carry (shared/data/README.md): the canonical release,
    the JPEG q75 mirror, or another image folder."""
    source = manifest.get("source") if isinstance(manifest.get("source"), Mapping) else {}
    kind = manifest.get("source_kind") or source.get("kind")
    if kind == "cifar10-python":
        return "CIFAR-10 (canonical)"
    if kind == "image-folder":
        lossy = source.get("lossy_jpeg")
        if source.get("sha256") == JPEG_MIRROR_SHA256:
            return "CIFAR-10 (JPEG q75 mirror)"
        if lossy:
            return "CIFAR-10 (JPEG image folder; likely the q75 mirror)"
        if lossy is False:
            return "CIFAR-10 (image folder)"
        return "CIFAR-10 (image folder; maybe the JPEG q75 mirror)"
    return f"CIFAR-10 (unknown source: {kind})" if kind else "CIFAR-10 (unknown source)"


def corruption_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 identifying a CIFAR-10-C set: of its array hashes when the manifest records
    them, else of the manifest without its timings."""
    if manifest.get("array_sha256"):
        content: Any = {"arrays": manifest["array_sha256"], "labels": manifest.get("labels_sha256")}
    else:
        content = {k: v for k, v in manifest.items() if k not in ("seconds", "cpu_seconds", "wall_seconds")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def test_set_digest(manifest: Mapping[str, Any]) -> str:
    """sha256 identifying the prepared test split: of its image and label array hashes."""
    arrays = manifest.get("arrays") or {}
    content = {name: (arrays.get(name) or {}).get("sha256") for name in ("test_images", "test_labels")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def corruption_label(manifest: Mapping[str, Any]) -> str:
    kind = manifest.get("kind")
    if kind == "official":
        return "CIFAR-10-C (official)"
    if kind == "regenerated":
        return f"CIFAR-10-C (regenerated, seed {manifest.get('seed')})"
    return f"CIFAR-10-C ({kind or 'unknown origin'})"


# --------------------------------------------------------------------------------------
# Files


def _as_numpy(x: np.ndarray | torch.Tensor | Sequence) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_json_safe(value: Any) -> Any:
    """JSON-safe: arrays to lists, NaN/inf to None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): to_json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_json_safe(value.tolist())
    if isinstance(value, torch.Tensor):
        return to_json_safe(value.detach().cpu().tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def load_student(path: Path, default_architecture: str, device: torch.device) -> tuple[nn.Module, dict]:
    """A trained student in eval mode (architecture from the file's metadata, else the param)."""
    state, meta = load_tensors(path)
    architecture = meta.get("architecture", default_architecture)
    model = build_model(architecture)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MatekdError(f"{path} does not match the {architecture} architecture ({exc}); "
                          "rerun the distill/ablation stage that wrote it") from exc
    model = prepare_model(model, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {**meta, "architecture": architecture}


# --------------------------------------------------------------------------------------
# Figure


def gradcam_figure(images: np.ndarray, labels: np.ndarray, student_maps: torch.Tensor,
                   teacher_maps: torch.Tensor, sim: torch.Tensor, weights: torch.Tensor,
                   teacher_names: Sequence[str], class_names: Sequence[str], title: str):
    """Rows = images: the image, the student's map, each teacher's map (heat overlays), with
    similarity and weight under each teacher's map.

    Constrained layout reserves room for the figure title above the column labels (tight_layout
    ignores a suptitle, which then sat on the first row's labels)."""
    import textwrap

    plt = pyplot()

    rows, k = images.shape[0], len(teacher_names)
    size = images.shape[1]
    # Upsample every map to the image and scale each to [0,1] for display only.
    up = resize_maps(torch.cat([student_maps[None], teacher_maps]).float().cpu(), size)   # [1+K,R,H,W]
    up = up / up.flatten(-2).amax(-1).clamp_min(1e-8)[..., None, None]
    width = max(1.3 * (2 + k), 4.0)
    fig, axes = plt.subplots(rows, 2 + k, figsize=(width, 1.35 * rows + 0.7), dpi=80, squeeze=False,
                             layout="constrained")
    fig.get_layout_engine().set(w_pad=0.02, h_pad=0.02, wspace=0.02, hspace=0.02)
    headers = ["image", "student", *teacher_names]
    for r in range(rows):
        for c in range(2 + k):
            ax = axes[r, c]
            ax.imshow(images[r])
            if c > 0:
                ax.imshow(up[c - 1, r].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(headers[c], fontsize=7)
            if c == 0:
                ax.set_xlabel(str(class_names[int(labels[r])]), fontsize=6, labelpad=1)
            elif c > 1:
                j = c - 2
                ax.set_xlabel(f"s {float(sim[j, r]):.2f} w {float(weights[j, r]):.2f}", fontsize=6, labelpad=1)
    # ~15 characters of 8-pt text per inch: wrap so a long title never runs off the figure.
    fig.suptitle(textwrap.fill(title, max(int(15 * width), 30)), fontsize=8)
    return fig


