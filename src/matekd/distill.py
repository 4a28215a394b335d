"""MATE-KD maths (method.md): map similarity, per-sample teacher weights, the loss.

Public API (documented in the README):
    similarity(student_maps, teacher_maps, kind="cosine", clip=False) -> [K,B]
    teacher_weights(similarity, tau, rescale=False) -> [K,B]
    confidence_weights(teacher_logits, labels) -> [K,B]            (CA-MKD)
    mate_kd_loss(student_logits, teacher_logits, labels, weights, student_maps, teacher_maps,
                 kd_temperature, ce_weight, attribution_weight, map_norm="max") -> dict
    loss_terms(...) -> dict of per-sample terms (the same maths, unreduced)
Weighting rules by name (the method table refers to them): WEIGHTING_RULES, weigh().
Helpers: tau_at_epoch / effective_tau / final_tau (the tau schedule), weight_statistics,
relative_entropy (logging, all tensors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from matekd.attribution import normalize_maps, resize_maps

__all__ = ["similarity", "teacher_weights", "confidence_weights", "mate_kd_loss", "loss_terms", "tau_at_epoch",
           "effective_tau", "final_tau", "weight_statistics", "histogram_edges", "relative_entropy", "WeightingInputs",
           "WEIGHTING_RULES", "register_weighting", "weigh"]

EPS = 1e-8


def _to_student_grid(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Check shapes ([B,h,w] vs [K,B,h',w']) and resize teacher maps to the student grid."""
    if student_maps.dim() != 3 or teacher_maps.dim() != 4:
        raise ValueError(f"expected student maps [B,h,w] and teacher maps [K,B,h,w], got "
                         f"{tuple(student_maps.shape)} and {tuple(teacher_maps.shape)}")
    if teacher_maps.shape[1] != student_maps.shape[0]:
        raise ValueError(f"teacher maps {tuple(teacher_maps.shape)} do not match the student "
                         f"batch of {student_maps.shape[0]}")
    return resize_maps(teacher_maps, tuple(student_maps.shape[-2:]))


def similarity(student_maps: Tensor, teacher_maps: Tensor,
               kind: Literal["cosine", "pearson"] = "cosine", clip: bool = False) -> Tensor:
    """Per-teacher, per-sample similarity [K,B] of flattened maps.

    `cosine`: cosine of the raw maps; `pearson`: cosine of mean-centred maps (Pearson r).
    Teacher maps are resized (bilinear) to the student grid first; `clip` sets negatives
    to 0. A zero map (after centring, for pearson) has similarity 0.
    """
    teacher = _to_student_grid(student_maps, teacher_maps)
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


def loss_terms(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
               weights: Tensor | None, student_maps: Tensor | None, teacher_maps: Tensor | None,
               kd_temperature: float, attribution: bool = True, map_norm: Literal["max", "l2"] = "max"
               ) -> dict[str, Tensor]:
    """Per-sample MATE-KD terms [B]: {ce, kd, attr} (kd/attr absent when not computed).

    ce_b = CE(s_b, y_b); kd_b = T^2 KL(p_b || softmax(s_b/T)) with p_b = sum_k w_kb softmax(t_kb/T);
    attr_b = mean over cells of (n(M_s,b) - sum_k w_kb n(M_tk,b))^2. Their batch means are the
    terms of `mate_kd_loss`; students trained together keep one row per student this way.
    Weights, teacher logits and teacher maps are detached; the student map keeps its graph.
    """
    if not kd_temperature > 0:
        raise ValueError(f"kd_temperature must be > 0, got {kd_temperature}")
    # Low-precision (AMP) inputs are reduced in at least float32.
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_logits = student_logits.to(dtype)
    terms = {"ce": F.cross_entropy(student_logits, labels, reduction="none")}
    if teacher_logits is not None and weights is not None:
        if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must be [K,B,C] with "
                             f"[B,C] = {tuple(student_logits.shape)}")
        if weights.shape != teacher_logits.shape[:2]:
            raise ValueError(f"weights {tuple(weights.shape)} must be [K,B] = "
                             f"{tuple(teacher_logits.shape[:2])}")
        w = weights.detach().to(student_logits.dtype)
        temp = float(kd_temperature)
        teacher_probs = torch.softmax(teacher_logits.detach().to(student_logits.dtype) / temp, -1)
        target = (w.unsqueeze(-1) * teacher_probs).sum(dim=0)          # p [B,C]
        log_student = F.log_softmax(student_logits / temp, dim=-1)
        # kl_div(log q, p) = sum p (log p - log q), with 0 log 0 = 0.
        terms["kd"] = temp * temp * F.kl_div(log_student, target, reduction="none").sum(dim=-1)
    if attribution and student_maps is not None and teacher_maps is not None:
        if weights is None:
            raise ValueError("the attribution loss needs teacher weights")
        student_maps = student_maps.to(torch.promote_types(student_maps.dtype, torch.float32))
        teacher = _to_student_grid(student_maps, teacher_maps.detach()).to(student_maps.dtype)
        if weights.shape != teacher.shape[:2]:
            raise ValueError(f"weights {tuple(weights.shape)} do not match teacher maps "
                             f"{tuple(teacher.shape)}")
        w = weights.detach().to(student_maps.dtype)
        mixed = (w[:, :, None, None] * normalize_maps(teacher, map_norm)).sum(dim=0)
        terms["attr"] = (normalize_maps(student_maps, map_norm) - mixed).pow(2).flatten(1).mean(dim=1)
    return terms


