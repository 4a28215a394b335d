"""Knowledge distillation from fixed teacher weights: `kd` (one teacher, Hinton et al. 2015) and
`mtkd_equal` (every teacher weighted 1/K). Their hyperparameters and loss are shared by every
method that distils logits.
"""

from __future__ import annotations

from typing import Any

from . import Hyperparameter, Method, register

KD_TEMPERATURE = Hyperparameter("kd_temperature", float, 3.0, {"gt": 0}, label="T", tunable=True,
                                doc="softening temperature T of the KD term (scaled by T^2)")
CE_WEIGHT = Hyperparameter("ce_weight", float, 0.3, {"ge": 0, "le": 1}, label="a", tunable=True,
                           doc="alpha: total = alpha CE + (1 - alpha) KD")
KD_HYPERPARAMETERS = (KD_TEMPERATURE, CE_WEIGHT)


def kd_loss(inputs: Any, values: Any) -> dict:
    """alpha CE + (1 - alpha) T^2 KL(sum_k w_k softmax(t_k/T) || softmax(s/T))."""
    from ..losses import cross_entropy, distillation

    return {"ce": (cross_entropy(inputs.student_logits, inputs.labels), values.ce_weight),
            "kd": (distillation(inputs.student_logits, inputs.teacher_logits, inputs.weights, values.kd_temperature),
                   1.0 - values.ce_weight)}


def equal(inputs: Any, values: Any, epoch: int) -> tuple:
    from ..weighting import equal_weights

    return equal_weights(inputs.teacher_logits), None


KD = register(Method(
    name="kd", teachers="one", weighting="one-hot", weigh=equal, loss=kd_loss, terms=("ce", "kd"),
    hyperparameters=KD_HYPERPARAMETERS, summary="single-teacher KD from distill.kd_teacher",
    reference="Hinton et al. 2015"))

MTKD_EQUAL = register(Method(
    name="mtkd_equal", teachers="all", weighting="equal", weigh=equal, loss=kd_loss, terms=("ce", "kd"),
    hyperparameters=KD_HYPERPARAMETERS, summary="multi-teacher KD, every teacher weighted 1/K"))
