"""Groups of students trained together (ablation.group_size): how the matrix is cut into groups,
one group trained with a tracked run per student and its outputs written, the group store that
keeps a group's results until each member's stage writes them, and the process pool that spreads
groups over the visible GPUs."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..augment import normalize, to_device_tensor
from ..data.prepared import Prepared, load_prepared
from ..errors import MatekdError, ParamsError
from ..models import count_parameters, model_size_mb
from ..params import Params, validate_params
from ..paths import GROUP_STORE_DIR, student_paths
from ..precision import active_precision, bf16_enabled, use_precision
from ..stages.context import log_prepared_input, stage_tags, tracked_run
from ..storage import (
    atomic_path,
    digest_of,
    read_json,
    read_safetensors_metadata,
    save_tensors,
    write_history_csv,
    write_json,
)
from ..tracking import ModelBuilder, record_output
from .loop import assign_round_robin, configure_determinism, device_name, visible_devices
from .students import (
    StudentRun,
    StudentSpec,
    ablation_specs,
    group_digest,
    hyperparameter_label,
    logged_params,
    run_name,
    spec_teachers,
    train_students,
    weighting_summary,
)

COMPLETE = "complete.json"


# --------------------------------------------------------------------------------------
# Outputs of one student


def write_outputs(trained: StudentRun, params: Params, data: Prepared, device: torch.device, root: Path,
                  record: dict[str, str]) -> dict:
    """Weights (with what the student is in their metadata), numbers-only metrics, the
    per-epoch history and the teacher-weight histograms of a trained student."""
    spec, result = trained.spec, trained.result
    paths = student_paths(spec.output, root)
    teachers = spec_teachers(spec, params)
    meta = {"architecture": spec.distill.student, "method": spec.method.name, "seed": str(spec.seed),
            "output": spec.output, "teachers": ",".join(teachers), "dataset_sha256": data.manifest_hash,
            "device": device_name(device), "precision": active_precision(device),
            "tuned_from": spec.tuned_from or "", **record}
    save_tensors(paths["weights"], {k: v.detach().cpu() for k, v in trained.model.state_dict().items()}, meta)
    last = result.history[-1]
    metrics = {"val_acc": last["val_acc"], "test_acc": last.get("test_acc"), "train_acc": last["train_acc"],
               "seed": spec.seed, "params": count_parameters(trained.model), "size_mb": model_size_mb(trained.model),
               "epochs": spec.distill.recipe.epochs, "seconds": result.seconds,
               "images_per_second": result.images_per_second, "bf16": int(bf16_enabled(device))}
    weighting = weighting_summary(result.history, teachers)
    if weighting:
        metrics["weighting"] = weighting
    write_json(paths["metrics"], {k: v for k, v in metrics.items() if v is not None})
    write_history_csv(paths["plots"], result.history)
    write_json(paths["histograms"], trained.histograms)
    return metrics


def _final_metrics(metrics: dict) -> dict[str, float]:
    out = {"final/val_acc": metrics["val_acc"], "final/seconds": metrics["seconds"],
           "final/images_per_second": metrics["images_per_second"]}
    if metrics.get("test_acc") is not None:
        out["final/test_acc"] = metrics["test_acc"]
    return out


# --------------------------------------------------------------------------------------
# Training a group with one tracked run per student


def _student_tags(spec: StudentSpec, kind: str, params: Params, data: Prepared, device: torch.device,
                  group: dict[str, Any] | None) -> dict[str, Any]:
    tags = {**stage_tags(params, device, data.manifest_hash), "method": spec.method.name, "seed": spec.seed,
            "output": spec.output, "run_kind": kind, "tuned": str(spec.tuned_from is not None).lower(),
            "hyperparameters": hyperparameter_label(spec)}
    if group:
        tags.update({f"group.{k}": v for k, v in group.items()})
    return tags


def train_and_write(params: Params, specs: Sequence[StudentSpec], kind: str, data: Prepared, device: torch.device,
                    root: Path, checkpoint: Path | None, progress: bool, group: dict[str, Any] | None = None
                    ) -> list[dict]:
    """Train `specs` together, each logged to its own run, and write their outputs under `root`."""
    teachers = {s.output: spec_teachers(s, params) for s in specs}
    with contextlib.ExitStack() as stack:
        runs = [stack.enter_context(tracked_run(
            params, run_name=run_name(spec, kind), stage=kind,
            log_params=logged_params(spec, params, teachers[spec.output]),
            tags=_student_tags(spec, kind, params, data, device, group))) for spec in specs]
        for run in runs:
            log_prepared_input(run, data)
        trained = train_students(params, specs, data, device, runs, checkpoint, progress)
        # Two normalised validation images: the logged model's input example and signature.
        example = normalize(to_device_tensor(data.val_images[:2], "cpu")).contiguous().numpy()
        all_metrics = []
        for run, student in zip(runs, trained):
            # Only what the student is goes into its files; which run made them is kept apart
            # (tracking.record_output), so identical trainings write identical bytes.
            record = {"run_kind": kind}
            if group:
                record.update({f"group_{k}": str(v) for k, v in group.items()})
            metrics = write_outputs(student, params, data, device, root, record)
            run.log_metrics(_final_metrics(metrics))
            for key in ("metrics", "plots", "histograms"):
                run.log_artifact(student_paths(student.spec.output, root)[key], "outputs")
            model_id = run.log_model(
                student.model.cpu().eval(), name=student.spec.output, input_example=example,
                registered_name=f"matekd-student-{student.spec.method.name}",
                builder=ModelBuilder("matekd.models:build_model", {"name": student.spec.distill.student}))
            record_output(run, "weights", student_paths(student.spec.output, root)["weights"], model_id)
            all_metrics.append(metrics)
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)   # a finished run leaves no checkpoint to resume
    return all_metrics


# --------------------------------------------------------------------------------------
# Groups: trained once, written member by member


def group_store(digest: str, root: Path = Path(".")) -> Path:
    return root / GROUP_STORE_DIR / digest[:24]


def _group_info(digest: str, specs: Sequence[StudentSpec]) -> dict[str, Any]:
    return {"digest": digest, "students": len(specs), "members": ",".join(s.output for s in specs)}


def train_group(params: Params, specs: Sequence[StudentSpec], data: Prepared, device: torch.device,
                progress: bool, root: Path = Path(".")) -> Path:
    """Train a group (or find it already trained) into its store; returns the store folder."""
    digest = group_digest(params, specs, data.manifest_hash)
    store = group_store(digest, root)
    done = store / COMPLETE
    if done.is_file() and read_json(done).get("digest") == digest:
        return store
    store.mkdir(parents=True, exist_ok=True)
    info = _group_info(digest, specs)
    train_and_write(params, specs, "ablation", data, device, store, store / "checkpoint.pt", progress, info)
    write_json(done, {"digest": digest, "members": [s.output for s in specs]})
    return store


def write_member(spec: StudentSpec, store: Path, root: Path = Path(".")) -> dict:
    """Copy one member's outputs from its group's store to their pipeline paths; remove the
    store once every member has been written."""
    source, target = student_paths(spec.output, store), student_paths(spec.output, root)
    for key in ("weights", "metrics", "plots", "histograms"):
        if not source[key].is_file():
            raise MatekdError(f"the group store {store} lacks {source[key]}; delete {store} and rerun")
        with atomic_path(target[key]) as tmp:
            shutil.copyfile(source[key], tmp)
    (store / f"{spec.output}.written").touch()
    complete = read_json(store / COMPLETE)
    for member in complete["members"]:
        # A member whose outputs already come from this very training (a rerun of one member
        # retrains its group) needs nothing from the store.
        weights = student_paths(member, root)["weights"]
        if not (store / f"{member}.written").exists() and weights.is_file() \
                and read_safetensors_metadata(weights).get("group_digest") == complete["digest"]:
            (store / f"{member}.written").touch()
    if all((store / f"{m}.written").exists() for m in complete["members"]):
        shutil.rmtree(store, ignore_errors=True)
    return read_json(target["metrics"])


# --------------------------------------------------------------------------------------
# The ablation matrix in groups, over devices


def plan_groups(specs: Sequence[StudentSpec], size: int) -> list[list[StudentSpec]]:
    """Cut the ablation's students into groups of at most `size` that can train together
    (same student architecture and recipe), keeping the table's order (methods, then seeds)."""
    if size < 1:
        raise ParamsError(f"ablation.group_size = {size}: must be at least 1")
    buckets: dict[str, list[StudentSpec]] = {}
    for spec in specs:
        key = digest_of(spec.distill.student, spec.distill.recipe.model_dump(mode="json"))
        buckets.setdefault(key, []).append(spec)
    groups = []
    for members in buckets.values():
        groups += [members[i:i + size] for i in range(0, len(members), size)]
    return groups


