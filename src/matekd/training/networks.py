"""S students held as one module: `OneStudent` (any architecture, exactly as trained alone) or
`FusedStudents` (S CIFAR ResNets as one network of grouped convolutions, each exactly as if
alone: models/fused.py proves it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..attribution import model_cam
from ..errors import ParamsError
from ..models.fused import FusedCifarResNet
from ..models.resnet import CifarResNet
from .loop import predict_logits


def widened(t: Tensor) -> Tensor:
    """At least float32 (autocast's bf16 is widened; a float64 check keeps float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class Students(nn.Module):
    """S students as one module. forward_cam(inputs [S*B, 3, H, W]) -> (logits [S,B,C],
    CAM-layer activations [S,B,Ch,h,w]); cam(...) -> maps [S,B,h,w]."""

    num_students: int

    def forward_cam(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def cam(self, activations: Tensor, logits: Tensor, targets: Tensor, create_graph: bool) -> Tensor:
        raise NotImplementedError

    def predict(self, inputs: Tensor) -> Tensor:
        """Logits [S, N, C] of every student for the same normalised inputs [N, 3, H, W]."""
        raise NotImplementedError

    def student_state_dicts(self) -> list[dict[str, Tensor]]:
        raise NotImplementedError


class OneStudent(Students):
    """One student of any architecture."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.num_students = 1

    def forward_cam(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        logits, activations = self.model.forward_cam(inputs)
        return logits[None], activations[None]

    def cam(self, activations: Tensor, logits: Tensor, targets: Tensor, create_graph: bool) -> Tensor:
        return model_cam(self.model, widened(activations[0]), widened(logits[0]), targets[0],
                         create_graph=create_graph)[None]

    def predict(self, inputs: Tensor) -> Tensor:
        return self.model(inputs)[None]

    def student_state_dicts(self) -> list[dict[str, Tensor]]:
        return [{k: v.detach().clone() for k, v in self.model.state_dict().items()}]


class FusedStudents(Students):
    """S CIFAR ResNets of one depth as one network of grouped convolutions."""

    def __init__(self, students: Sequence[nn.Module]):
        super().__init__()
        self.fused = FusedCifarResNet.from_students(list(students))
        self.num_students = len(students)

    def forward_cam(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        s = self.num_students
        return self.fused.forward_cam(inputs.view(s, inputs.shape[0] // s, *inputs.shape[1:]))

    def cam(self, activations: Tensor, logits: Tensor, targets: Tensor, create_graph: bool) -> Tensor:
        maps = self.fused.cam(widened(activations), targets)
        return maps if create_graph else maps.detach()

    def predict(self, inputs: Tensor) -> Tensor:
        return self.fused(inputs.unsqueeze(0).expand(self.num_students, *inputs.shape))

    def student_state_dicts(self) -> list[dict[str, Tensor]]:
        return self.fused.student_state_dicts()


def as_one_module(students: Sequence[nn.Module]) -> Students:
    """One student as is; several as one fused network (CIFAR ResNets of one depth only)."""
    if len(students) == 1:
        return OneStudent(students[0])
    if not all(isinstance(s, CifarResNet) for s in students):
        raise ParamsError("ablation.group_size > 1 trains students together as one network of grouped "
                          "convolutions, which needs CIFAR ResNet students (distill.student: resnet20, resnet56 "
                          "or resnet110); set ablation.group_size: 1 for other architectures")
    return FusedStudents(students)


def predict_all(students: Students, images_uint8: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Logits [S, N, C] (float) of every student on uint8 NCHW images, in eval mode."""
    return predict_logits(students, images_uint8, batch_size, device, forward=students.predict, batch_dim=1)
