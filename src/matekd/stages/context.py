"""What every stage does first: seed, pick the device, open its tracked run with provenance."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..data.prepared import Prepared
from ..params import Params
from ..precision import active_precision, use_precision
from ..tracking import NullRun, start_run
from ..training.loop import configure_determinism, device_name, resolve_device


@dataclass
class StageContext:
    params: Params
    device: torch.device
    run: NullRun


def prepare_device(params: Params, seed: int | None = None) -> torch.device:
    """The stage's device, with torch seeded, its kernels chosen (deterministic or not) and its
    precision resolved."""
    device = resolve_device(params.device)
    configure_determinism(params.seed if seed is None else seed, params.deterministic)
    use_precision(params.precision, device)
    return device


def stage_tags(params: Params, device: torch.device, data_hash: str | None) -> dict[str, Any]:
    """The tags every tracked run of a stage carries."""
    return {"profile": params.profile, "device": device_name(device), "precision": active_precision(device),
            "params_sha256": params.digest(), "dataset_sha256": data_hash or "none"}


def tracked_run(params: Params, *, run_name: str, stage: str, log_params: dict[str, Any], tags: dict[str, Any],
                parent_run_id: str | None = None):
    """A tracked run (MLflow, offline or none, as params.tracking and MATEKD_TRACKING say)."""
    tracking = params.tracking
    return start_run(enabled=tracking.enabled, mode=tracking.mode, offline_dir=tracking.offline_dir,
                     experiment=tracking.experiment, run_name=run_name, stage=stage, params=log_params, tags=tags,
                     parent_run_id=parent_run_id)


@contextlib.contextmanager
def stage(params: Params, *, name: str, run_name: str, log_params: dict[str, Any], data_hash: str | None = None,
          tags: dict[str, Any] | None = None, seed: int | None = None, parent_run_id: str | None = None
          ) -> Iterator[StageContext]:
    """Seed and configure torch, then open the stage's run (a no-op run when tracking is off).

    `log_params` are the params the stage actually uses (flat dotted params.yaml keys)."""
    device = prepare_device(params, seed)
    all_tags = {**stage_tags(params, device, data_hash), **(tags or {})}
    with tracked_run(params, run_name=run_name, stage=name, log_params=log_params, tags=all_tags,
                     parent_run_id=parent_run_id) as run:
        run.log_dict(params.model_dump(mode="json"), "config/params.json")
        yield StageContext(params=params, device=device, run=run)


def log_prepared_input(run: NullRun, data: Prepared) -> None:
    """The prepared dataset as the run's input (MLflow's Datasets column): its manifest digest
    pins the source, the seeded split and every array."""
    source = data.manifest.get("source") or {}
    file = source.get("file") or "."
    run.log_input("cifar10-prepared", data.manifest_hash, "data" if file == "." else f"data/{file}", "training",
                  profile=json.dumps(data.manifest.get("sizes", {}), sort_keys=True),
                  tags={"dataset": str(data.manifest.get("dataset", "")),
                        "source_sha256": str(source.get("sha256", ""))})
