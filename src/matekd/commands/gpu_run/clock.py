"""The plan's own clock: the seconds each phase of a run should take on an H100, from the
profile and the rates measured there (docs/anchors.md), printed before the run starts and kept
in timings.json beside the measured seconds, so that the next window's epochs are set from a
measurement of how far off the assumed rates were.

Only the phases on the run's critical path are predicted: the smoke pass runs beside the run
and corrupt on the CPU in the background."""

from __future__ import annotations

from typing import Any

# One H100, PyTorch 2.11, bf16 autocast, channels_last, batch 512, data on the GPU (docs/anchors.md).
H100_RATES: dict[str, tuple[float, float]] = {     # model: (training img/s, inference img/s)
    "resnet20": (42_960, 170_131), "resnet56": (20_268, 66_727), "resnet110": (11_534, 44_831),
    "vgg19_bn": (60_704, 182_434), "densenet121": (7_323, 27_437),
}
CACHED_STEP_RATE = 52_213       # img/s of one cached MATE-KD ResNet20 student step (the ablation's)
FUSED_SPEEDUP = 4.0             # students trained or evaluated together: the >= 4x bench target (assumed)
STAGE_START_S = 8.0             # python, torch and CUDA initialisation of a stage
FIXED_S = {"method-inputs": 5.0, "report": 15.0, "bench": 20.0}
GRADCAM_S = 8.0                 # evaluate's Grad-CAM analysis and its figures
CORRUPTION_SEVERITIES = 5


def _images(params: Any) -> tuple[int, int, int]:
    """(train, validation, test) image counts of the profile (CIFAR-10: 10 classes, 50k + 10k)."""
    d = params.data
    val = 10 * d.val_per_class
    train = 10 * d.train_per_class if d.train_per_class is not None else 50_000 - val
    test = 10 * d.test_per_class if d.test_per_class is not None else 10_000
    return train, val, test


def predicted_phases(params: Any) -> tuple[dict[str, float], list[str]]:
    """({phase: predicted seconds}, notes): teachers (sharing one GPU: their times add), caches,
    method-inputs, ablation, evaluate, report and bench. A model without a measured rate leaves
    its phases out, named in the notes."""
    from ...cifar10c import resolve_corruptions

    train, val, test = _images(params)
    notes: list[str] = []
    unknown = sorted({n for n in [*params.teachers, params.distill.student] if n not in H100_RATES})
    if unknown:
        notes.append(f"no H100 rate for {', '.join(unknown)}: phases using them are not predicted")
    out: dict[str, float] = {}
    students = len(params.ablation.methods) * len(params.ablation.seeds)
    teachers = [n for n in params.teachers if n in H100_RATES]
    if teachers and len(teachers) == len(params.teachers):
        out["teachers"] = STAGE_START_S + sum(
            r.epochs * train / H100_RATES[n][0] + (r.epochs * val + test) / H100_RATES[n][1]
            for n, r in ((n, params.teachers[n]) for n in teachers))
        # Grad-CAM maps of the train and validation images, and the logits of every view the
        # students draw (one stream per distinct data order).
        streams = 1 if params.distill.data_seed is not None else len(params.ablation.seeds)
        views = streams * params.distill.recipe.epochs * train if params.distill.teacher_signals == "cached" else 0
        out["caches"] = STAGE_START_S + sum((train + val + views) / H100_RATES[n][1] for n in teachers)
    out["method-inputs"] = FIXED_S["method-inputs"]
    student = params.distill.student
    if student in H100_RATES:
        together = FUSED_SPEEDUP if params.ablation.group_size > 1 else 1.0
        epochs = params.distill.recipe.epochs
        out["ablation"] = STAGE_START_S + (students * epochs * train / (CACHED_STEP_RATE * together)
                                           + students * (epochs * val + test) / (H100_RATES[student][1] * together))
        corruptions = len(resolve_corruptions(params.corrupt.corruptions))
        per_class = params.corrupt.images_per_class
        c_images = corruptions * CORRUPTION_SEVERITIES * (10 * per_class if per_class is not None else test)
        if not unknown:
            out["evaluate"] = STAGE_START_S + GRADCAM_S + sum(
                (c_images + test) / H100_RATES[n][1] for n in params.teachers) + students * (c_images + test) / (
                H100_RATES[student][1] * together)
    out["report"] = FIXED_S["report"]
    out["bench"] = FIXED_S["bench"]
    notes.append(f"H100 rates of docs/anchors.md at batch 512; students together {FUSED_SPEEDUP:g}x one "
                 f"(assumed, the bench target); {STAGE_START_S:g} s start-up per stage")
    return {k: round(v, 1) for k, v in out.items()}, notes


def plan_lines(predicted: dict[str, float]) -> list[str]:
    """The prediction printed before the run starts."""
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in predicted.items())
    return [f"plan (H100 rates, docs/anchors.md): {parts}; {sum(predicted.values()):.0f} s in all"]


def clock_lines(predicted: dict[str, float], phases: dict[str, dict[str, float]]) -> list[str]:
    """Measured seconds per phase beside the predicted ones, and their ratio."""
    lines = ["Predicted vs measured seconds per phase:"]
    for name, seconds in predicted.items():
        measured = phases.get(name, {}).get("seconds")
        if measured is None:
            shown = "not run"
        else:
            shown = f"{measured:8.1f} s" + (f"  ({measured / seconds:5.2f}x)" if seconds else "")
        lines.append(f"  {name:<16} {seconds:8.1f} s  {shown}")
    return lines


def clock_record(predicted: dict[str, float], notes: list[str],
                 phases: dict[str, dict[str, float]]) -> dict[str, Any]:
    """timings.json's `clock`: per phase the predicted and the measured seconds."""
    return {"phases": {name: {"predicted_s": seconds, "measured_s": phases.get(name, {}).get("seconds")}
                       for name, seconds in predicted.items()}, "notes": notes}
