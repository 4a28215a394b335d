"""The distillation methods the harness compares: a registry, and one module per method family.

A method (`Method`) declares which teachers it reads, its hyperparameters, how it weights the
teachers per sample and its loss terms with the total. Params validation, the student step, the
tuning space, logged params, run names, the DVC params lists and the report derive from it;
nothing else branches on a method's name. Adding a method = one module in this package (found
and imported automatically) and a test. docs/architecture.md follows one hyperparameter through.

Pure Python (no torch at import): params are validated before torch is imported. A method's
weighting and loss functions import the maths (matekd.weighting, matekd.losses) when called.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import Tensor

    from ..losses import LossInputs
    from ..weighting import WeightingInputs

__all__ = ["Hyperparameter", "Method", "METHODS", "HYPERPARAMETERS", "RECIPE_KEYS", "register", "unregister", "get",
           "method_teachers", "tunable_names", "registry_version"]

TeacherUse = Literal["none", "one", "all"]
# weigh(inputs, values, epoch) -> (weights [K,N] summing to 1 over K, similarity [K,N] or None)
WeighFn = Callable[["WeightingInputs", Any, int], "tuple[Tensor, Tensor | None]"]
# loss(inputs, values) -> {term: (per-sample value [N], its coefficient in the total)}
LossFn = Callable[["LossInputs", Any], "dict[str, tuple[Tensor, float]]"]

# Optimiser-recipe keys (distill.recipe.*) that every method trains with and may tune.
RECIPE_KEYS = ("lr", "weight_decay")


@dataclass(frozen=True)
class Hyperparameter:
    """One `distill.<name>` key: its type, default and bounds (pydantic Field keywords: gt, ge,
    le), the short label of the run's `hyperparameters` tag, whether a tuning study may search
    it, and an optional check across keys (returns an error message or None)."""

    name: str
    annotation: Any
    default: Any
    bounds: Mapping[str, float] = field(default_factory=dict, hash=False)
    label: str = ""
    tunable: bool = False
    check: Callable[[Any], str | None] | None = field(default=None, compare=False, hash=False)
    doc: str = ""


@dataclass(frozen=True)
class Method:
    """One distillation method.

    teachers: `none`, `one` (distill.kd_teacher) or `all` (every teacher of params.teachers).
    weighting: the teacher-weighting rule's name (report, CLI); `weigh` computes it. `none`,
        `one-hot` and `equal` are fixed weights; any other name varies per sample.
    maps: reads the teachers' cached Grad-CAM maps (its weighting or its loss uses them); such a
        method declares `student_target`, the class its student's map is taken for.
    terms: the loss terms `loss` can return, in logging order (the total is their weighted sum).
    map_gradient(values): the loss backpropagates through the student's Grad-CAM map.
    hyperparameters: the `distill.*` keys it reads besides distill.recipe: the only ones
        validated for it, logged for its runs, listed in its DVC params and searched by its study.
    """

    name: str
    teachers: TeacherUse
    weighting: str
    loss: LossFn
    terms: tuple[str, ...]
    hyperparameters: tuple[Hyperparameter, ...] = ()
    weigh: WeighFn | None = None
    maps: bool = False
    map_gradient: Callable[[Any], bool] | None = None
    summary: str = ""
    reference: str = ""

    @property
    def hyperparameter_names(self) -> tuple[str, ...]:
        return tuple(h.name for h in self.hyperparameters)

    @property
    def keys(self) -> tuple[str, ...]:
        """Every `distill.*` key it reads besides the recipe: distill.kd_teacher when it reads one
        teacher, then its hyperparameters."""
        return ("kd_teacher",) * (self.teachers == "one") + self.hyperparameter_names

    @property
    def has_kd(self) -> bool:
        return self.teachers != "none"

    def reads_cache(self, teacher_signals: str) -> bool:
        """Reads the teachers' caches: their maps, or their logits when distill.teacher_signals
        is `cached`."""
        return self.maps or (self.has_kd and teacher_signals == "cached")

    @property
    def per_sample_weights(self) -> bool:
        """Teacher weights vary per sample (worth a histogram and an entropy)."""
        return self.weighting not in ("none", "one-hot", "equal")

    @property
    def similarity_statistics(self) -> bool:
        """Its weighting reports a map similarity per teacher and sample."""
        return self.maps and self.per_sample_weights

    def needs_map_gradient(self, values: Any) -> bool:
        return self.map_gradient is not None and bool(self.map_gradient(values))

    @property
    def tunable(self) -> tuple[str, ...]:
        """Names a tuning study may search for this method: its tunable hyperparameters plus the
        shared recipe keys."""
        return tuple(h.name for h in self.hyperparameters if h.tunable) + RECIPE_KEYS


_methods: dict[str, Method] = {}
_hyperparameters: dict[str, Hyperparameter] = {}
METHODS: Mapping[str, Method] = MappingProxyType(_methods)
HYPERPARAMETERS: Mapping[str, Hyperparameter] = MappingProxyType(_hyperparameters)
_version = [0]


def registry_version() -> int:
    """Changes whenever a method (and so possibly a hyperparameter) is added or removed."""
    return _version[0]


def register(method: Method) -> Method:
    """Add a method (and the hyperparameters it declares) to the registry."""
    if method.name in _methods:
        raise ValueError(f"method {method.name!r} is already registered")
    if method.teachers not in ("none", "one", "all"):
        raise ValueError(f"method {method.name!r}: teachers must be none, one or all")
    if method.teachers == "none" and (method.weighting != "none" or method.maps):
        raise ValueError(f"method {method.name!r}: a method without teachers cannot weight them or read their maps")
    if method.has_kd and method.weigh is None:
        raise ValueError(f"method {method.name!r}: a method with teachers needs a `weigh` rule")
    if method.maps and "student_target" not in method.hyperparameter_names:
        raise ValueError(f"method {method.name!r} reads maps: it must declare the student_target hyperparameter "
                         "(the class of the student's Grad-CAM map; see mate_kd.WEIGHTING_HYPERPARAMETERS)")
    for h in method.hyperparameters:
        known = _hyperparameters.get(h.name)
        if known is not None and known != h:
            raise ValueError(f"method {method.name!r}: hyperparameter {h.name!r} is declared differently by "
                             "another method; share one declaration")
    _methods[method.name] = method
    for h in method.hyperparameters:
        _hyperparameters.setdefault(h.name, h)
    _version[0] += 1
    return method


def unregister(name: str) -> None:
    """Remove a method, and the hyperparameters no other method declares."""
    if _methods.pop(name, None) is None:
        return
    used = {h.name for m in _methods.values() for h in m.hyperparameters}
    for key in [k for k in _hyperparameters if k not in used]:
        del _hyperparameters[key]
    _version[0] += 1


def get(name: str) -> Method:
    try:
        return _methods[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(_methods)}") from None


def method_teachers(method: Method, teachers: list[str], kd_teacher: str) -> list[str]:
    """The teachers a method reads, in params order."""
    if method.teachers == "none":
        return []
    if method.teachers == "one":
        return [kd_teacher]
    return list(teachers)


def tunable_names() -> tuple[str, ...]:
    """Every name tune.space may hold: the registered tunable hyperparameters and the recipe keys."""
    return tuple(h.name for h in _hyperparameters.values() if h.tunable) + RECIPE_KEYS


# The built-in methods, in the order of the report's tables.
BUILT_IN = ("ce", "kd", "mate_kd", "ca_mkd")


def _load_modules() -> None:
    names = [*BUILT_IN, *sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in BUILT_IN)]
    for name in names:
        importlib.import_module(f"{__name__}.{name}")


_load_modules()
