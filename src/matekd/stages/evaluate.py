"""Stage evaluate: clean accuracy, CIFAR-10-C robustness and Grad-CAM agreement of every model.

Models: every teacher of params.teachers and every student found under
models/student/*.safetensors. Outputs (the whole metrics/eval folder is replaced at once):
`metrics/eval/<model>.json` per model (teacher `<name>`, student `student-<output-name>`),
`metrics/eval/gradcam-<student>.json` and `.png` per student.

While it runs, each model's `<model>.json` is also written to metrics/eval-partial/ as soon as
that model is done, the students first (evaluated together: one fused network on a GPU), then
each teacher: a run stopped part-way (the GPU runner's time limit) keeps every finished
number. The folder is removed once metrics/eval is in place.
"""

from __future__ import annotations

import math
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..augment import to_device_tensor
from ..cifar10c import load_corrupted
from ..corruptions import SEVERITIES
from ..data.prepared import load_prepared
from ..evaluation import (
    cams_in_batches,
    corruption_digest,
    corruption_label,
    corruption_table,
    dataset_label,
    evaluate_clean,
    gradcam_agreement,
    gradcam_figure,
    load_student,
    stratified_order,
    summarise_corruption,
    test_set_digest,
    to_json_safe,
)
from ..models import count_parameters, model_size_mb
from ..params import DistillParams, Params, flatten, with_distill_values
from ..paths import EVAL_DIR, EVAL_PARTIAL_DIR, SUMMARY_METRICS, method_inputs_path
from ..plotting import png_bytes
from ..precision import active_precision
from ..storage import atomic_dir, read_json, sha256_file, write_json
from ..teachers import load_teacher
from ..tracking import run_for_digest
from ..training.loop import device_labels, device_name
from ..weighting import final_tau
from .context import stage, tracked_run

SUMMARY_KEYS = {"test_acc": ("test_acc",), "cifar10c_mean15": ("cifar10c", "standard_mean"),
                "cifar10c_mean19": ("cifar10c", "all_mean")}


