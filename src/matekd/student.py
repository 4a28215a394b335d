"""Stages distill and ablation: train the ResNet20 student with one of the five methods.

Methods (method.md): `ce` (labels only), `kd` (one named teacher), `mtkd_equal` (teachers
weighted 1/K), `mate_kd_noattr` (attribution-weighted teachers, beta 0) and `mate_kd`
(attribution-weighted teachers plus the attribution loss). Teacher logits are computed on the
augmented batch (online) or gathered exactly from the per-variant cache; teacher maps come from
the cache, shifted with each image's crop and flip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .attribution import model_cam
from .augment import shift_maps, to_device_tensor, variant_index
from .cache import load_cache
from .errors import CacheError, ParamsError
from .data import Prepared, load_prepared
from .distill import mate_kd_loss, tau_at_epoch, teacher_weights, weight_statistics, similarity
from .models import build_model, count_parameters, model_size_mb
from .params import METHODS, Params
from .runtime import digest_of, stage, write_history_csv
from .storage import save_tensors, write_json
from .teachers import load_teacher
from .train import PAD, Batch, FitResult, StepOutput, device_labels, fit, image_variants, prepare_model
from .tracking import NullRun

TEACHERLESS = {"ce"}
ATTRIBUTION_WEIGHTED = {"mate_kd_noattr", "mate_kd"}


def method_teachers(params: Params, method: str) -> list[str]:
    if method in TEACHERLESS:
        return []
    if method == "kd":
        return [params.distill.kd_teacher]
    return list(params.teachers)


def student_paths(output_name: str, root: Path = Path(".")) -> dict[str, Path]:
    return {
        "weights": root / "models" / "student" / f"{output_name}.safetensors",
        "metrics": root / "metrics" / "student" / f"{output_name}.json",
        "plots": root / "plots" / "student" / f"{output_name}.csv",
        "checkpoint": root / "checkpoints" / "student" / f"{output_name}.pt",
        "histograms": root / "plots" / "student" / f"{output_name}-weights.json",
    }


@dataclass
class TeacherSignals:
    """Everything the student step needs from the teachers, resident on the device."""

    names: list[str]
    models: list[torch.nn.Module] = field(default_factory=list)   # online logits
    train_maps: torch.Tensor | None = None                          # [K, N, h, w] fp16
    train_logits: torch.Tensor | None = None                        # [K, N, V, C] fp16
    train_logits_mask: torch.Tensor | None = None                   # [K, N, V] variants cached

    def check_coverage(self, seed: int, epochs: int) -> None:
        """Refuse cached logits that lack a variant this run's seed and epochs will gather."""
        if self.train_logits_mask is None:
            return
        mask = self.train_logits_mask.cpu()
        n = mask.shape[1]
        variants = image_variants(seed, epochs, n)
        covered = mask[:, torch.arange(n).expand_as(variants), variants]
        if not bool(covered.all()):
            raise CacheError(
                f"the cached teacher logits do not cover seed {seed} for {epochs} epochs (built with "
                "cache.logit_variants: used for other seeds or fewer epochs); set cache.logit_variants: all, "
                "or list the seed in ablation.seeds, then rerun `dvc repro cache`")


def load_signals(params: Params, method: str, data: Prepared, device: torch.device) -> TeacherSignals:
    names = method_teachers(params, method)
    signals = TeacherSignals(names)
    if not names:
        return signals
    cached = params.distill.teacher_signals == "cached"
    needs_maps = method in ATTRIBUTION_WEIGHTED
    if cached or needs_maps:
        caches = [load_cache(n, data.manifest_hash, device, need_logits=cached) for n in names]
        if needs_maps:
            signals.train_maps = torch.stack([c.train_maps for c in caches])
        if cached:
            signals.train_logits = torch.stack([c.train_logits for c in caches])
            if all(c.train_logits_mask is not None for c in caches):
                signals.train_logits_mask = torch.stack([c.train_logits_mask for c in caches])
    if not cached:
        signals.models = [load_teacher(n, device) for n in names]
    return signals


class WeightHistogram:
    """Per-epoch teacher-weight histogram counts, accumulated on the device."""

    def __init__(self, names: list[str], bins: int, device: torch.device):
        self.names, self.bins = names, bins
        self.counts = torch.zeros(len(names), bins, device=device)

    def add(self, counts: torch.Tensor) -> None:
        self.counts += counts

    def take(self) -> torch.Tensor:
        counts = self.counts.clone()
        self.counts.zero_()
        return counts


