"""The optimisation step of students trained together, generic over methods.

Per step: every student's logits and (when a method reads maps) its closed-form Grad-CAM map in
one call; then, for the students of each method together, their teachers' outputs, the method's
weights (`Method.weigh`) and its loss (`losses.method_loss`); the students' totals are summed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import ParamsError
from ..losses import LossInputs, method_loss
from ..methods import Method
from ..params import DistillParams
from ..weighting import WeightingInputs, weight_statistics
from .loop import Batch, StepOutput
from .networks import Students, widened
from .teacher_outputs import TeacherOutputs

WEIGHT_STATS = ("weight_mean", "weight_std", "dominant_fraction")
SIMILARITY_STATS = ("similarity_mean", "similarity_std")


class WeightHistogram:
    """Per-epoch teacher-weight histogram counts [K, m, bins] of m students, on the device."""

    def __init__(self, teachers: int, students: int, bins: int, device: torch.device):
        self.counts = torch.zeros(teachers, students, bins, device=device)

    def add(self, counts: Tensor) -> None:
        self.counts += counts

    def take(self) -> Tensor:
        counts = self.counts.clone()
        self.counts.zero_()
        return counts


@dataclass
class MethodStudents:
    """The students of one method within a group (they share every value they train with)."""

    method: Method
    values: DistillParams
    positions: list[int]             # the students' positions in the group
    teachers: list[int]              # positions in TeacherOutputs.names
    teacher_names: list[str]
    position_index: Tensor           # positions on the device
    teacher_rows: Tensor             # teachers as [K, 1] on the device
    histogram: WeightHistogram | None = None


def by_method(methods: Sequence[Method], values: Sequence[DistillParams], teachers: Sequence[Sequence[str]],
              outputs: TeacherOutputs, device: torch.device) -> list[MethodStudents]:
    """Gather the group's students (their methods, values and teachers, by position) by method."""
    if not len(methods) == len(values) == len(teachers):
        raise ValueError(f"{len(methods)} methods, {len(values)} values, {len(teachers)} teacher lists")
    positions_of: dict[str, list[int]] = {}
    for position, method in enumerate(methods):
        positions_of.setdefault(method.name, []).append(position)
    members = []
    for positions in positions_of.values():
        method, value, names = methods[positions[0]], values[positions[0]], list(teachers[positions[0]])
        shared = value.model_dump(exclude={"seed"})
        if any(values[p].model_dump(exclude={"seed"}) != shared for p in positions):
            raise ParamsError(f"students of method {method.name!r} in one group must share their values")
        rows = [outputs.names.index(n) for n in names]
        members.append(MethodStudents(
            method, value, positions, rows, names,
            torch.tensor(positions, dtype=torch.long, device=device),
            torch.tensor(rows, dtype=torch.long, device=device)[:, None],
            WeightHistogram(len(rows), len(positions), value.histogram_bins, device)
            if method.per_sample_weights else None))
    return members


