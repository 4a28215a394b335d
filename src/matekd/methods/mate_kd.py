"""MATE-KD (docs/method.md): each teacher weighted per sample by softmax(cosine(student Grad-CAM,
teacher Grad-CAM) / tau), plus beta x the attribution loss between the student's map and the
weighted teachers' maps; `mate_kd_noattr` is the weighting alone."""

from __future__ import annotations

from typing import Any, Literal

from . import Hyperparameter, Method, register
from .kd import KD_HYPERPARAMETERS, kd_loss


def _tau_schedule_set_together(values: Any) -> str | None:
    if (values.similarity_temperature_end is None) != (values.similarity_schedule_epochs is None):
        return ("distill.similarity_temperature_end and distill.similarity_schedule_epochs must be set together "
                "(a linear tau schedule) or both left null")
    return None


WEIGHTING_HYPERPARAMETERS = (
    Hyperparameter("similarity_temperature", float, 0.2, {"gt": 0}, label="tau", tunable=True,
                   doc="tau of softmax(similarity / tau); the start of the schedule when one is set"),
    Hyperparameter("similarity_temperature_end", float | None, None, {"gt": 0}, tunable=True,
                   check=_tau_schedule_set_together, doc="tau reached after similarity_schedule_epochs (linear)"),
    Hyperparameter("similarity_schedule_epochs", int | None, None, {"ge": 1}),
    Hyperparameter("student_target", Literal["label", "prediction"], "label",
                   doc="the class of the student's Grad-CAM map"),
    Hyperparameter("similarity", Literal["cosine", "pearson"], "cosine"),
    Hyperparameter("clip_similarity", bool, False, doc="negative similarities count as 0"),
    Hyperparameter("rescale_weights", bool, False, doc="divide each sample's similarities by their maximum first"),
)
ATTRIBUTION_WEIGHT = Hyperparameter("attribution_weight", float, 0.1, {"ge": 0}, label="b", tunable=True,
                                    doc="beta of the attribution loss")
MAP_NORM = Hyperparameter("map_norm", Literal["max", "l2"], "max", doc="map normalisation of the attribution loss")


def attribution(inputs: Any, values: Any, epoch: int) -> tuple:
    """softmax over teachers of similarity(student map, teacher map) / tau(epoch)."""
    from ..weighting import effective_tau, similarity, teacher_weights

    sim = similarity(inputs.student_maps.detach(), inputs.teacher_maps, kind=values.similarity,
                     clip=values.clip_similarity)
    return teacher_weights(sim, effective_tau(values, epoch), rescale=values.rescale_weights), sim


def mate_kd_loss(inputs: Any, values: Any) -> dict:
    """alpha CE + (1 - alpha) KD + beta attr; attr is not computed when beta = 0."""
    terms = kd_loss(inputs, values)
    if values.attribution_weight > 0:
        from ..losses import attribution_error

        terms["attr"] = (attribution_error(inputs.student_maps, inputs.teacher_maps, inputs.weights, values.map_norm),
                         values.attribution_weight)
    return terms


MATE_KD_NOATTR = register(Method(
    name="mate_kd_noattr", teachers="all", weighting="attribution", weigh=attribution, maps=True,
    loss=kd_loss, terms=("ce", "kd"), hyperparameters=(*KD_HYPERPARAMETERS, *WEIGHTING_HYPERPARAMETERS),
    summary="teachers weighted per sample by softmax(Grad-CAM similarity / tau), no attribution loss"))

MATE_KD = register(Method(
    name="mate_kd", teachers="all", weighting="attribution", weigh=attribution, maps=True,
    loss=mate_kd_loss, terms=("ce", "kd", "attr"), map_gradient=lambda values: values.attribution_weight > 0,
    hyperparameters=(*KD_HYPERPARAMETERS, *WEIGHTING_HYPERPARAMETERS, ATTRIBUTION_WEIGHT, MAP_NORM),
    summary="MATE-KD: attribution-weighted teachers plus beta * attribution loss", reference="docs/method.md"))
