"""`matekd bench`: cost of a student training step, per way of getting the teachers' outputs, and
the gain of training several students together.

Times, on the current device, full optimisation steps (augmentation, forward, backward,
update) of the student for: cross-entropy only; multi-teacher KD with the teachers run online
on every augmented batch; MATE-KD with teachers online; MATE-KD with cached teacher maps and
exact per-variant cached logits; and K cached MATE-KD students trained together as one
network (`--together K`, default ablation.group_size or 4), whose throughput per student is
compared with training them one at a time. Teachers are randomly initialised (the cost does
not depend on their weights) and the data is synthetic, so it needs no pipeline outputs. Each
variant gets warm-up steps, then `repeats` timed steps; the median is reported.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ..augment import num_variants, sample_crop_flip
from ..models import build_model
from ..params import Params
from ..precision import cpu_supports_bf16, resolve_precision, use_precision
from ..storage import write_json
from ..training.loop import (
    PAD,
    configure_determinism,
    device_labels,
    device_name,
    make_batch,
    make_optimizer,
    optimise,
    prepare_model,
    resolve_device,
)
from ..training.networks import as_one_module
from ..training.students import resolve_spec, student_step
from ..training.teacher_outputs import TeacherOutputs


def _time_steps(step_fn, model, images, labels, batch_size, slots, repeats, warmup, device, recipe) -> list[float]:
    optimizer = make_optimizer(model, recipe)
    gen = torch.Generator().manual_seed(0)
    n = images.shape[0]
    times = []
    for i in range(warmup + repeats):
        index = torch.randint(0, n, (slots, batch_size), generator=gen).to(device)
        offsets, flips = sample_crop_flip(slots * batch_size, PAD, gen, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        batch = make_batch(images, labels, index, offsets.view(slots, batch_size, 2), flips.view(slots, batch_size),
                           device)
        optimise(step_fn, batch, 0, optimizer, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return times


def bench_precisions(configured: str, device: torch.device) -> list[str]:
    """The precisions to time: the configured one, and on a bf16-capable CPU both fp32 and bf16
    side by side (the CPU is where the choice is a trade-off worth seeing)."""
    if device.type == "cpu" and cpu_supports_bf16():
        return ["fp32", "bf16"]
    return [configured]


def run_bench(params: Params, batch_size: int | None = None, repeats: int = 20, warmup: int = 3,
              together: int | None = None, output: str | Path = "metrics/bench.json") -> dict:
    device = resolve_device(params.device)
    # The cuDNN settings training runs with (benchmark autotuning unless deterministic): timed
    # with other kernels, the targets would not measure the training step.
    configure_determinism(params.seed, params.deterministic)
    batch_size = batch_size or params.distill.recipe.batch_size
    together = together or max(params.ablation.group_size, 4)
    configured = resolve_precision(params.precision, device)
    by_precision = {}
    for precision in bench_precisions(configured, device):
        use_precision(precision, device)
        by_precision[precision] = _bench_steps(params, device, batch_size, repeats, warmup, together)
    use_precision(configured, device)
    results = by_precision.get(configured) or next(iter(by_precision.values()))
    alone, grouped = results["mate_kd_cached"], results[f"mate_kd_cached_x{together}"]
    # One at a time, K students share the device in turn: each advances at alone/K images per second.
    speedup = grouped["images_per_second"] / alone["images_per_second"]
    device_label = device_name(device)
    report = {"device": device_label, "precision": configured, "batch_size": batch_size, "repeats": repeats,
              "warmup": warmup, "teachers": list(params.teachers), "student": params.distill.student,
              "torch": torch.__version__, "together": together, "together_speedup": speedup, "steps": results,
              "by_precision": by_precision}
    names = list(by_precision)
    print(f"student step cost on {device_label}, batch {batch_size} per student, median of {repeats} steps "
          f"({configured} is what training uses):")
    header = "".join(f" {p + ' ms':>10} {p + ' img/s':>11} {'x CE':>5}" for p in names)
    print(f"{'variant':<22}{header}" + (f" {'bf16 gain':>9}" if len(names) > 1 else ""))
    for label in results:
        rows = [by_precision[p][label] for p in names]
        cells = "".join(f" {r['median_s'] * 1e3:10.1f} {r['images_per_second']:11.0f} {r['ratio_to_ce']:5.2f}"
                        for r in rows)
        gain = (f" {by_precision['fp32'][label]['median_s'] / by_precision['bf16'][label]['median_s']:8.2f}x"
                if len(names) > 1 else "")
        print(f"{label:<22}{cells}{gain}")
    print(f"{together} students together: {speedup:.2f}x the throughput of one at a time "
          f"({grouped['images_per_second_per_student']:.0f} vs {alone['images_per_second'] / together:.0f} "
          "images/s per student)")
    write_json(output, report)
    return report


def _bench_steps(params: Params, device: torch.device, batch_size: int, repeats: int, warmup: int,
                 together: int) -> dict:
    """Median step times of every variant at the precision in force."""
    torch.manual_seed(0)
    names = list(params.teachers)
    k, n = len(names), max(batch_size * 4, 256)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = device_labels(torch.randint(0, 10, (n,)), device)
    maps = torch.rand(k, n, params.cache.resolution, params.cache.resolution, device=device).half()
    cached_logits = torch.randn(k, n, num_variants(PAD), 10, device=device).half()
    teachers = [prepare_model(build_model(name), device).eval().requires_grad_(False) for name in names]
    online = TeacherOutputs(names, models=teachers, train_maps=maps)
    cached = TeacherOutputs(names, train_maps=maps, train_logits=cached_logits)
    variants = {
        "ce": ("ce", TeacherOutputs([]), 1),
        "kd_online": ("mtkd_equal", online, 1),
        "mate_kd_online": ("mate_kd", online, 1),
        "mate_kd_cached": ("mate_kd", cached, 1),
        f"mate_kd_cached_x{together}": ("mate_kd", cached, together),
    }
    results = {}
    for label, (method, outputs, slots) in variants.items():
        specs = [resolve_spec(params, method, seed, f"{method}-seed{seed}") for seed in range(slots)]
        students = []
        for spec in specs:
            torch.manual_seed(spec.seed)
            students.append(build_model(spec.distill.student))
        group = prepare_model(as_one_module(students), device).train()
        step_fn = student_step(params, specs, group, outputs, device)
        times = _time_steps(step_fn, group, images, labels, batch_size, slots, repeats, warmup, device,
                            params.distill.recipe)
        median = statistics.median(times)
        results[label] = {"students": slots, "median_s": median, "images_per_second": slots * batch_size / median,
                          "images_per_second_per_student": batch_size / median,
                          "min_s": min(times), "max_s": max(times)}
    base = results["ce"]["median_s"]
    for entry in results.values():
        entry["ratio_to_ce"] = entry["median_s"] / base / entry["students"]
    return results
