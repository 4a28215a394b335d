"""Batched Grad-CAM (one backward per batch), its closed form, and map resizing/normalisation.

Grad-CAM (method.md): for CAM-layer activations A [B,Ch,h,w] and a target class c_b per
sample, G = d(sum_b z_{b,c_b})/dA, alpha = mean_{h,w} G, M = ReLU(sum_ch alpha_ch A_ch).
Summing the selected logits over the batch gives every sample's gradient in one backward
pass because, with no batch statistics after the CAM layer (eval mode, or a GAP + linear
head), z_b depends only on sample b's activations.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "gradcam_from_activations",
    "closed_form_cam",
    "model_cam",
    "grad_cam",
    "resize_maps",
    "normalize_maps",
]


def _check_targets(activations: Tensor, logits: Tensor, targets: Tensor) -> None:
    if activations.dim() != 4:
        raise ValueError(f"activations must be [B,Ch,h,w], got shape {tuple(activations.shape)}")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B,C], got shape {tuple(logits.shape)}")
    batch = activations.shape[0]
    if logits.shape[0] != batch or targets.shape != (batch,):
        raise ValueError(f"batch sizes differ: activations {tuple(activations.shape)}, "
                         f"logits {tuple(logits.shape)}, targets {tuple(targets.shape)}")


def gradcam_from_activations(activations: Tensor, logits: Tensor, targets: Tensor,
                             create_graph: bool = False) -> Tensor:
    """Grad-CAM maps [B,h,w] by one autograd call for the whole batch.

    Uses `torch.autograd.grad`, so no parameter's `.grad` is touched. The graph is
    retained so the caller can still backpropagate a loss through `logits`. With
    `create_graph=False` the map is detached; with `create_graph=True` it is
    differentiable (through both A and alpha) w.r.t. everything upstream.
    """
    _check_targets(activations, logits, targets)
    if not activations.requires_grad:
        raise ValueError("activations do not require grad: run forward_cam with autograd enabled "
                         "(grad_cam does this for you)")
    selected = logits.gather(1, targets.long().view(-1, 1)).sum()
    (grads,) = torch.autograd.grad(selected, activations, retain_graph=True,
                                   create_graph=create_graph)
    alpha = grads.mean(dim=(2, 3))                     # [B,Ch]
    maps = torch.relu(torch.einsum("bc,bchw->bhw", alpha, activations))
    return maps if create_graph else maps.detach()


def closed_form_cam(activations: Tensor, linear: nn.Linear | Tensor, targets: Tensor) -> Tensor:
    """CAM for a GAP + linear head: ReLU(sum_ch W[c_b,ch] A_ch) / (h*w), shape [B,h,w].

    Equals Grad-CAM there (dz_c/dA_{ch,i,j} = W[c,ch]/(h*w) everywhere), with no backward
    pass; differentiable w.r.t. the activations and W. `linear` may be the head or its weight.
    """
    if activations.dim() != 4:
        raise ValueError(f"activations must be [B,Ch,h,w], got shape {tuple(activations.shape)}")
    weight = linear.weight if isinstance(linear, nn.Module) else linear
    if weight.dim() != 2 or weight.shape[1] != activations.shape[1]:
        raise ValueError(f"linear weight {tuple(weight.shape)} does not match "
                         f"{activations.shape[1]} activation channels")
    if targets.shape != (activations.shape[0],):
        raise ValueError(f"targets {tuple(targets.shape)} do not match batch {activations.shape[0]}")
    h, w = activations.shape[-2:]
    rows = weight[targets.long()]                      # [B,Ch]
    return torch.relu(torch.einsum("bc,bchw->bhw", rows, activations)) / (h * w)


def model_cam(model: nn.Module, activations: Tensor, logits: Tensor, targets: Tensor,
              create_graph: bool = False) -> Tensor:
    """Grad-CAM of `model`'s CAM layer: the closed form when `model.cam_linear` is set,
    otherwise autograd. `create_graph=True` returns a differentiable map (student);
    `False` returns a detached one."""
    linear = getattr(model, "cam_linear", None)
    if linear is not None:
        _check_targets(activations, logits, targets)
        maps = closed_form_cam(activations, linear, targets)
        return maps if create_graph else maps.detach()
    return gradcam_from_activations(activations, logits, targets, create_graph=create_graph)


def grad_cam(model: nn.Module, images: Tensor, targets: Tensor | None = None,
             create_graph: bool = False, *, return_logits: bool = False
             ) -> Tensor | tuple[Tensor, Tensor]:
    """Grad-CAM maps [B,h,w] of `model` in eval mode for `images`.

    `targets=None` uses the predicted classes. Restores every submodule's train/eval flag,
    leaves BatchNorm statistics and all `.grad` tensors unchanged, and enables autograd
    locally so it also works when called under `torch.no_grad()`/`inference_mode()`.
    With `return_logits=True` returns `(maps, logits)`.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():
            if images.is_inference():
                images = images.clone()                # inference tensors cannot enter autograd
            if getattr(model, "cam_linear", None) is None and not images.requires_grad:
                # A (partly) frozen model may give activations without a graph; rooting the
                # graph at a detached copy of the input makes dz/dA available regardless.
                images = images.detach().requires_grad_(True)
            logits, activations = model.forward_cam(images)
            if targets is None:
                targets = logits.detach().argmax(dim=1)
            maps = model_cam(model, activations, logits, targets.to(logits.device),
                             create_graph=create_graph)
    finally:
        for module, training in modes:
            module.training = training
    if return_logits:
        return maps, (logits if create_graph else logits.detach())
    return maps


def resize_maps(maps: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear resize (align_corners=False) of maps [..., h, w] to [..., size, size]."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if maps.dim() < 2:
        raise ValueError(f"maps must have at least 2 dims [..., h, w], got {tuple(maps.shape)}")
    h, w = maps.shape[-2:]
    if (h, w) == (out_h, out_w):
        return maps
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, h, w)
    resized = F.interpolate(flat, size=(out_h, out_w), mode="bilinear", align_corners=False)
    return resized.reshape(*lead, out_h, out_w)


def normalize_maps(maps: Tensor, kind: Literal["max", "l2"] = "max", eps: float = 1e-8) -> Tensor:
    """Per-map normalisation over the last two dims: `max` divides by the largest absolute
    value (the maximum for ReLU'd maps), `l2` by the L2 norm; the divisor is clamped at
    `eps` so all-zero maps stay zero."""
    flat = maps.flatten(-2)
    if kind == "max":
        scale = flat.abs().amax(dim=-1)
    elif kind == "l2":
        scale = flat.norm(dim=-1)
    else:
        raise ValueError(f"map normalisation must be 'max' or 'l2', got {kind!r}")
    return maps / scale.clamp_min(eps)[..., None, None]


def to_student_grid(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """Check shapes ([B,h,w] vs [K,B,h',w']) and resize teacher maps to the student grid."""
    if student_maps.dim() != 3 or teacher_maps.dim() != 4:
        raise ValueError(f"expected student maps [B,h,w] and teacher maps [K,B,h,w], got "
                         f"{tuple(student_maps.shape)} and {tuple(teacher_maps.shape)}")
    if teacher_maps.shape[1] != student_maps.shape[0]:
        raise ValueError(f"teacher maps {tuple(teacher_maps.shape)} do not match the student "
                         f"batch of {student_maps.shape[0]}")
    return resize_maps(teacher_maps, tuple(student_maps.shape[-2:]))
