"""Loss terms per sample, and `method_loss`: a method's terms and total, the one place a student's
loss is computed (training, bench, the example and the tests call it).

Each term is per sample [N], computed in at least float32 (autocast's bf16 inputs are widened);
teacher logits, teacher maps and weights are detached; the student's map keeps its graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .attribution import normalize_maps, to_student_grid

__all__ = ["LossInputs", "cross_entropy", "distillation", "attribution_error", "method_loss"]


@dataclass
class LossInputs:
    """What a method's loss may read, for N samples (S students x B samples, student-major) and
    K teachers. Teacher entries are None for a method without teachers; maps are None for a
    method that does not read them."""

    student_logits: Tensor                   # [N,C], at least float32
    labels: Tensor                           # [N]
    teacher_logits: Tensor | None = None     # [K,N,C]
    weights: Tensor | None = None            # [K,N], each column sums to 1
    similarity: Tensor | None = None         # [K,N] when the weighting computes one
    student_maps: Tensor | None = None       # [N,h,w], with a graph when the method asks for one
    teacher_maps: Tensor | None = None       # [K,N,h',w'] shifted with each view's augmentation


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def cross_entropy(student_logits: Tensor, labels: Tensor) -> Tensor:
    """CE(s_b, y_b) per sample [N]."""
    return F.cross_entropy(_wide(student_logits), labels, reduction="none")


def distillation(student_logits: Tensor, teacher_logits: Tensor, weights: Tensor, temperature: float) -> Tensor:
    """T^2 KL(p_b || softmax(s_b/T)) per sample [N], with p_b = sum_k w_kb softmax(t_kb/T)."""
    if teacher_logits is None or weights is None:
        raise ValueError("the KD term needs teacher logits and weights")
    if not temperature > 0:
        raise ValueError(f"kd_temperature must be > 0, got {temperature}")
    student_logits = _wide(student_logits)
    if teacher_logits.dim() != 3 or teacher_logits.shape[1:] != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} must be [K,B,C] with "
                         f"[B,C] = {tuple(student_logits.shape)}")
    if weights.shape != teacher_logits.shape[:2]:
        raise ValueError(f"weights {tuple(weights.shape)} must be [K,B] = {tuple(teacher_logits.shape[:2])}")
    dtype = student_logits.dtype
    temp = float(temperature)
    teacher_probs = torch.softmax(teacher_logits.detach().to(dtype) / temp, -1)
    target = (weights.detach().to(dtype).unsqueeze(-1) * teacher_probs).sum(dim=0)      # p [B,C]
    log_student = F.log_softmax(student_logits / temp, dim=-1)
    # kl_div(log q, p) = sum p (log p - log q), with 0 log 0 = 0.
    return temp * temp * F.kl_div(log_student, target, reduction="none").sum(dim=-1)


def attribution_error(student_maps: Tensor, teacher_maps: Tensor, weights: Tensor,
                      map_norm: Literal["max", "l2"] = "max") -> Tensor:
    """Mean over cells of (n(M_s,b) - sum_k w_kb n(M_tk,b))^2 per sample [N]; teacher maps are
    resized to the student grid, n normalises each map (`max` or `l2`)."""
    if student_maps is None or teacher_maps is None or weights is None:
        raise ValueError("the attribution loss needs student maps, teacher maps and weights")
    student_maps = _wide(student_maps)
    teacher = to_student_grid(student_maps, teacher_maps.detach()).to(student_maps.dtype)
    if weights.shape != teacher.shape[:2]:
        raise ValueError(f"weights {tuple(weights.shape)} do not match teacher maps {tuple(teacher.shape)}")
    w = weights.detach().to(student_maps.dtype)
    mixed = (w[:, :, None, None] * normalize_maps(teacher, map_norm)).sum(dim=0)
    return (normalize_maps(student_maps, map_norm) - mixed).pow(2).flatten(1).mean(dim=1)


def method_loss(method: Any, inputs: LossInputs, values: Any, students: int = 1) -> tuple[dict[str, Tensor], Tensor]:
    """A method's loss on N = students x B samples: ({term: its mean per student [S]}, the total
    per student [S] = sum over terms of coefficient x mean), terms in the order the method
    returns them. `values` holds the method's `distill.*` hyperparameters."""
    parts = method.loss(inputs, values)
    if not parts:
        raise ValueError(f"method {method.name!r} returned no loss term")
    unknown = set(parts) - set(method.terms)
    if unknown:
        raise ValueError(f"method {method.name!r} returned terms {sorted(unknown)} it does not declare "
                         f"(Method.terms = {method.terms})")
    means: dict[str, Tensor] = {}
    total: Tensor | None = None
    for name, (per_sample, coefficient) in parts.items():
        means[name] = per_sample.view(students, -1).mean(dim=1)
        weighted = coefficient * means[name]
        total = weighted if total is None else total + weighted
    assert total is not None
    return means, total