LOGGED_STATS = ("weight_mean", "weight_std", "dominant_fraction", "similarity_mean", "similarity_std", "entropy")


def make_step(params: Params, method: str, student: torch.nn.Module, signals: TeacherSignals,
              histogram: WeightHistogram | None) -> Callable[[Batch, int], StepOutput]:
    cfg = params.distill
    k = len(signals.names)
    beta = cfg.attribution_weight if method == "mate_kd" else 0.0
    alpha = 1.0 if method == "ce" else cfg.ce_weight

    def teacher_logits(batch: Batch) -> torch.Tensor:
        if signals.train_logits is not None:
            variants = variant_index(batch.offsets, batch.flips, PAD)
            return signals.train_logits[:, batch.index, variants].float()
        with torch.no_grad():
            return torch.stack([m(batch.inputs).float() for m in signals.models])

    def step(batch: Batch, epoch: int) -> StepOutput:
        if method == "ce":
            logits = student(batch.inputs)
            ce = F.cross_entropy(logits.float(), batch.labels)
            zero = torch.zeros((), device=ce.device)
            return StepOutput(ce, logits, {"total": ce.detach(), "ce": ce.detach(), "kd": zero, "attr": zero})
        t_logits = teacher_logits(batch)
        terms: dict[str, torch.Tensor] = {}
        student_maps = teacher_maps = None
        if method in ATTRIBUTION_WEIGHTED:
            logits, activations = student.forward_cam(batch.inputs)
            targets = batch.labels if cfg.student_target == "label" else logits.detach().argmax(1)
            student_maps = model_cam(student, activations.float(), logits.float(), targets,
                                     create_graph=beta > 0)
            if beta == 0:
                student_maps = student_maps.detach()
            teacher_maps = torch.stack([
                shift_maps(signals.train_maps[j, batch.index].float(), batch.offsets, batch.flips, PAD)
                for j in range(k)])
            sim = similarity(student_maps.detach(), teacher_maps, kind=cfg.similarity, clip=cfg.clip_similarity)
            tau = tau_at_epoch(epoch, cfg.similarity_temperature, cfg.similarity_temperature_end,
                               cfg.similarity_schedule_epochs)
            weights = teacher_weights(sim, tau, rescale=cfg.rescale_weights)
            stats = weight_statistics(weights, sim, bins=cfg.histogram_bins)
            for key in LOGGED_STATS:
                value = stats[key]
                if value.dim() == 0:
                    terms[key] = value
                else:
                    for j, name in enumerate(signals.names):
                        terms[f"{key}/{name}"] = value[j]
            if histogram is not None:
                histogram.add(stats["histogram"])
        else:
            logits = student(batch.inputs)
            weights = torch.full((k, logits.shape[0]), 1.0 / k, device=logits.device)
        losses = mate_kd_loss(logits.float(), t_logits, batch.labels, weights, student_maps, teacher_maps,
                              kd_temperature=cfg.kd_temperature, ce_weight=alpha, attribution_weight=beta,
                              map_norm=cfg.map_norm)
        terms.update({key: value.detach() for key, value in losses.items()})
        return StepOutput(losses["total"], logits, terms)

    return step