class GroupStep:
    """step(batch, epoch) -> StepOutput for `students` (one module), grouped `by_method`."""

    def __init__(self, members: list[MethodStudents], students: Students, outputs: TeacherOutputs):
        self.members, self.students, self.outputs = members, students, outputs
        self.map_members = [m for m in members if m.method.maps]
        self.map_graph = any(m.method.needs_map_gradient(m.values) for m in self.map_members)
        self.layout: dict[str, int] = {}       # logged name -> its row in the step's table, fixed at step one
        self.placement: list[Tensor] = []      # per member: the table rows of its names, on the device

    def __call__(self, batch: Batch, epoch: int) -> StepOutput:
        logits, activations = self.students.forward_cam(batch.inputs)
        maps = self._student_maps(batch, logits, activations) if self.map_members else None
        total = logits.new_zeros((), dtype=widened(logits).dtype)
        blocks = []
        for member in self.members:
            names, rows, student_total = self._method_step(member, batch, epoch, logits, maps)
            blocks.append((member, names, rows))
            total = total + student_total.sum()
        terms = self._table(blocks, batch.student_count, total)
        return StepOutput(total, logits, terms["total"], terms)

    def _student_maps(self, batch: Batch, logits: Tensor, activations: Tensor) -> Tensor:
        """Every student's CAM in one call (cheap: the closed form), with its own target class."""
        targets = batch.labels.clone()
        for member in self.map_members:
            if member.values.student_target == "prediction":
                targets[member.position_index] = logits[member.position_index].detach().argmax(-1)
        return self.students.cam(activations, logits, targets, create_graph=self.map_graph)

    def _method_step(self, member: MethodStudents, batch: Batch, epoch: int, logits: Tensor, maps: Tensor | None
                     ) -> tuple[list[str], list[Tensor], Tensor]:
        """One method's students: their logged names, values [r, m] and totals [m]."""
        method, values, index = member.method, member.values, member.position_index
        m, b = len(member.positions), batch.labels.shape[1]
        inputs = LossInputs(widened(logits[index].flatten(0, 1)), batch.labels[index].reshape(-1))
        names: list[str] = []
        rows: list[Tensor] = []
        if method.has_kd:
            inputs.teacher_logits = self.outputs.logits(batch, index, member.teachers, member.teacher_rows)
            student_maps = None
            if method.maps:
                student_maps = maps[index].flatten(0, 1)                    # [m*B, h, w]
                inputs.student_maps = student_maps if method.needs_map_gradient(values) else student_maps.detach()
                inputs.teacher_maps = self.outputs.maps(batch, index, member.teachers)
            inputs.weights, inputs.similarity = method.weigh(WeightingInputs(
                inputs.teacher_logits, inputs.labels, student_maps.detach() if student_maps is not None else None,
                inputs.teacher_maps), values, epoch)
            if member.histogram is not None:
                names, rows = self._weight_statistics(member, inputs, m, b)
        means, student_total = method_loss(method, inputs, values, students=m)
        names += [*means, "total"]
        rows += [value[None] for value in means.values()] + [student_total[None]]
        return names, rows, student_total

    def _weight_statistics(self, member: MethodStudents, inputs: LossInputs, m: int, b: int
                           ) -> tuple[list[str], list[Tensor]]:
        k = len(member.teachers)
        sim = inputs.similarity
        stats = weight_statistics(inputs.weights.view(k, m, b), sim.view(k, m, b) if sim is not None else None,
                                  bins=member.values.histogram_bins)
        member.histogram.add(stats["histogram"])
        names = ["entropy", "entropy_relative"]
        rows = [stats["entropy"][None], stats["entropy_relative"][None]]
        for stat in WEIGHT_STATS + (SIMILARITY_STATS if sim is not None else ()):
            names += [f"{stat}/{teacher}" for teacher in member.teacher_names]
            rows.append(stats[stat])                                        # [K, m]
        return names, rows

    def _table(self, blocks: list, students: int, total: Tensor) -> dict[str, Tensor]:
        """Every member's logged values as one [T, S] table, each member's [T_m, m] block written
        with one index_put (not one index_copy_ per term and teacher: ~20 launches per method)."""
        if not self.layout:
            for _, names, _ in blocks:
                self.layout.update((name, len(self.layout)) for name in names if name not in self.layout)
            self.placement.extend(torch.tensor([self.layout[n] for n in names], device=total.device)[:, None]
                                  for _, names, _ in blocks)
        table = total.new_zeros(len(self.layout), students)
        for (member, _, rows), where in zip(blocks, self.placement, strict=True):
            table[where, member.position_index[None, :]] = torch.cat(rows).detach().to(table.dtype)
        return dict(zip(self.layout, table.unbind(0)))                     # views: no copies


def logged_terms(method: Method, teachers: Sequence[str]) -> set[str]:
    """The loss terms and weight statistics a method's step produces (and its run logs)."""
    names = {"total", *method.terms}
    if method.per_sample_weights:
        names |= {"entropy", "entropy_relative"}
        stats = WEIGHT_STATS + (SIMILARITY_STATS if method.similarity_statistics else ())
        names |= {f"{stat}/{t}" for stat in stats for t in teachers}
    return names
