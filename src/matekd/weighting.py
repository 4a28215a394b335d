"""Per-sample teacher weighting: Grad-CAM map similarity, softmax weights with the similarity
temperature and its schedule, CA-MKD's confidence weights, and the weight statistics that
training logs (docs/method.md states the formulas).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .attribution import to_student_grid

__all__ = ["similarity", "teacher_weights", "confidence_weights", "equal_weights", "WeightingInputs", "tau_at_epoch",
           "effective_tau", "final_tau", "weight_statistics", "histogram_edges", "relative_entropy"]

EPS = 1e-8


def similarity(student_maps: Tensor, teacher_maps: Tensor,
               kind: Literal["cosine", "pearson"] = "cosine", clip: bool = False) -> Tensor:
    """Per-teacher, per-sample similarity [K,B] of flattened maps.

    `cosine`: cosine of the raw maps; `pearson`: cosine of mean-centred maps (Pearson r).
    Teacher maps are resized (bilinear) to the student grid first; `clip` sets negatives
    to 0. A zero map (after centring, for pearson) has similarity 0.
    """
    teacher = to_student_grid(student_maps, teacher_maps)
    s = student_maps.flatten(-2).to(teacher.dtype)     # [B,N]
    t = teacher.flatten(-2)                            # [K,B,N]
    if kind == "pearson":
        s = s - s.mean(dim=-1, keepdim=True)
        t = t - t.mean(dim=-1, keepdim=True)
    elif kind != "cosine":
        raise ValueError(f"similarity kind must be 'cosine' or 'pearson', got {kind!r}")
    dot = (t * s.unsqueeze(0)).sum(dim=-1)
    norms = t.norm(dim=-1) * s.norm(dim=-1).unsqueeze(0)
    sim = dot / norms.clamp_min(EPS)
    return sim.clamp_min(0.0) if clip else sim


def teacher_weights(similarity: Tensor, tau: float, rescale: bool = False) -> Tensor:
    """Softmax over teachers (dim 0) of similarity/tau; detached, each column sums to 1.

    `rescale` first divides each sample's similarities by their maximum over teachers
    (clamped at EPS; meant for non-negative similarities: cosine or clipped).
    """
    if similarity.dim() != 2:
        raise ValueError(f"similarity must be [K,B], got {tuple(similarity.shape)}")
    if not tau > 0:
        raise ValueError(f"similarity temperature tau must be > 0, got {tau}")
    sim = similarity.detach()
    if rescale:
        sim = sim / sim.amax(dim=0, keepdim=True).clamp_min(EPS)
    return torch.softmax(sim / tau, dim=0)


def confidence_weights(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """CA-MKD teacher weights [K,B] (Zhang, Chen and Wang, ICASSP 2022; Rorozhl/CA-MKD,
    distiller_zoo/CAMKD.py): w_kb = (1 - softmax_k(CE_kb)) / (K - 1), with CE_kb the
    cross-entropy of teacher k's logits (temperature 1) on the true label. A confident, correct
    teacher (low CE) weighs more; each column sums to 1; detached. One teacher gets weight 1.
    """
    if teacher_logits.dim() != 3:
        raise ValueError(f"teacher logits must be [K,B,C], got {tuple(teacher_logits.shape)}")
    k, b, c = teacher_logits.shape
    if labels.shape != (b,):
        raise ValueError(f"labels {tuple(labels.shape)} do not match the batch of {b}")
    logits = teacher_logits.detach().float()
    if k == 1:
        return logits.new_ones(1, b)
    ce = F.cross_entropy(logits.reshape(k * b, c), labels.repeat(k), reduction="none").view(k, b)
    return (1.0 - torch.softmax(ce, dim=0)) / (k - 1)


@dataclass
class WeightingInputs:
    """What a method's weighting rule may read, for N samples and K teachers (all detached)."""

    teacher_logits: Tensor                 # [K,N,C] on the augmented views
    labels: Tensor                         # [N]
    student_maps: Tensor | None = None     # [N,h,w]
    teacher_maps: Tensor | None = None     # [K,N,h',w'] shifted with each view's augmentation


def equal_weights(teacher_logits: Tensor) -> Tensor:
    """1/K for each of K teachers and N samples [K,N] (float32)."""
    k, n = teacher_logits.shape[:2]
    return teacher_logits.new_full((k, n), 1.0 / k, dtype=torch.float32)


