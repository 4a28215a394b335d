"""What each method's study searches, and how: the search space per method (from the method
table), the checks run before any trial, sampling with dotted params.yaml names, the sampler
and the pruner.

A method searches exactly the keys of `tune.space` that it uses (`Method.tunable`: its numeric
hyperparameters plus the recipe's lr and weight_decay), under the same ranges as every other
method, so every method is tuned alike. Trial parameters are named by their params.yaml keys
(`distill.kd_temperature`, `distill.recipe.lr`): what the dashboard, MLflow and the tuned-values
files show is what a user types after `-S`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import optuna
from pydantic import ValidationError

from .. import methods as method_table
from ..errors import ParamsError
from ..methods import Method
from ..params import Params, SpaceEntry, TuneParams, param_key, with_distill_values

# A method whose space has none of these example ranges can still be tuned on its learning rate.
EXAMPLE_RANGE = "lr: {low: 0.01, high: 0.4, log: true}"


def select_methods(params: Params, names: list[str] | None = None) -> list[Method]:
    """The methods to tune: `names` (--method, repeatable) or `tune.methods`, in that order,
    each known to the method table."""
    chosen = list(names) if names else list(params.tune.methods)
    if len(set(chosen)) != len(chosen):
        raise ParamsError(f"--method lists a method twice ({', '.join(chosen)})")
    rows = []
    for name in chosen:
        try:
            rows.append(method_table.get(name))
        except KeyError as exc:
            raise ParamsError(f"--method {name!r}: {exc.args[0]}") from None
    return rows


def method_space(tune: TuneParams, method: Method) -> dict[str, SpaceEntry]:
    """The part of `tune.space` a method uses, keyed by dotted params.yaml key (tune.space order)."""
    return {param_key(name): entry for name, entry in tune.space.items() if name in method.tunable}


def unused_keys(tune: TuneParams, methods: list[Method]) -> list[str]:
    """Keys of tune.space that none of `methods` uses (they are searched by no study)."""
    return [name for name in tune.space if not any(name in m.tunable for m in methods)]


def apply_values(params: Params, values: dict[str, float], epochs: int | None = None) -> Params:
    """A deep copy of `params` with dotted `distill.*` values set (validated on assignment) and,
    when given, the student's epochs."""
    out = params.model_copy(deep=True)
    if epochs is not None:
        out.distill.recipe.epochs = epochs
    out.distill = with_distill_values(out.distill, {dotted: float(value) for dotted, value in values.items()})
    return out


def check_space(params: Params, methods: list[Method]) -> None:
    """Refuse, before any study is opened: a method with nothing to search, a bound the schema
    would reject for its key (e.g. ce_weight above 1), and a missing validation split."""
    tune = params.tune
    for method in methods:
        if not method_space(tune, method):
            raise ParamsError(
                f"tune.space has no key that method {method.name!r} uses ({', '.join(tune.space)}); add one of "
                f"{', '.join(method.tunable)} to tune.space, e.g. `{EXAMPLE_RANGE}`")
    for name, entry in tune.space.items():
        for bound in ("low", "high"):
            value = getattr(entry, bound)
            if not math.isfinite(value):
                raise ParamsError(f"tune.space.{name}.{bound} = {value!r}: bounds must be finite numbers")
            try:
                apply_values(params, {param_key(name): value})
            except ValidationError as exc:
                reason = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
                raise ParamsError(f"tune.space.{name}.{bound} = {value!r} is not a valid "
                                  f"{param_key(name)}: {reason}") from None
    if params.data.val_per_class == 0:
        raise ParamsError("data.val_per_class = 0: tuning needs a validation split (the objective is "
                          "validation accuracy; the test set is never used)")


def suggest(trial: optuna.Trial, space: dict[str, SpaceEntry]) -> dict[str, float]:
    """Sample every key of a method's space; trial parameters carry the dotted names."""
    return {key: trial.suggest_float(key, e.low, e.high, log=e.log) for key, e in space.items()}


def make_sampler(tune: TuneParams, worker: int = 0) -> optuna.samplers.BaseSampler:
    """Seeded TPE with the constant liar (running trials count as bad guesses, so parallel
    workers spread out); worker k draws from seed + k so workers do not repeat each other."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=tune.sampler_seed + worker, constant_liar=True)


def make_pruner(tune: TuneParams) -> optuna.pruners.BasePruner:
    """Median (no pruning before `pruner_warmup_epochs` epochs nor during the first
    `pruner_startup_trials` trials), Hyperband over [warmup, epochs] epochs, or none; always on
    validation accuracy reported after every epoch."""
    if tune.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=tune.pruner_startup_trials,
                                           n_warmup_steps=tune.pruner_warmup_epochs)
    if tune.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, min(tune.pruner_warmup_epochs, tune.epochs)),
                                              max_resource=tune.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def describe_space(space: dict[str, SpaceEntry]) -> dict[str, Any]:
    """The ranges as plain data (signature, summary)."""
    return {key: entry.model_dump() for key, entry in space.items()}
