"""The student step, per method: it weighs the teachers with the method's own rule (not another
one that happens to exist) and reads only the teacher outputs the method needs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from matekd import methods as method_table
from matekd.attribution import model_cam
from matekd.augment import num_variants, sample_crop_flip
from matekd.models import build_model
from matekd.params import load_params
from matekd.training.loop import PAD, make_batch
from matekd.training.networks import as_one_module
from matekd.training.students import resolve_spec, spec_teachers, student_step
from matekd.training.teacher_outputs import TeacherOutputs
from matekd.weighting import confidence_weights, effective_tau, similarity, teacher_weights

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
# What each built-in method must do, written here independently of the registry.
RULE = {"ce": None, "kd": "equal", "mtkd_equal": "equal", "mate_kd_noattr": "attribution", "mate_kd": "attribution",
        "ca_mkd": "confidence"}
READS_MAPS = {"mate_kd_noattr", "mate_kd"}


@dataclass
class RecordingOutputs(TeacherOutputs):
    """Cached teacher outputs of random values that record what the step reads."""

    reads: list[str] = field(default_factory=list)

    def logits(self, *args):
        self.reads.append("logits")
        return super().logits(*args)

    def maps(self, *args):
        self.reads.append("maps")
        return super().maps(*args)


def _step_inputs(name: str, seed: int = 0):
    params = load_params(ROOT / "profiles" / "tiny.yaml", {"device": "cpu", "distill.similarity_temperature": 0.3,
                                                           "distill.teacher_signals": "cached"})
    spec = resolve_spec(params, name, 0, name)
    names = spec_teachers(spec, params)
    gen = torch.Generator().manual_seed(seed)
    n, b = 64, 16
    outputs = RecordingOutputs(
        names, train_maps=torch.rand(len(names), n, 8, 8, generator=gen).half(),
        train_logits=(3 * torch.randn(len(names), n, num_variants(PAD), 10, generator=gen)).half())
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    offsets, flips = sample_crop_flip(b, PAD, gen, CPU)
    batch = make_batch(images, labels, torch.randperm(n, generator=gen)[:b][None], offsets[None], flips[None], CPU)
    torch.manual_seed(seed)
    student = build_model("resnet20")
    return params, spec, outputs, batch, student


def _candidate_weights(params, spec, outputs, batch, student) -> dict[str, torch.Tensor]:
    """Every weighting rule the harness knows, computed from the step's own inputs."""
    k = len(outputs.names)
    rows = torch.arange(k)[:, None]
    index = torch.zeros(1, dtype=torch.long)
    logits = TeacherOutputs.logits(outputs, batch, index, list(range(k)), rows)
    teacher_maps = TeacherOutputs.maps(outputs, batch, index, list(range(k)))
    s_logits, activations = student.forward_cam(batch.inputs)
    student_maps = model_cam(student, activations, s_logits, batch.labels[0]).detach()
    tau = effective_tau(spec.distill, 0)
    return {"equal": torch.full((k, batch.labels.shape[1]), 1.0 / k),
            "confidence": confidence_weights(logits, batch.labels[0]),
            "attribution": teacher_weights(similarity(student_maps, teacher_maps), tau)}


@pytest.mark.parametrize("name", list(RULE))
def test_each_methods_step_uses_its_own_rule_and_reads_only_what_it_needs(name):
    params, spec, outputs, batch, student = _step_inputs(name)
    reference = copy.deepcopy(student)
    step = student_step(params, [spec], as_one_module([student]), outputs, CPU)
    out = step(batch, 0)
    method = method_table.get(name)
    assert ("maps" in outputs.reads) == (name in READS_MAPS)
    assert ("logits" in outputs.reads) == (RULE[name] is not None)
    assert torch.isfinite(out.loss)
    if RULE[name] is None or not method.per_sample_weights:
        assert not any(k.startswith("weight_mean/") for k in out.terms)
        return
    candidates = _candidate_weights(params, spec, outputs, batch, reference)
    logged = torch.stack([out.terms[f"weight_mean/{t}"][0] for t in outputs.names])
    for rule, weights in candidates.items():
        matches = torch.allclose(logged, weights.mean(dim=1).float(), atol=1e-5)
        assert matches == (rule == RULE[name]), f"{name}: logged weights {'' if matches else 'do not '}match {rule}"


@pytest.mark.parametrize("name", list(RULE))
def test_training_loads_maps_only_for_the_methods_that_read_them(name, monkeypatch):
    """train_students asks the loader for maps only when one of its students reads them, and for
    the method's own teachers only."""
    from matekd.training import students as training_students

    asked = []

    def loader(params, names, need_maps, data, device):
        asked.append((list(names), need_maps))
        raise RuntimeError("stop: only the request is under test")

    params, spec, *_ = _step_inputs(name)
    with pytest.raises(RuntimeError, match="stop"):
        training_students.train_students(params, [spec], data=None, device=CPU, runs=[None], checkpoint=None,
                                         outputs_loader=loader)
    assert asked == [(spec_teachers(spec, params), name in READS_MAPS)]