def run_evaluate(params: Params, prepared_dir: str | Path = "prepared", corrupted_dir: str | Path = "cifar10c",
                 root: str | Path = ".", progress: bool = False) -> dict[str, dict]:
    """Evaluate every teacher and student; write metrics/eval/ and log it to MLflow.

    Returns {model name: its metrics dict} (as written to metrics/eval/<model>.json).
    """
    root = Path(root)
    settings = params.evaluate
    data = load_prepared(prepared_dir)
    corrupted, c_labels, c_manifest = load_corrupted(corrupted_dir)
    student_files = sorted((root / "models" / "student").glob("*.safetensors"))
    num_classes = len(data.class_names)
    data_label, c_label = dataset_label(data.manifest), corruption_label(c_manifest)
    skipped = dict(c_manifest.get("skipped") or {})
    c_hash = corruption_digest(c_manifest)
    # corrupt records which prepared data it was built from; a mismatch means a stale cifar10c/.
    c_source = c_manifest.get("prepared_manifest_sha256")
    c_matches = None if c_source is None else c_source == data.manifest_hash
    if c_matches is False:
        warnings.warn(f"{corrupted_dir} was built from other prepared data ({c_source[:12]}, now "
                      f"{data.manifest_hash[:12]}); rerun `dvc repro corrupt` for matching CIFAR-10-C",
                      stacklevel=2)
    c_images = int(c_labels.shape[0]) // len(SEVERITIES)
    results: dict[str, dict] = {}
    with stage(params, name="evaluate", run_name="evaluate", data_hash=data.manifest_hash,
               tags={"dataset": data_label, "cifar10c": c_label}, log_params=logged_params(params)) as ctx:
        device = ctx.device
        teachers = {name: load_teacher(name, device, root) for name in params.teachers}
        students: dict[str, nn.Module] = {}
        student_meta: dict[str, dict] = {}
        for path in student_files:
            name = f"student-{path.stem}"
            students[name], student_meta[name] = load_student(path, params.distill.student, device)
            student_meta[name]["weights_sha256"] = sha256_file(path)
            student_meta[name]["training_run"] = run_for_digest(student_meta[name]["weights_sha256"]) or {}
        test_x = to_device_tensor(data.test_images, device)
        common = {"dataset": data_label, "corruption_dataset": c_label, "profile": params.profile,
                  "test_images": int(data.test_labels.shape[0]), "class_names": list(data.class_names),
                  "dataset_sha256": data.manifest_hash, "cifar10c_manifest_sha256": c_hash,
                  "cifar10c_kind": c_manifest.get("kind"), "cifar10c_seed": c_manifest.get("seed"),
                  "cifar10c_images_per_severity": c_images, "cifar10c_skipped": skipped,
                  "cifar10c_matches_prepared": c_matches,
                  "device": device_name(device), "precision": active_precision(device),
                  "params_sha256": params.digest()}
        partial = root / EVAL_PARTIAL_DIR
        shutil.rmtree(partial, ignore_errors=True)        # an earlier cut's: not these models' numbers
        for batch in evaluation_batches(teachers, students):
            table = corruption_table(batch, corrupted, c_labels, settings.batch_size, device, progress)
            for name, model in batch.items():
                clean = evaluate_clean(model, test_x, data.test_labels, settings.batch_size, device, num_classes)
                entry: dict[str, Any] = {
                    "model": name, "kind": "teacher" if name in teachers else "student",
                    "architecture": student_meta.get(name, {}).get("architecture", name),
                    "params": count_parameters(model), "size_mb": model_size_mb(model),
                    "test_acc": clean["accuracy"],
                    "per_class_accuracy": dict(zip(data.class_names, clean["per_class_accuracy"].tolist())),
                    "confusion_matrix": clean["confusion_matrix"].tolist(),
                    "cifar10c": {"accuracy": table[name], **summarise_corruption(table[name])}, **common}
                if name in students:
                    meta = student_meta[name]
                    # The weights' hash (not a run id: this file must not change between identical
                    # runs) lets the report find the logged model of the run that made them.
                    entry.update({"output": name.removeprefix("student-"), "method": meta.get("method"),
                                  "seed": int(meta["seed"]) if str(meta.get("seed", "")).isdigit() else None,
                                  "weights_sha256": meta["weights_sha256"]})
                results[name] = to_json_safe(entry)
                write_json(partial / f"{name}.json", results[name])
        results = {name: results[name] for name in [*teachers, *students]}   # the order of the outputs
        values = {name: trained_values(params, student_meta[name].get("method"), name.removeprefix("student-"), root)
                  for name in students}
        gradcam = _gradcam_analysis(params, data, teachers, students, device, values)
        with atomic_dir(root / EVAL_DIR) as tmp:
            for name, entry in results.items():
                write_json(tmp / f"{name}.json", entry)
            for name, (summary, png) in gradcam.items():
                write_json(tmp / f"gradcam-{name}.json", summary)
                (tmp / f"gradcam-{name}.png").write_bytes(png)
        write_summary(root / SUMMARY_METRICS, results)
        shutil.rmtree(partial, ignore_errors=True)        # metrics/eval holds all of it now
        gradcam_summaries = {n: g for n, (g, _) in gradcam.items()}
        metrics = {name: model_metrics(entry, gradcam_summaries.get(name)) for name, entry in results.items()}
        datasets = eval_datasets(data, c_manifest, corrupted_dir)
        for dataset in datasets.values():
            dataset.log_input(ctx.run)
        _log(ctx.run, root / EVAL_DIR, metrics)
        _log_per_model(params, ctx.run, results, metrics, student_meta, datasets)
    return results


def evaluation_batches(teachers: dict[str, nn.Module], students: dict[str, nn.Module]) -> list[dict[str, nn.Module]]:
    """The models in the order they are evaluated, each batch finished (and written) before the
    next starts: all students together (the many numbers a cut would cost most, and on a GPU one
    fused network), then each teacher alone."""
    return ([students] if students else []) + [{name: model} for name, model in teachers.items()]


