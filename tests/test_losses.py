"""losses.method_loss: every built-in method's terms and total, pinned to the values the code
computed before the methods became modules (tests/fixtures/pinned_losses.json, float64: equal
to the last bit), and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from matekd import methods as method_table
from matekd.losses import LossInputs, method_loss
from matekd.params import load_params
from matekd.weighting import WeightingInputs

PINNED = Path(__file__).parent / "fixtures" / "pinned_losses.json"
PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _inputs(pinned: dict, method) -> LossInputs:
    given = pinned["inputs"]
    as_tensor = {k: torch.tensor(given[k], dtype=torch.float64)
                 for k in ("student_logits", "teacher_logits", "student_maps", "teacher_maps")}
    labels = torch.tensor(given["labels"])
    inputs = LossInputs(as_tensor["student_logits"], labels)
    if method.has_kd:
        k = 1 if method.teachers == "one" else as_tensor["teacher_logits"].shape[0]
        inputs.teacher_logits = as_tensor["teacher_logits"][:k]
        student_maps = as_tensor["student_maps"] if method.maps else None
        if method.maps:
            inputs.student_maps, inputs.teacher_maps = student_maps, as_tensor["teacher_maps"][:k]
        inputs.weights, inputs.similarity = method.weigh(
            WeightingInputs(inputs.teacher_logits, labels, student_maps, inputs.teacher_maps),
            load_params(PARAMS).distill, given["epoch"])
    return inputs


@pytest.mark.parametrize("name", ["ce", "kd", "mtkd_equal", "mate_kd_noattr", "mate_kd", "ca_mkd"])
def test_every_method_loss_equals_its_pinned_values(name: str) -> None:
    pinned = json.loads(PINNED.read_text())
    method = method_table.get(name)
    values = load_params(PARAMS).distill     # the values the pin was computed with
    means, total = method_loss(method, _inputs(pinned, method), values, students=pinned["inputs"]["students"])
    expected = pinned["methods"][name]
    assert list(means) == list(expected["terms"])                # the terms, in logging order
    for term, value in means.items():
        assert value.tolist() == expected["terms"][term], term
    assert total.tolist() == expected["total"]


def test_a_term_the_method_does_not_declare_is_refused() -> None:
    method = method_table.get("ce")
    rogue = method_table.Method(name="rogue", teachers="none", weighting="none", terms=("ce",),
                                loss=lambda inputs, values: {**method.loss(inputs, values),
                                                             "extra": (inputs.labels.double(), 1.0)})
    inputs = LossInputs(torch.randn(4, 10), torch.arange(4))
    with pytest.raises(ValueError, match="extra"):
        method_loss(rogue, inputs, load_params(PARAMS).distill)
