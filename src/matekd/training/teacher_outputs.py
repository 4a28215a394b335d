"""What students read from their teachers, resident on the device: logits on each augmented view
(gathered from the per-variant cache, or computed online) and cached Grad-CAM maps shifted with
each view's crop and flip."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..augment import shift_maps, variant_index
from ..cache import load_cache
from ..data.prepared import Prepared
from ..errors import CacheError
from ..params import Params
from ..teachers import load_teacher, teacher_hashes
from .loop import PAD, Batch, image_variants


@dataclass
class TeacherOutputs:
    """Everything the student step needs from the teachers, resident on the device."""

    names: list[str]
    models: list[nn.Module] = field(default_factory=list)           # online logits
    train_maps: Tensor | None = None                                  # [T, N, h, w] fp16
    train_logits: Tensor | None = None                                # [T, N, V, C] fp16
    train_logits_mask: Tensor | None = None                           # [T, N, V] variants cached
    hashes: dict[str, str] = field(default_factory=dict)              # teacher weights sha256

    def check_coverage(self, seed: int, epochs: int) -> None:
        """Refuse cached logits that lack a variant this run's seed and epochs will gather."""
        if self.train_logits_mask is None:
            return
        mask = self.train_logits_mask.cpu()
        n = mask.shape[1]
        variants = image_variants(seed, epochs, n)
        covered = mask[:, torch.arange(n).expand_as(variants), variants]
        if not bool(covered.all()):
            raise CacheError(
                f"the cached teacher logits do not cover seed {seed} for {epochs} epochs (built with "
                "cache.logit_variants: used for other seeds or fewer epochs); set cache.logit_variants: all, "
                "or list the seed in ablation.seeds, then rerun `dvc repro cache`")

    def logits(self, batch: Batch, students: Tensor, teachers: Sequence[int], rows: Tensor) -> Tensor:
        """Teacher logits [K, m*B, C] (float) on the augmented views of the students at positions
        `students` of the batch; `rows` is `teachers` as a [K, 1] index tensor on the device."""
        index, offsets, flips = batch.index[students], batch.offsets[students], batch.flips[students]
        if self.train_logits is not None:
            variants = variant_index(offsets.reshape(-1, 2), flips.reshape(-1), PAD)
            # One gather over (teacher, image, variant): never a copy of a whole teacher's cache.
            return self.train_logits[rows, index.reshape(-1)[None, :], variants[None, :]].float()
        b = batch.labels.shape[1]
        inputs = batch.inputs.view(batch.student_count, b, *batch.inputs.shape[1:])[students].flatten(0, 1)
        with torch.no_grad():
            return torch.stack([self.models[j](inputs).float() for j in teachers])

    def maps(self, batch: Batch, students: Tensor, teachers: Sequence[int]) -> Tensor:
        """Cached teacher maps [K, m*B, h, w] shifted with each view's crop and flip."""
        if self.train_maps is None:
            raise CacheError("teacher maps were not loaded")
        index = batch.index[students].reshape(-1)
        offsets, flips = batch.offsets[students].reshape(-1, 2), batch.flips[students].reshape(-1)
        return torch.stack([shift_maps(self.train_maps[j, index].float(), offsets, flips, PAD) for j in teachers])


def load_teacher_outputs(params: Params, names: Sequence[str], need_maps: bool, data: Prepared,
                         device: torch.device) -> TeacherOutputs:
    """Teacher maps (when a student needs them) and logits (cached per variant, or the teacher
    models to run online) for `names`, validated against the teacher weights and data."""
    outputs = TeacherOutputs(list(names))
    if not names:
        return outputs
    outputs.hashes = teacher_hashes(list(names))
    cached = params.distill.teacher_signals == "cached"
    if cached or need_maps:
        caches = [load_cache(n, data.manifest_hash, device, need_logits=cached, teacher_sha256=outputs.hashes[n])
                  for n in names]
        if need_maps:
            outputs.train_maps = torch.stack([c.train_maps for c in caches])
        if cached:
            outputs.train_logits = torch.stack([c.train_logits for c in caches])
            if all(c.train_logits_mask is not None for c in caches):
                outputs.train_logits_mask = torch.stack([c.train_logits_mask for c in caches])
    if not cached:
        outputs.models = [load_teacher(n, device) for n in names]
    return outputs


TeacherOutputsLoader = Callable[[Params, Sequence[str], bool, Prepared, torch.device], TeacherOutputs]
