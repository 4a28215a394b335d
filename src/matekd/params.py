"""The typed schema of params.yaml: the single source of truth for every stage.

Every stage calls `load_params` first, so a bad value fails before any output is written,
with a message that names the key, the value and what is allowed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from . import methods as method_table
from .errors import ParamsError

MODEL_NAMES = ("resnet20", "resnet56", "resnet110", "vgg19_bn", "densenet121")
CIFAR_PER_CLASS_TRAIN = 5000
CIFAR_PER_CLASS_TEST = 1000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class Recipe(Strict):
    """Optimiser recipe: SGD with (Nesterov) momentum and a learning-rate schedule."""

    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1, le=65536)
    lr: float = Field(gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(default=5e-4, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = Field(default=0.0, ge=0)  # linear warm-up (He et al. warm up ResNet110)
    eval_batch_size: int = Field(default=512, ge=1)


class DataParams(Strict):
    """Per-class sizes of the stratified, seeded subsets; null means all available."""

    train_per_class: int | None = Field(default=None, ge=1, le=CIFAR_PER_CLASS_TRAIN)
    val_per_class: int = Field(default=500, ge=0, le=CIFAR_PER_CLASS_TRAIN)
    test_per_class: int | None = Field(default=None, ge=1, le=CIFAR_PER_CLASS_TEST)

    @property
    def train_images_per_class(self) -> int:
        """data.train_per_class, or (null) all that the validation split leaves."""
        return self.train_per_class if self.train_per_class is not None else CIFAR_PER_CLASS_TRAIN - self.val_per_class

    @model_validator(mode="after")
    def _fits(self) -> DataParams:
        if self.train_per_class is not None and self.train_per_class + self.val_per_class > CIFAR_PER_CLASS_TRAIN:
            raise ValueError(
                f"data.train_per_class + data.val_per_class = {self.train_per_class + self.val_per_class} "
                f"exceeds the {CIFAR_PER_CLASS_TRAIN} training images per class of CIFAR-10")
        return self


class CacheParams(Strict):
    resolution: int = Field(default=8, ge=1, le=32)
    batch_size: int = Field(default=256, ge=1)
    # With distill.teacher_signals: cached, which crop/flip variants get teacher logits: all 162
    # (any seed, any epoch count) or only those the configured students' seeds and epochs use.
    logit_variants: Literal["all", "used"] = "all"


def _known_method(name: str) -> str:
    """Methods come from the method table (matekd.methods), checked when params are validated."""
    if name not in method_table.METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(method_table.METHODS)}")
    return name


class DistillParams(Strict):
    """The `distill` section: the keys every method shares. Each registered method adds its own
    hyperparameters (matekd.methods); `distill_model()` is this schema with them."""

    student: Literal[MODEL_NAMES] = "resnet20"  # type: ignore[valid-type]
    method: str = "mate_kd"
    kd_teacher: str = "resnet110"
    seed: int = Field(default=0, ge=0)
    teacher_signals: Literal["online", "cached"] = "online"
    # null: each student draws its data order and augmentation from its own seed. An integer: every
    # student draws them from this seed (seeds then differ only in initialisation; a shortcut that
    # lets students share one teacher pass per batch and the cache hold fewer variants).
    data_seed: int | None = Field(default=None, ge=0)
    log_every: int = Field(default=20, ge=1)
    histogram_bins: int = Field(default=20, ge=2, le=200)
    recipe: Recipe

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        return _known_method(value)

    @model_validator(mode="after")
    def _hyperparameter_checks(self) -> DistillParams:
        for hyperparameter in method_table.HYPERPARAMETERS.values():
            problem = hyperparameter.check(self) if hyperparameter.check else None
            if problem:
                raise ValueError(problem)
        return self


def distill_model() -> type[DistillParams]:
    """DistillParams with one field per registered hyperparameter (type, default and bounds as
    its method declares them); rebuilt when a method is registered."""
    return _distill_model(method_table.registry_version())


@functools.lru_cache(maxsize=4)
def _distill_model(version: int) -> type[DistillParams]:
    fields: dict[str, Any] = {
        h.name: (h.annotation, Field(default=h.default, description=h.doc or None, **h.bounds))
        for h in method_table.HYPERPARAMETERS.values()}
    return create_model("DistillParams", __base__=DistillParams, __module__=__name__, **fields)


def distill_params(**values: Any) -> DistillParams:
    """A validated `distill` section (every registered hyperparameter at its default unless given)."""
    return distill_model().model_validate(values)


class AblationParams(Strict):
    methods: list[str] = Field(default_factory=lambda: list(method_table.METHODS))
    seeds: list[int] = Field(default_factory=lambda: [0])
    # Students trained together in one process (one network of grouped convolutions), each
    # exactly as if alone; 1 = one student at a time.
    group_size: int = Field(default=1, ge=1, le=64)
    # true: every ablation run trains with its own method's tuned values (tuning/best/<method>.yaml);
    # false: with the shared distill.* values.
    tuned: bool = False

    @field_validator("methods", "seeds")
    @classmethod
    def _non_empty(cls, value: list) -> list:
        if not value:
            raise ValueError("must list at least one entry")
        if len(set(value)) != len(value):
            raise ValueError("entries must be unique")
        return value

    @field_validator("methods")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for name in value:
            _known_method(name)
        return value


class CorruptParams(Strict):
    source: str = ""  # folder with the official CIFAR-10-C .npy files; empty = regenerate
    frost_dir: str = ""  # frost textures; empty = $MATEKD_FROST, else frost is skipped
    seed: int = Field(default=0, ge=0)
    images_per_class: int | None = Field(default=None, ge=1, le=CIFAR_PER_CLASS_TEST)
    corruptions: list[str] | None = None  # null = all 19
    workers: int = Field(default=1, ge=1, le=256)  # processes generating corruptions in parallel (CPU)


class EvaluateParams(Strict):
    batch_size: int = Field(default=500, ge=1)
    gradcam_images: int = Field(default=64, ge=1)
    grid_images: int = Field(default=8, ge=1, le=64)


class SpaceEntry(Strict):
    low: float
    high: float
    log: bool = False

    @model_validator(mode="after")
    def _range(self) -> SpaceEntry:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0 (got {self.low})")
        return self


class TuneParams(Strict):
    study_name: str = "matekd"
    n_trials: int = Field(default=6, ge=1)
    epochs: int = Field(default=2, ge=1)
    sampler_seed: int = Field(default=0, ge=0)
    pruner: Literal["median", "hyperband", "none"] = "median"
    pruner_warmup_epochs: int = Field(default=1, ge=0)
    pruner_startup_trials: int = Field(default=2, ge=0)
    storage: str = "tuning/optuna.db"
    # One study per method (`<study_name>-<method>`), alike in budget, sampler and pruner; each
    # searches the keys of tune.space that it uses (the method table says which).
    methods: list[str] = Field(default_factory=lambda: ["mate_kd"])
    space: dict[str, SpaceEntry] = Field(default_factory=lambda: {
        "kd_temperature": SpaceEntry(low=1, high=8, log=True),
        "similarity_temperature": SpaceEntry(low=0.02, high=2, log=True),
        "ce_weight": SpaceEntry(low=0, high=1),
        "attribution_weight": SpaceEntry(low=0, high=1),
        "lr": SpaceEntry(low=0.01, high=0.4, log=True),
    })
    # Parameter importances are reported only from this many finished trials on.
    min_trials_for_importance: int = Field(default=8, ge=2)

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one method")
        if len(set(value)) != len(value):
            raise ValueError("entries must be unique")
        for name in value:
            _known_method(name)
        return value

    @field_validator("space")
    @classmethod
    def _known(cls, space: dict[str, SpaceEntry]) -> dict[str, SpaceEntry]:
        tunable = set(method_table.tunable_names())
        for name in space:
            if name not in tunable:
                raise ValueError(f"unknown parameter {name!r}; tunable: {', '.join(sorted(tunable))}")
        if not space:
            raise ValueError("the search space is empty")
        return space


def with_distill_values(distill: DistillParams, values: dict[str, Any]) -> DistillParams:
    """A copy of `distill` with dotted `distill.*` / `distill.recipe.*` values set, validated
    together (keys that must be set together, such as a tau schedule's two, may be)."""
    data = distill.model_dump()
    for dotted, value in values.items():
        section, _, key = dotted.removeprefix("distill.").rpartition(".")
        target = data["recipe"] if section == "recipe" else data
        if key not in target:
            raise ValueError(f"distill.{dotted.removeprefix('distill.')}: unknown key")
        target[key] = value
    return type(distill).model_validate(data)


def param_key(name: str) -> str:
    """The dotted params.yaml key of a tunable name (`lr` -> `distill.recipe.lr`)."""
    return f"distill.recipe.{name}" if name in method_table.RECIPE_KEYS else f"distill.{name}"


class TrackingParams(Strict):
    enabled: bool = True
    experiment: str = "matekd"
    # online: the MLflow store (MLFLOW_TRACKING_URI or <repo>/mlruns); offline: a folder of run
    # records (offline_dir) that `matekd sync-runs` imports later, for machines without MLflow.
    mode: Literal["online", "offline"] = "online"
    offline_dir: str = "mlruns-offline"


class Params(Strict):
    profile: str = "quick"
    seed: int = Field(default=0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto: bf16 autocast + channels_last on CUDA and on CPUs with native bf16, else fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    deterministic: bool = False
    data: DataParams = Field(default_factory=DataParams)
    teachers: dict[str, Recipe]
    cache: CacheParams = Field(default_factory=CacheParams)
    distill: SerializeAsAny[DistillParams]
    ablation: AblationParams = Field(default_factory=AblationParams)
    corrupt: CorruptParams = Field(default_factory=CorruptParams)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    tune: TuneParams = Field(default_factory=TuneParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @field_validator("teachers")
    @classmethod
    def _teachers(cls, teachers: dict[str, Recipe]) -> dict[str, Recipe]:
        if not teachers:
            raise ValueError("at least one teacher is required")
        for name in teachers:
            if name not in MODEL_NAMES:
                raise ValueError(f"unknown architecture {name!r}; allowed: {', '.join(MODEL_NAMES)}")
        return teachers

    @field_validator("distill", mode="before")
    @classmethod
    def _distill(cls, value: Any) -> Any:
        # Validated with the registered methods' hyperparameters (errors keep their key's path).
        return value if isinstance(value, DistillParams) else distill_model().model_validate(value)

    @model_validator(mode="after")
    def _kd_teacher(self) -> Params:
        if self.distill.kd_teacher not in self.teachers:
            raise ValueError(f"distill.kd_teacher {self.distill.kd_teacher!r} is not one of the teachers "
                             f"({', '.join(self.teachers)})")
        return self

    def flat(self) -> dict[str, Any]:
        """Flattened dotted keys, for MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = tree
    return out


def _format_error(exc: ValidationError, raw: dict) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-after"))
        value = _lookup(raw, err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (not in the schema; check the spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        # A whole section's repr would bury the message; its validator names the keys itself.
        shown = "" if value is _MISSING or len(repr(value)) > _MAX_SHOWN else f" = {value!r}"
        lines.append(f"{loc}{shown}: {msg}" if loc else msg)
    return "invalid params: " + "; ".join(lines)


_MISSING = object()
_MAX_SHOWN = 120


def _lookup(raw: Any, loc: tuple) -> Any:
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return _MISSING
    return node


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, creating missing sections; a key below a plain value fails."""
    node = tree
    parts = dotted.split(".")
    if not all(parts):
        raise ParamsError(f"override key {dotted!r} has an empty part")
    for depth, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            prefix = ".".join(parts[:depth + 1])
            raise ParamsError(f"override key {dotted!r}: {prefix} = {node!r} is a value, not a section")
    node[parts[-1]] = value


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; `overrides` maps dotted keys to values."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ParamsError(f"{path} must hold a mapping of keys, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return validate_params(raw)


def validate_params(raw: dict) -> Params:
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError(_format_error(exc, raw)) from None