def summary_metrics(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{model: {test_acc, cifar10c_mean15, cifar10c_mean19}}: numbers only, so that `dvc metrics
    show` and `dvc exp show` read as one comparison table. A mean that could not be computed
    (e.g. a corruption skipped) is left out rather than written as null."""
    out: dict[str, dict[str, float]] = {}
    for model, entry in results.items():
        row = {}
        for key, (*parents, leaf) in SUMMARY_KEYS.items():
            node = entry
            for parent in parents:
                node = node.get(parent) or {}
            value = node.get(leaf)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                row[key] = float(value)
        out[model] = row
    return out


def write_summary(path: Path, results: dict[str, dict]) -> dict[str, dict[str, float]]:
    summary = summary_metrics(results)
    write_json(path, summary)
    return summary


def logged_params(params: Params) -> dict:
    d = params.distill
    return {**flatten({"evaluate": params.evaluate.model_dump(mode="json")}), "distill.student": d.student,
            "distill.similarity": d.similarity, "distill.clip_similarity": d.clip_similarity,
            "distill.rescale_weights": d.rescale_weights, "distill.histogram_bins": d.histogram_bins,
            "similarity_tau": final_tau(d)}


def trained_values(params: Params, method: str | None, output: str, root: Path = Path(".")) -> DistillParams:
    """The `distill.*` values a student trained with: the shared ones for the distill stage's
    student; for an ablation student, its method's values as methods/<method>.json records them
    (tuned ones with ablation.tuned), recipe included. A student of a method without a file (one
    trained before the stage existed) gets the shared values."""
    values = params.distill.model_copy(deep=True)
    record = method_inputs_path(method, root) if method and output != "distill" else None
    if record is not None and record.is_file():
        content = read_json(record)
        values = with_distill_values(values, {**content.get("values", {}), **content.get("recipe", {})})
    return values


def _gradcam_analysis(params: Params, data, teachers: dict[str, nn.Module], students: dict[str, nn.Module],
                      device: torch.device, values: dict[str, DistillParams]) -> dict[str, tuple[dict, bytes]]:
    """Per student: agreement of its Grad-CAM maps with each teacher's on the first
    evaluate.gradcam_images test images (classes interleaved), targets = true labels, weighted
    with the similarity settings and the temperature the student ended training with (its tau
    schedule's last value)."""
    if not students or not teachers:
        return {}
    settings = params.evaluate
    order = stratified_order(data.test_labels)[:settings.gradcam_images]
    images = to_device_tensor(data.test_images[order], device)
    targets = device_labels(data.test_labels[order], device)
    names = list(teachers)
    teacher_maps = [cams_in_batches(m, images, targets, settings.batch_size, device) for m in teachers.values()]
    rows = min(settings.grid_images, order.size)
    out: dict[str, tuple[dict, bytes]] = {}
    for student_name, student in students.items():
        trained = values[student_name]
        tau = final_tau(trained)
        student_maps = cams_in_batches(student, images, targets, settings.batch_size, device)
        agree = gradcam_agreement(student_maps, teacher_maps, tau, kind=trained.similarity,
                                  clip=trained.clip_similarity, rescale=trained.rescale_weights,
                                  bins=trained.histogram_bins)
        stats = {key: agree[key].cpu() for key in ("similarity_mean", "similarity_std", "weight_mean",
                                                    "weight_std", "dominant_fraction")}
        summary = {
            "student": student_name, "teachers": names, "images": int(order.size),
            "image_order": "stratified (classes interleaved) over the prepared test set",
            "target": "label", "similarity": trained.similarity, "clip_similarity": trained.clip_similarity,
            "rescale_weights": trained.rescale_weights, "tau": tau,
            "student_grid": list(student_maps.shape[-2:]),
            **{key: dict(zip(names, value.tolist())) for key, value in stats.items()},
            "weight_entropy": float(agree["entropy"]),
            "per_image": {"test_position": order.tolist(), "label": data.test_labels[order].tolist(),
                          "similarity": {n: agree["similarity"][j].cpu().tolist() for j, n in enumerate(names)},
                          "weight": {n: agree["weights"][j].cpu().tolist() for j, n in enumerate(names)}},
        }
        fig = gradcam_figure(data.test_images[order[:rows]], data.test_labels[order[:rows]],
                             student_maps[:rows], agree["teacher_maps"][:, :rows], agree["similarity"][:, :rows],
                             agree["weights"][:, :rows], names, data.class_names,
                             f"{student_name}: Grad-CAM vs teachers (s = {trained.similarity}, "
                             f"w = softmax(s/{tau:g}))")
        out[student_name] = (to_json_safe(summary), png_bytes(fig))
    return out


def model_metrics(entry: dict, gradcam: dict | None) -> dict[str, float]:
    """A model's evaluation numbers under short names: clean and CIFAR-10-C summaries, per
    severity and corruption, and (students) the Grad-CAM agreement with each teacher."""
    c = entry["cifar10c"]
    values = {"test_acc": entry["test_acc"], "cifar10c_mean15": c["standard_mean"],
              "cifar10c_mean19": c["all_mean"], "cifar10c_extra_mean": c["extra_mean"]}
    for s, acc in enumerate(c["per_severity_standard"] or [], start=1):
        values[f"cifar10c_severity{s}"] = acc
    for corruption, acc in c["per_corruption"].items():
        values[f"cifar10c/{corruption}"] = acc
    for key in ("similarity_mean", "weight_mean", "dominant_fraction"):
        for teacher, value in ((gradcam or {}).get(key) or {}).items():
            values[f"gradcam/{key}/{teacher}"] = value
    return {k: v for k, v in values.items() if v is not None}


def _log(run, folder: Path, metrics: dict[str, dict[str, float]]) -> None:
    """The evaluate run: every model's metrics (model_metrics) as `<model>/<metric>`, and the files."""
    run.log_metrics({f"{name}/{key}": value for name, values in metrics.items() for key, value in values.items()})
    for path in sorted(folder.iterdir()):
        run.log_artifact(path, "eval")


@dataclass(frozen=True)
class EvalDataset:
    """A dataset the models are evaluated on, as a run input and as the dataset of a model metric."""

    name: str
    digest: str
    source: str
    label: str   # what the numbers on it must be called (dataset_label, corruption_label)

    def log_input(self, run: Any) -> None:
        run.log_input(self.name, self.digest, self.source, "evaluation", tags={"dataset": self.label})


def eval_datasets(data: Any, c_manifest: dict, corrupted_dir: str | Path) -> dict[str, EvalDataset]:
    """{"test": the prepared test split, "cifar10c": the CIFAR-10-C set}."""
    return {"test": EvalDataset("cifar10-test", test_set_digest(data.manifest), "prepared",
                                dataset_label(data.manifest)),
            "cifar10c": EvalDataset("cifar10-c", corruption_digest(c_manifest), Path(corrupted_dir).as_posix(),
                                    corruption_label(c_manifest))}


def metric_dataset_key(metric: str) -> str:
    """Which evaluation dataset a model_metrics key was measured on (Grad-CAM: test images)."""
    return "cifar10c" if metric.startswith("cifar10c") else "test"


def _log_per_model(params: Params, parent: Any, results: dict[str, dict], metrics: dict[str, dict[str, float]],
                   student_meta: dict[str, dict], datasets: dict[str, EvalDataset]) -> None:
    """One nested run per model (`eval <model>`, stage `evaluate-model`) holding its clean and
    CIFAR-10-C numbers, tagged with its method and seed and linked to its training run: the
    runs table then compares methods on robustness, row by row. Its inputs are the evaluation
    datasets; a student's metrics are also its logged model's (MLflow 3 model metrics, each
    with the dataset it was measured on), when this store holds the run that trained it."""
    for name, entry in results.items():
        meta = student_meta.get(name, {})
        tags = {"model": name, "kind": entry["kind"], "dataset": entry["dataset"],
                "cifar10c": entry["corruption_dataset"], "profile": params.profile}
        logged = {"model": name, "architecture": entry["architecture"]}
        if entry["kind"] == "student":
            tags.update({"method": entry.get("method") or "", "seed": entry.get("seed"), "output": entry["output"]})
            logged.update({"distill.method": entry.get("method"), "distill.seed": entry.get("seed")})
        training = meta.get("training_run") or {}
        same_store = training.get("mode") == parent.mode   # ids of this store (offline ids are mapped at sync)
        if same_store:
            tags["training_run_id"] = training["run_id"]
        model_id = training.get("model_id") if same_store else None
        with tracked_run(params, run_name=f"eval {name}", stage="evaluate-model", log_params=logged, tags=tags,
                         parent_run_id=parent.run_id) as run:
            for dataset in datasets.values():
                dataset.log_input(run)
            if model_id:
                run.set_tags({"logged_model_id": model_id})
                run.log_model_input(model_id)
            for key, dataset in datasets.items():
                values = {k: v for k, v in metrics[name].items() if metric_dataset_key(k) == key}
                if values:
                    run.log_metrics(values, model_id=model_id, dataset=(dataset.name, dataset.digest))
