"""`matekd bench`: cost of a student training step per way of getting the teacher signals.

Times, on the current device, full optimisation steps (augmentation, forward, backward,
update) of the ResNet20 student for: cross-entropy only; multi-teacher KD with the teachers run
online on every augmented batch; MATE-KD with teachers online; and MATE-KD with cached
teacher maps and exact per-variant cached logits. Teachers are randomly initialised (the cost
does not depend on their weights) and the data is synthetic, so it needs no pipeline outputs.
Each variant gets warm-up steps, then `repeats` timed steps; the median is reported as a ratio to
the cross-entropy step.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from .augment import num_variants, sample_crop_flip
from .models import build_model
from .params import Params
from .runtime import device_name
from .storage import write_json
from .student import TeacherSignals, make_step
from .train import PAD, device_labels, make_batch, make_optimizer, optimise, prepare_model, resolve_device


def _time_steps(step_fn, student, images, labels, batch_size, repeats, warmup, device, recipe) -> list[float]:
    optimizer = make_optimizer(student, recipe)
    gen = torch.Generator().manual_seed(0)
    n = images.shape[0]
    times = []
    for i in range(warmup + repeats):
        index = torch.randint(0, n, (batch_size,), generator=gen).to(device)
        offsets, flips = sample_crop_flip(batch_size, PAD, gen, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        tic = time.perf_counter()
        batch = make_batch(images, labels, index, offsets, flips, device)
        optimise(step_fn, batch, 0, optimizer, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - tic)
    return times


def run_bench(params: Params, batch_size: int | None = None, repeats: int = 20, warmup: int = 3,
              output: str | Path = "metrics/bench.json") -> dict:
    device = resolve_device(params.device)
    torch.manual_seed(0)
    batch_size = batch_size or params.distill.recipe.batch_size
    names = list(params.teachers)
    k, n = len(names), max(batch_size * 4, 256)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = device_labels(torch.randint(0, 10, (n,)), device)
    maps = torch.rand(k, n, params.cache.resolution, params.cache.resolution, device=device).half()
    cached_logits = torch.randn(k, n, num_variants(PAD), 10, device=device).half()
    teachers = [prepare_model(build_model(name), device).eval().requires_grad_(False) for name in names]
    variants = {
        "ce": ("ce", TeacherSignals([])),
        "kd_online": ("mtkd_equal", TeacherSignals(names, models=teachers)),
        "mate_kd_online": ("mate_kd", TeacherSignals(names, models=teachers, train_maps=maps)),
        "mate_kd_cached": ("mate_kd", TeacherSignals(names, train_maps=maps, train_logits=cached_logits)),
    }
    results = {}
    for label, (method, signals) in variants.items():
        student = prepare_model(build_model(params.distill.student), device).train()
        step_fn = make_step(params, method, student, signals, histogram=None)
        times = _time_steps(step_fn, student, images, labels, batch_size, repeats, warmup, device,
                            params.distill.recipe)
        median = statistics.median(times)
        results[label] = {"median_s": median, "images_per_second": batch_size / median,
                          "min_s": min(times), "max_s": max(times)}
    base = results["ce"]["median_s"]
    for entry in results.values():
        entry["ratio_to_ce"] = entry["median_s"] / base
    device_label = device_name(device)
    report = {"device": device_label, "batch_size": batch_size, "repeats": repeats, "warmup": warmup,
              "teachers": names, "student": params.distill.student, "torch": torch.__version__,
              "steps": results}
    print(f"student step cost on {device_label}, batch {batch_size}, median of {repeats} steps:")
    print(f"{'variant':<16} {'ms/step':>9} {'img/s':>9} {'x CE':>6}")
    for label, entry in results.items():
        print(f"{label:<16} {entry['median_s'] * 1e3:9.1f} {entry['images_per_second']:9.0f} "
              f"{entry['ratio_to_ce']:6.2f}")
    write_json(output, report)
    return report
