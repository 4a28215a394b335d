"""Stages distill and ablation@<method>-<seed>, and `matekd ablation`: train students.

- `matekd distill`: the configured method (distill.method, distill.seed) with the shared
  distill.* values; outputs `models/student/distill.safetensors` and friends.
- `matekd distill --ablation --method M --seed S`: one student of the ablation matrix, with its
  method's tuned values when ablation.tuned. With ablation.group_size K > 1 its group (up to K
  students of the matrix) trains together, as one network, the first time one of them is asked
  for; the others' results wait in checkpoints/groups/<digest>/ until their stage writes them.
- `matekd ablation`: every group of the matrix at once, spread over the visible GPUs (one
  process per GPU), then every student's outputs written: the fast path on a GPU machine.

Every student has its own tracked run, with the params it used and every loss term it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..data.prepared import load_prepared
from ..errors import ParamsError
from ..params import Params
from ..paths import student_paths
from ..training.groups import plan_groups, train_and_write, train_group, train_matrix, write_member
from ..training.students import ablation_specs, resolve_spec
from .context import prepare_device


def run_distill(params: Params, method: str | None = None, seed: int | None = None, output_name: str | None = None,
                ablation: bool = False, prepared_dir: str | Path = "prepared", progress: bool = True) -> dict:
    """Stage distill (the configured method), or with `ablation` one student of the matrix."""
    method = method or params.distill.method
    seed = params.distill.seed if seed is None else seed
    data = load_prepared(prepared_dir)
    device = prepare_device(params, seed)
    if not ablation:
        spec = resolve_spec(params, method, seed, output_name or "distill", tuned=False)
        checkpoint = student_paths(spec.output)["checkpoint"]
        return train_and_write(params, [spec], "distill", data, device, Path("."), checkpoint, progress)[0]
    if method not in params.ablation.methods or seed not in params.ablation.seeds:
        raise ParamsError(f"--ablation --method {method} --seed {seed}: not in the ablation matrix "
                          f"(ablation.methods {params.ablation.methods}, ablation.seeds {params.ablation.seeds})")
    specs = ablation_specs(params)
    spec = next(s for s in specs if s.method.name == method and s.seed == seed)
    if output_name and output_name != spec.output:
        raise ParamsError(f"--output-name {output_name}: an ablation run writes {spec.output}")
    if params.ablation.group_size == 1:
        checkpoint = student_paths(spec.output)["checkpoint"]
        return train_and_write(params, [spec], "ablation", data, device, Path("."), checkpoint, progress)[0]
    group = next(g for g in plan_groups(specs, params.ablation.group_size) if spec in g)
    store = train_group(params, group, data, device, progress)
    return write_member(spec, store)


def run_ablation(params: Params, devices: Sequence[str] | None = None, prepared_dir: str | Path = "prepared",
                 progress: bool = True) -> list[dict]:
    """Every group of the ablation matrix, spread over `devices` (default: every visible GPU,
    else the CPU), one process per device; then every student's outputs written."""
    return train_matrix(params, devices, prepared_dir, progress)