def mate_kd_loss(student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                 weights: Tensor | None, student_maps: Tensor | None,
                 teacher_maps: Tensor | None, kd_temperature: float, ce_weight: float,
                 attribution_weight: float, map_norm: Literal["max", "l2"] = "max"
                 ) -> dict[str, Tensor]:
    """MATE-KD loss terms as 0-dim tensors: {total, ce, kd, attr}.

    p_b = sum_k w_kb softmax(t_kb/T); kd = T^2 mean_b KL(p_b || softmax(s_b/T));
    attr = mean over samples and cells of (n(M_s) - sum_k w_kb n(M_tk))^2;
    total = ce_weight*ce + (1-ce_weight)*kd + attribution_weight*attr.
    Weights, teacher logits and teacher maps are detached; the student map keeps its graph.
    attr is zero (no map work) when attribution_weight == 0 or a map argument is None.
    Teacher logits/weights may be None only when ce_weight == 1 (plain CE); kd is then 0.
    """
    if (teacher_logits is None or weights is None) and ce_weight != 1:
        raise ValueError("teacher logits and weights are required unless ce_weight == 1")
    per_sample = loss_terms(student_logits, teacher_logits, labels, weights, student_maps, teacher_maps,
                            kd_temperature, attribution=attribution_weight != 0, map_norm=map_norm)
    zero = per_sample["ce"].new_zeros(())
    ce = per_sample["ce"].mean()
    kd = per_sample["kd"].mean() if "kd" in per_sample else zero
    attr = per_sample["attr"].mean() if "attr" in per_sample else zero
    total = ce_weight * ce + (1.0 - ce_weight) * kd + attribution_weight * attr
    return {"total": total, "ce": ce, "kd": kd, "attr": attr}


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


# --------------------------------------------------------------------------------------
# Weighting rules by name: the method table (matekd.methods) names one per method.


@dataclass
class WeightingInputs:
    """What a weighting rule may read, for N samples and K teachers (all detached)."""

    teacher_logits: Tensor                 # [K,N,C] on the augmented views
    labels: Tensor                         # [N]
    student_maps: Tensor | None = None     # [N,h,w]
    teacher_maps: Tensor | None = None     # [K,N,h',w'] shifted with each view's augmentation
    tau: float = 1.0
    similarity: Literal["cosine", "pearson"] = "cosine"
    clip: bool = False
    rescale: bool = False


WeightingRule = Callable[[WeightingInputs], tuple[Tensor, Tensor | None]]
WEIGHTING_RULES: dict[str, WeightingRule] = {}


def register_weighting(name: str) -> Callable[[WeightingRule], WeightingRule]:
    """Register a weighting rule: inputs -> (weights [K,N] summing to 1 over K, similarity
    [K,N] or None)."""
    def add(rule: WeightingRule) -> WeightingRule:
        if name in WEIGHTING_RULES:
            raise ValueError(f"weighting rule {name!r} is already registered")
        WEIGHTING_RULES[name] = rule
        return rule
    return add


def weigh(rule: str, inputs: WeightingInputs) -> tuple[Tensor, Tensor | None]:
    try:
        fn = WEIGHTING_RULES[rule]
    except KeyError:
        raise ValueError(f"unknown weighting rule {rule!r}; known: {', '.join(WEIGHTING_RULES)}") from None
    return fn(inputs)


@register_weighting("one-hot")
@register_weighting("equal")
def _equal(inputs: WeightingInputs) -> tuple[Tensor, Tensor | None]:
    """1/K each (`one-hot` is the same rule for a method that reads a single teacher)."""
    k, n = inputs.teacher_logits.shape[:2]
    return inputs.teacher_logits.new_full((k, n), 1.0 / k, dtype=torch.float32), None


@register_weighting("attribution")
def _attribution(inputs: WeightingInputs) -> tuple[Tensor, Tensor | None]:
    if inputs.student_maps is None or inputs.teacher_maps is None:
        raise ValueError("attribution weighting needs student and teacher maps")
    sim = similarity(inputs.student_maps.detach(), inputs.teacher_maps, kind=inputs.similarity, clip=inputs.clip)
    return teacher_weights(sim, inputs.tau, rescale=inputs.rescale), sim


@register_weighting("confidence")
def _confidence(inputs: WeightingInputs) -> tuple[Tensor, Tensor | None]:
    return confidence_weights(inputs.teacher_logits, inputs.labels), None


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