def histogram_figure(counts: torch.Tensor, names: list[str], epoch: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    bins = counts.shape[1]
    edges = np.linspace(0, 1, bins + 1)
    fig, ax = plt.subplots(figsize=(5, 3), dpi=100)
    for j, name in enumerate(names):
        ax.stairs(counts[j].cpu().numpy(), edges, label=name)
    ax.set(xlabel="teacher weight", ylabel="samples", title=f"teacher weights, epoch {epoch}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_to_array(fig):
    import numpy as np

    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    import matplotlib.pyplot as plt

    plt.close(fig)
    return image


@dataclass
class StudentRun:
    model: torch.nn.Module
    result: FitResult
    histograms: list[dict]


def train_student(params: Params, method: str, seed: int, data: Prepared, device: torch.device,
                  run: NullRun, checkpoint: Path | None, progress: bool = True,
                  epoch_hook: Callable[[int, dict], None] | None = None,
                  with_test: bool = True, signals_loader: Callable[..., TeacherSignals] | None = None
                  ) -> StudentRun:
    """Train a student; shared by the distill/ablation stages and the Optuna objective (which
    passes a `signals_loader` that keeps teachers and caches loaded across trials)."""
    cfg = params.distill
    torch.manual_seed(seed)
    student = prepare_model(build_model(cfg.student), device)
    signals = (signals_loader or load_signals)(params, method, data, device)
    signals.check_coverage(seed, cfg.recipe.epochs)
    histogram = (WeightHistogram(signals.names, cfg.histogram_bins, device)
                 if method in ATTRIBUTION_WEIGHTED else None)
    histograms: list[dict] = []

    def on_epoch(epoch: int, record: dict) -> None:
        if histogram is not None:
            counts = histogram.take()
            histograms.append({"epoch": epoch, "bins": cfg.histogram_bins,
                               "counts": {n: counts[j].tolist() for j, n in enumerate(signals.names)}})
            if run.active:
                run.log_image(figure_to_array(histogram_figure(counts, signals.names, epoch)),
                              key="teacher_weight_histogram", step=epoch)
                run.log_dict(histograms[-1], f"histograms/teacher_weights_epoch{epoch:03d}.json")
        if epoch_hook is not None:
            epoch_hook(epoch, record)

    digest = digest_of("student", method, seed, cfg.model_dump(), params.teachers and
                       {n: params.teachers[n].model_dump() for n in signals.names}, data.manifest_hash)
    result = fit(model=student, step_fn=make_step(params, method, student, signals, histogram),
                 recipe=cfg.recipe, train_images=to_device_tensor(data.train_images, device),
                 train_labels=device_labels(data.train_labels, device),
                 val_images=to_device_tensor(data.val_images, device),
                 val_labels=device_labels(data.val_labels, device), device=device, seed=seed, run=run,
                 checkpoint=checkpoint, digest=digest, desc=f"{method}-seed{seed}", log_every=cfg.log_every,
                 test_images=to_device_tensor(data.test_images, device) if with_test else None,
                 test_labels=device_labels(data.test_labels, device) if with_test else None,
                 epoch_hook=on_epoch, progress=progress)
    return StudentRun(student, result, histograms)


def run_name_for(params: Params, method: str, seed: int) -> str:
    cfg = params.distill
    parts = [method, f"seed{seed}"]
    if method != "ce":
        parts.append(f"T{cfg.kd_temperature:g}")
        parts.append(f"a{cfg.ce_weight:g}")
    if method in ATTRIBUTION_WEIGHTED:
        parts.append(f"tau{cfg.similarity_temperature:g}")
    if method == "mate_kd":
        parts.append(f"b{cfg.attribution_weight:g}")
    return " ".join(parts)


def run_distill(params: Params, method: str | None = None, seed: int | None = None,
                output_name: str | None = None, prepared_dir: str | Path = "prepared",
                progress: bool = True) -> dict:
    method = method or params.distill.method
    seed = params.distill.seed if seed is None else seed
    if method not in METHODS:
        raise ParamsError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    output_name = output_name or "distill"
    paths = student_paths(output_name)
    data = load_prepared(prepared_dir)
    with stage(params, name="distill", run_name=run_name_for(params, method, seed), seed=seed,
               data_hash=data.manifest_hash,
               tags={"method": method, "seed": seed, "output": output_name}) as ctx:
        ctx.run.log_params({"run.method": method, "run.seed": seed})
        trained = train_student(params, method, seed, data, ctx.device, ctx.run, paths["checkpoint"], progress)
        model, result = trained.model, trained.result
        last = result.history[-1]
        save_tensors(paths["weights"], model.state_dict(),
                     {"architecture": params.distill.student, "method": method, "seed": str(seed),
                      "dataset_sha256": data.manifest_hash})
        metrics = {"model": f"student-{output_name}", "method": method, "seed": seed,
                   "val_acc": last["val_acc"], "test_acc": last["test_acc"], "train_acc": last["train_acc"],
                   "params": count_parameters(model), "size_mb": model_size_mb(model),
                   "epochs": params.distill.recipe.epochs, "seconds": result.seconds,
                   "images_per_second": result.images_per_second, "device": ctx.device.type,
                   "teachers": method_teachers(params, method), "dataset_sha256": data.manifest_hash}
        write_json(paths["metrics"], metrics)
        write_history_csv(paths["plots"], result.history)
        write_json(paths["histograms"], trained.histograms)
        ctx.run.log_metrics({"final/val_acc": metrics["val_acc"], "final/test_acc": metrics["test_acc"],
                             "final/seconds": result.seconds, "final/images_per_second": result.images_per_second})
        for key in ("weights", "metrics", "plots", "histograms"):
            ctx.run.log_artifact(paths[key], "outputs")
    return metrics