def train_matrix(params: Params, devices: Sequence[str] | None = None, prepared_dir: str | Path = "prepared",
                 progress: bool = True) -> list[dict]:
    """Train every group of the ablation matrix, one process per device (`devices`, default every
    visible GPU, else the CPU), then write every student's outputs from the group stores."""
    specs = ablation_specs(params)
    groups = plan_groups(specs, params.ablation.group_size)
    targets = [torch.device(d) for d in devices] if devices else visible_devices(params.device)
    plan = assign_round_robin(groups, [str(d) for d in targets])
    jobs = [(device, [[s.output for s in g] for g in assigned]) for device, assigned in plan if assigned]
    print(f"ablation: {len(specs)} students in {len(groups)} group(s) of at most {params.ablation.group_size} on "
          f"{', '.join(d for d, _ in jobs)}", file=sys.stderr)
    dumped = params.model_dump(mode="json")
    if len(jobs) == 1:
        train_groups(dumped, jobs[0][0], jobs[0][1], str(prepared_dir), progress)
    else:
        _spawn(dumped, jobs, str(prepared_dir))
    data = load_prepared(prepared_dir)
    written = []
    for group in groups:
        digest = group_digest(params, group, data.manifest_hash)
        store = group_store(digest)
        for spec in group:
            written.append(write_member(spec, store))
    return written




