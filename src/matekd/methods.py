"""The distillation methods the harness compares, as one table.

Every method is one `Method` entry: which teachers it reads, how it weights them per sample
(a rule registered by name in `matekd.distill.WEIGHTING_RULES`), whether it adds the
attribution loss, and which `distill.*` hyperparameters it uses. Params validation, the
student step, the tuning space, run names, logged params and the report all derive from this
table; nothing else branches on a method's name.

Adding a method = one `register(Method(...))` entry here (or in a plugin), its weighting rule
in `matekd.distill` when it needs a new one, and its tests.

This module is pure Python (no torch): params validation imports it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Method", "METHODS", "RECIPE_KEYS", "NUMERIC_HYPERPARAMETERS", "TUNABLE", "register", "unregister",
           "get", "method_teachers"]

TeacherUse = Literal["none", "one", "all"]

# Optimiser-recipe keys (distill.recipe.*) that every method trains with.
RECIPE_KEYS = ("lr", "weight_decay")
# The distill.* hyperparameters that are numbers (a tuning study can search them).
NUMERIC_HYPERPARAMETERS = ("kd_temperature", "ce_weight", "similarity_temperature", "similarity_temperature_end",
                           "attribution_weight")
TUNABLE = NUMERIC_HYPERPARAMETERS + RECIPE_KEYS   # every name tune.space may hold

_KD = ("kd_temperature", "ce_weight")
_ATTRIBUTION = ("similarity_temperature", "similarity_temperature_end", "similarity_schedule_epochs",
                "student_target", "similarity", "clip_similarity", "rescale_weights")


@dataclass(frozen=True)
class Method:
    """One row of the method table.

    teachers: `none`, `one` (distill.kd_teacher) or `all` (every teacher of params.teachers).
    weighting: name of the per-sample teacher-weighting rule (`none`, `one-hot`, `equal`,
        `attribution`, `confidence`, ... see matekd.distill.WEIGHTING_RULES).
    attribution_loss: adds beta * L_attr (distill.attribution_weight).
    hyperparameters: the `distill.*` keys the method reads (besides distill.recipe), the only
        ones logged for its runs and the only ones its tuning study may search.
    """

    name: str
    teachers: TeacherUse
    weighting: str
    attribution_loss: bool
    hyperparameters: tuple[str, ...]
    summary: str
    reference: str = ""

    @property
    def needs_maps(self) -> bool:
        """Reads cached teacher Grad-CAM maps (attribution weighting or the attribution loss)."""
        return self.weighting == "attribution" or self.attribution_loss

    def reads_cache(self, teacher_signals: str) -> bool:
        """Reads the teachers' caches: their maps, or their logits when distill.teacher_signals
        is `cached`."""
        return self.needs_maps or (self.has_kd and teacher_signals == "cached")

    @property
    def has_kd(self) -> bool:
        return self.teachers != "none"

    @property
    def per_sample_weights(self) -> bool:
        """Teacher weights vary per sample (worth a histogram and an entropy)."""
        return self.weighting not in ("none", "one-hot", "equal")

    @property
    def tunable(self) -> tuple[str, ...]:
        """Names a tuning study may search for this method: its hyperparameters that are numbers,
        plus the shared recipe keys."""
        return tuple(h for h in self.hyperparameters if h in NUMERIC_HYPERPARAMETERS) + RECIPE_KEYS


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the table (tests and plugins register extra ones)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.teachers not in ("none", "one", "all"):
        raise ValueError(f"method {method.name!r}: teachers must be none, one or all")
    if method.teachers == "none" and (method.weighting != "none" or method.attribution_loss):
        raise ValueError(f"method {method.name!r}: a method without teachers cannot weight or attribute them")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def get(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(METHODS)}") from None


def method_teachers(method: Method, teachers: list[str], kd_teacher: str) -> list[str]:
    """The teachers a method reads, in params order."""
    if method.teachers == "none":
        return []
    if method.teachers == "one":
        return [kd_teacher]
    return list(teachers)


register(Method(
    name="ce", teachers="none", weighting="none", attribution_loss=False, hyperparameters=(),
    summary="cross-entropy only (alpha = 1)"))
register(Method(
    name="kd", teachers="one", weighting="one-hot", attribution_loss=False,
    hyperparameters=("kd_teacher", *_KD),
    summary="single-teacher KD from distill.kd_teacher", reference="Hinton et al. 2015"))
register(Method(
    name="mtkd_equal", teachers="all", weighting="equal", attribution_loss=False, hyperparameters=_KD,
    summary="multi-teacher KD, every teacher weighted 1/K"))
register(Method(
    name="mate_kd_noattr", teachers="all", weighting="attribution", attribution_loss=False,
    hyperparameters=(*_KD, *_ATTRIBUTION),
    summary="teachers weighted per sample by softmax(Grad-CAM similarity / tau), no attribution loss"))
register(Method(
    name="mate_kd", teachers="all", weighting="attribution", attribution_loss=True,
    hyperparameters=(*_KD, *_ATTRIBUTION, "attribution_weight", "map_norm"),
    summary="MATE-KD: attribution-weighted teachers plus beta * attribution loss", reference="docs/method.md"))
register(Method(
    name="ca_mkd", teachers="all", weighting="confidence", attribution_loss=False, hyperparameters=_KD,
    summary="teachers weighted per sample by confidence, (1 - softmax_k(CE_k)) / (K - 1)",
    reference="Zhang, Chen, Wang, ICASSP 2022 (CA-MKD; Rorozhl/CA-MKD distiller_zoo/CAMKD.py), logit part"))