def tau_at_epoch(epoch: int, tau_start: float, tau_end: float | None = None,
                 schedule_epochs: int | None = None) -> float:
    """Linear similarity-temperature schedule: tau_start at epoch 0, tau_end from
    `schedule_epochs` on; constant tau_start when no schedule is set."""
    if (tau_end is None) != (schedule_epochs is None):
        raise ValueError("tau_end and schedule_epochs must be given together")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if tau_end is None or schedule_epochs is None:
        return float(tau_start)
    if schedule_epochs < 1:
        raise ValueError(f"schedule_epochs must be >= 1, got {schedule_epochs}")
    frac = min(epoch / schedule_epochs, 1.0)
    return float(tau_start + (tau_end - tau_start) * frac)


def effective_tau(distill: Any, epoch: int) -> float:
    """The similarity temperature a student uses in `epoch` (0-based) under the `distill.*`
    settings (similarity_temperature[_end], similarity_schedule_epochs): the one place that
    reads the schedule, for the training step and for evaluation."""
    return tau_at_epoch(epoch, distill.similarity_temperature, distill.similarity_temperature_end,
                        distill.similarity_schedule_epochs)


def final_tau(distill: Any) -> float:
    """The temperature of the last training epoch: what a trained student was last weighted with."""
    return effective_tau(distill, max(distill.recipe.epochs - 1, 0))


def weight_statistics(weights: Tensor, similarity: Tensor | None, bins: int) -> dict[str, Tensor]:
    """Teacher-weight diagnostics as tensors (the caller syncs once when logging).

    weights [K, ..., B]: K teachers, optional batch dims (e.g. students trained together), B
    samples; statistics reduce over the samples. Keys: weight_mean/weight_std [K, ...],
    dominant_fraction [K, ...] (share of samples where the teacher has the largest weight),
    similarity_mean/similarity_std [K, ...] (population std; only with a similarity),
    entropy [...] (mean over samples, nats), entropy_relative [...] (entropy / log K: 1 for
    equal weights, 0 for one-hot), histogram [K, ..., bins] counts over [0,1] (a weight of
    exactly 1 falls in the last bin), whose edges are histogram_edges(bins) (not made here:
    this runs every training step, and the edges never change).
    """
    if weights.dim() < 2 or (similarity is not None and similarity.shape != weights.shape):
        raise ValueError(f"weights {tuple(weights.shape)} must be [K,...,B]"
                         + (f" like similarity {tuple(similarity.shape)}" if similarity is not None else ""))
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    w = weights.detach().float()
    k = w.shape[0]
    dominant = F.one_hot(w.argmax(dim=0), num_classes=k).float().mean(dim=-2).movedim(-1, 0)
    entropy = -torch.special.xlogy(w, w).sum(dim=0).mean(dim=-1)
    index = (w.clamp(0.0, 1.0) * bins).floor().long().clamp(0, bins - 1)   # [K,...,B]
    # one_hot + sum instead of scatter/bincount: deterministic on every device.
    histogram = F.one_hot(index, num_classes=bins).sum(dim=-2)
    out = {
        "weight_mean": w.mean(dim=-1),
        "weight_std": w.std(dim=-1, correction=0),
        "dominant_fraction": dominant,
        "entropy": entropy,
        "entropy_relative": relative_entropy(entropy, k),
        "histogram": histogram,
    }
    if similarity is not None:
        sim = similarity.detach().float()
        out["similarity_mean"] = sim.mean(dim=-1)
        out["similarity_std"] = sim.std(dim=-1, correction=0)
    return out


def histogram_edges(bins: int) -> Tensor:
    """The bin edges [bins+1] of weight_statistics' histogram: equal bins over [0, 1]."""
    return torch.linspace(0.0, 1.0, bins + 1)


def relative_entropy(entropy: Tensor | float, teachers: int) -> Tensor | float:
    """Mean weight entropy as a fraction of the uniform distribution's (log K): 1 means the
    weights are equal (the weighting does nothing), 0 that one teacher takes every sample."""
    if teachers < 2:
        return entropy * 0.0 + 1.0
    return entropy / math.log(teachers)
