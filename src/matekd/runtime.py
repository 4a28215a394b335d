"""What every stage does first: seed, pick the device, open its MLflow run with provenance."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from .params import Params
from .storage import atomic_path
from .tracking import NullRun, start_run
from .train import configure_determinism, resolve_device


@dataclass
class StageContext:
    params: Params
    device: torch.device
    run: NullRun


@contextlib.contextmanager
def stage(params: Params, *, name: str, run_name: str, data_hash: str | None = None,
          tags: dict[str, Any] | None = None, seed: int | None = None,
          parent_run_id: str | None = None, log_params: dict[str, Any] | None = None
          ) -> Iterator[StageContext]:
    """Seed and configure torch, then open the stage's run (a no-op run when tracking is off)."""
    device = resolve_device(params.device)
    configure_determinism(params.seed if seed is None else seed, params.deterministic)
    all_tags = {"profile": params.profile, "device": device_name(device), "params_sha256": params.digest(),
                "dataset_sha256": data_hash or "none", **(tags or {})}
    with start_run(enabled=params.tracking.enabled, experiment=params.tracking.experiment, run_name=run_name,
                   stage=name, params=log_params if log_params is not None else params.flat(), tags=all_tags,
                   parent_run_id=parent_run_id) as run:
        run.log_dict(params.model_dump(mode="json"), "config/params.json")
        yield StageContext(params=params, device=device, run=run)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def write_history_csv(path: str | Path, history: list[dict[str, float]]) -> None:
    """Per-epoch records as CSV for `dvc plots`."""
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def digest_of(*parts: Any) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