def train_groups(params_dump: dict, device: str, outputs: list[list[str]], prepared_dir: str, progress: bool) -> None:
    """Train the groups named by their members' outputs on one device (one process)."""
    params = validate_params(params_dump)
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    data = load_prepared(prepared_dir)
    by_output = {s.output: s for s in ablation_specs(params)}
    for members in outputs:
        group = [by_output[o] for o in members]
        configure_determinism(group[0].seed, params.deterministic)
        use_precision(params.precision, torch_device)
        train_group(params, group, data, torch_device, progress)


def _worker(params_dump: dict, device: str, outputs: list[list[str]], prepared_dir: str, errors: Any) -> None:
    try:
        train_groups(params_dump, device, outputs, prepared_dir, progress=False)
    except BaseException as exc:  # report to the parent, then fail the process
        errors.put(f"{device}: {type(exc).__name__}: {exc}")
        raise


def _spawn(params_dump: dict, jobs: list[tuple[str, list[list[str]]]], prepared_dir: str) -> None:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(params_dump, device, outputs, prepared_dir, errors),
                         name=f"matekd-ablation-{device}") for device, outputs in jobs]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.join()
    except BaseException:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        raise
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    failed = [p.name for p in procs if p.exitcode != 0]
    if failed or messages:
        raise MatekdError(f"ablation worker(s) failed: {'; '.join(messages) or ', '.join(failed)}. Finished groups are "
                          "kept; rerun `matekd ablation` to train the rest")

