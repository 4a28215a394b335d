"""The params of a run: the profile with its overrides, the smoke pass's, the paper profile.

matekd.params (pydantic) is imported where it is used: cli.py imports this package to build
its parser, and that must stay quick."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from .layout import find_path


def smoke_overrides(raw: dict[str, Any]) -> dict[str, Any]:
    """The smoke pass: the profile with a few images per class, one epoch everywhere, one
    CIFAR-10-C image per class and corruption, and few Grad-CAM images. Everything else (the
    models, batch sizes, methods, seeds, group size, cache settings, workers) stays, so the
    smoke pass runs the same code paths as the run."""
    out: dict[str, Any] = {
        "profile": f"{raw.get('profile', 'profile')}-smoke",
        "data.train_per_class": 8, "data.val_per_class": 2, "data.test_per_class": 4,
        "distill.recipe.epochs": 1,
        "corrupt.images_per_class": 1,
        "evaluate.gradcam_images": 8, "evaluate.grid_images": 2,
    }
    for name in raw.get("teachers") or {}:
        out[f"teachers.{name}.epochs"] = 1
    workers = int((raw.get("corrupt") or {}).get("workers") or 1)
    out["corrupt.workers"] = min(workers, 2)
    return out


def resolved_params(profile: Path, overrides: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """(the profile's YAML with `overrides` applied, its validated Params)."""
    from ...params import load_params, set_dotted

    params = load_params(profile, overrides)      # validates; names the bad key
    raw = yaml.safe_load(profile.read_text()) or {}
    for key, value in overrides.items():
        set_dotted(raw, key, value)
    return raw, params


def write_params(folder: Path, raw: dict[str, Any], overrides: dict[str, Any]) -> Any:
    """Write `raw` + `overrides` as folder/params.yaml; returns the validated Params."""
    from ...params import set_dotted, validate_params
    from ...storage import write_text

    tree = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        set_dotted(tree, key, value)
    params = validate_params(tree)
    write_text(folder / "params.yaml", yaml.safe_dump(tree, sort_keys=False))
    return params


def paper_params(path: str | os.PathLike | None) -> Any:
    """The validated profile whose time is extrapolated from this run's measurements, or None
    when none is given or the file is not there."""
    if not path:
        return None
    from ...params import load_params

    found = find_path(path)
    return load_params(found) if found.is_file() else None
