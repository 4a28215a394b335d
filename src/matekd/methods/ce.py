"""`ce`: the student trained on labels alone (the baseline every method must beat)."""

from __future__ import annotations

from typing import Any

from . import Method, register


def loss(inputs: Any, values: Any) -> dict:
    from ..losses import cross_entropy

    return {"ce": (cross_entropy(inputs.student_logits, inputs.labels), 1.0)}


CE = register(Method(
    name="ce", teachers="none", weighting="none", loss=loss, terms=("ce",),
    summary="cross-entropy only (alpha = 1)"))
