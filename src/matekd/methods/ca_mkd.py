"""`ca_mkd`: teachers weighted per sample by their confidence on the true label (the logit part of
CA-MKD: Zhang, Chen, Wang, ICASSP 2022; Rorozhl/CA-MKD distiller_zoo/CAMKD.py)."""

from __future__ import annotations

from typing import Any

from . import Method, register
from .kd import KD_HYPERPARAMETERS, kd_loss


def confidence(inputs: Any, values: Any, epoch: int) -> tuple:
    from ..weighting import confidence_weights

    return confidence_weights(inputs.teacher_logits, inputs.labels), None


CA_MKD = register(Method(
    name="ca_mkd", teachers="all", weighting="confidence", weigh=confidence, loss=kd_loss, terms=("ce", "kd"),
    hyperparameters=KD_HYPERPARAMETERS,
    summary="teachers weighted per sample by confidence, (1 - softmax_k(CE_k)) / (K - 1)",
    reference="Zhang, Chen, Wang, ICASSP 2022 (CA-MKD; Rorozhl/CA-MKD distiller_zoo/CAMKD.py), logit part"))
