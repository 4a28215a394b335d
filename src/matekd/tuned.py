"""Per-method tuned values: `tuning/best/<method>.yaml`, written by `matekd tune`, read by the
ablation when `ablation.tuned: true` (each method trains with its own study's values only).

File format (YAML):
    method: mate_kd
    study: matekd-quick-mate_kd
    objective: val_acc after 2 epoch(s)
    trials: 6              # finished trials of the study
    best_trial: 4
    best_value: 0.31
    values:                # dotted params.yaml keys, only the method's own tunable keys
      distill.kd_temperature: 3.4
      distill.recipe.lr: 0.07
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import ParamsError
from .methods import Method
from .params import param_key
from .paths import tuned_values_path
from .storage import write_text


def allowed_keys(method: Method) -> set[str]:
    return {param_key(name) for name in method.tunable}


def load_tuned_values(method: Method) -> tuple[dict[str, Any], dict[str, Any]]:
    """({dotted key: value}, metadata incl. `path`) of a method's tuned values; a missing file is
    refused with the command that makes it, and a value of another method is refused too."""
    path = tuned_values_path(method.name)
    if not path.is_file():
        raise ParamsError(f"ablation.tuned is true but {path} is missing: run `matekd tune --method {method.name}` "
                          f"(then commit {path}), or set ablation.tuned: false")
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML ({exc}); rerun `matekd tune --method {method.name}`") from None
    if not isinstance(content, dict) or not isinstance(content.get("values"), dict):
        raise ParamsError(f"{path} has no `values:` mapping; rerun `matekd tune --method {method.name}`")
    if content.get("method") != method.name:
        raise ParamsError(f"{path} holds values of method {content.get('method')!r}, not {method.name!r}")
    values = content["values"]
    foreign = sorted(set(values) - allowed_keys(method))
    if foreign:
        raise ParamsError(f"{path}: {', '.join(foreign)} are not tunable for {method.name} "
                          f"(allowed: {', '.join(sorted(allowed_keys(method)))})")
    meta = {k: v for k, v in content.items() if k != "values"}
    meta["path"] = str(path)
    return dict(values), meta


def write_tuned_values(method: Method, values: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write a method's best values (dotted keys) atomically; only its own tunable keys."""
    foreign = sorted(set(values) - allowed_keys(method))
    if foreign:
        raise ParamsError(f"refusing to write {', '.join(foreign)} as tuned values of {method.name}")
    path = tuned_values_path(method.name)
    header = (f"# Tuned values of {method.name}, written by `matekd tune --method {method.name}`.\n"
              "# Used by the ablation when ablation.tuned: true. Commit this file.\n")
    body = {"method": method.name, **meta, "values": {k: values[k] for k in sorted(values)}}
    write_text(path, header + yaml.safe_dump(body, sort_keys=False, width=10 ** 6))
    return path
