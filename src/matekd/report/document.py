"""The report document: `build_report` writes into `out` (the stage swaps it in as reports/):

- results.md: every table, labelled with the data and the profile, figures inline;
- results.csv: every number in long format (table, model, metric, value; accuracies as fractions);
- figures/*.png: static figures, viewable offline;
- plots/*.csv: the overlay data for `dvc plots` (see report.overlays).

Differences between methods carry 95% t-intervals over seeds (report.statistics); the
experiment's departures from the paper setting come from the params (report.paper). Missing
inputs are listed in the report; only a project with no results at all is an error (raised by
the stage)."""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .. import methods as method_table
from ..corruptions import EXTRA_4 as EXTRA_CORRUPTIONS
from ..corruptions import STANDARD_15 as STANDARD_CORRUPTIONS
from ..params import CIFAR_PER_CLASS_TEST, Params
from ..paths import method_inputs_path
from ..storage import write_text
from ..tracking import git_state
from .figures import confusion_figure, corruption_heatmap, lines_figure, methods_figure, weights_figure
from .formatting import c15_cell, markdown_table, millions, model_label, per_seed_text, percent, plain, yaml_value
from .inputs import DISTILL_OUTPUT, Inputs
from .overlays import OVERLAYS, overlay_frames, write_overlays
from .paper import CLAIMED, CLASSES, shortcuts
from .statistics import MIN_SEEDS_FOR_INTERVAL, NO_INTERVAL, Interval, as_float, format_interval, is_missing
from .tables import (
    REFERENCE_METHOD,
    ablation_runs,
    ablation_summary,
    corruption_frame,
    grouped_mean,
    method_order,
    method_values,
    model_frame,
    paired_differences,
    robustness_groups,
    severity_frame,
    weighting_frame,
)


@dataclass
class Labels:
    """What every heading names: the test data, the CIFAR-10-C variant and the profile; and the
    inconsistencies found between the models' evaluations (listed with the missing inputs)."""

    dataset: str
    corruption: str
    profile: str
    notes: list[str]

    def heading(self) -> str:
        return f"{self.dataset}; {self.corruption}; profile `{self.profile}`"


def data_labels(inputs: Inputs, params: Params) -> Labels:
    """The data labels every table heading carries, taken from metrics/eval."""
    notes: list[str] = []
    evals = list(inputs.evals.values())

    def unique(key: str) -> list[str]:
        return sorted({str(e.get(key)) for e in evals if e.get(key) is not None})

    datasets, corruptions, profiles = unique("dataset"), unique("corruption_dataset"), unique("profile")
    if len(datasets) > 1 or len(corruptions) > 1:
        notes.append("models were evaluated on different data: " + "; ".join(datasets + corruptions))
    stale = sorted(e.get("model", "?") for e in evals if e.get("cifar10c_matches_prepared") is False)
    if stale:
        notes.append(f"CIFAR-10-C was built from other prepared data than the test set of {', '.join(stale)}; "
                     "rerun `dvc repro corrupt evaluate`")
    skipped: dict[str, str] = {}
    for e in evals:
        skipped.update(e.get("cifar10c_skipped") or {})
    dataset = " + ".join(datasets) or "dataset unknown (metrics/eval missing)"
    corruption = " + ".join(corruptions) or "CIFAR-10-C not evaluated"
    if skipped:
        corruption += ", " + ", ".join(sorted(skipped)) + " skipped"
    profile = " + ".join(profiles) or params.profile
    if profiles and profiles != [params.profile]:
        notes.append(f"params.yaml now says profile `{params.profile}` but metrics/eval were produced under "
                     f"`{profile}`; rerun `dvc repro` to refresh them")
    return Labels(dataset, corruption, profile, notes)


@dataclass
class _Doc:
    """results.md lines, results.csv rows and the MLflow headline metrics, built together."""

    md: list[str] = field(default_factory=list)
    long: list[dict] = field(default_factory=list)
    headline: dict[str, float] = field(default_factory=dict)

    def number(self, table: str, model: str, metric: str, value: Any) -> None:
        self.long.append({"table": table, "model": model, "metric": metric, "value": as_float(value)})


def bf16_parts(inputs: Inputs) -> list[str] | None:
    """Which parts ran in bf16, as their metric files record it (`bf16`, evaluation's
    `precision`); None when no file records a precision (outputs older than the param)."""
    recorded = {"teachers": [m.get("bf16") for m in inputs.teachers.values()],
                "students": [m.get("bf16") for m in inputs.students.values()],
                "evaluation": [1 if e.get("precision") == "bf16" else (0 if e.get("precision") else None)
                               for e in inputs.evals.values()]}
    if all(v is None for values in recorded.values() for v in values):
        return None
    return [part for part, values in recorded.items() if any(v == 1 for v in values)]


def build_report(inputs: Inputs, params: Params, out: Path) -> dict[str, Any]:
    """Write results.md, results.csv, figures/ and plots/ into `out`; return a summary
    (models, missing inputs, headline metrics for MLflow, labels, shortcuts, figures)."""
    figures, plots = out / "figures", out / "plots"
    figures.mkdir(parents=True, exist_ok=True)
    plots.mkdir(parents=True, exist_ok=True)
    labels = data_labels(inputs, params)
    frame = model_frame(inputs, params)
    runs = ablation_runs(frame)
    cuts = shortcuts(params, [str(d) for d in frame["device"].dropna()], bf16_parts(inputs))
    doc = _Doc()
    missing = list(inputs.problems) + labels.notes + _missing_inputs(inputs, params, frame)
    doc.md.append(f"# MATE-KD results ({labels.heading()})\n")
    _setup_section(doc, inputs, params, labels, cuts)
    summary_at = len(doc.md)
    _summary_section(doc, runs, inputs, labels, figures)
    _seed_table(doc, frame, labels)
    _ablation_section(doc, runs, inputs, params, labels)
    _robustness_sections(doc, frame, runs, inputs, labels, figures)
    _gradcam_section(doc, inputs, labels)
    _training_section(doc, runs, inputs, frame, labels, figures, plots)
    if missing:
        doc.md.insert(summary_at, "## Missing or inconsistent inputs\n\n" + "".join(f"- {m}\n" for m in missing))
    doc.md.append(_provenance(inputs, params, frame))
    write_text(out / "results.md", re.sub(r"\n{3,}", "\n\n", "\n".join(doc.md)).strip() + "\n")
    pd.DataFrame(doc.long, columns=["table", "model", "metric", "value"]).to_csv(out / "results.csv", index=False)
    for _, row in frame.iterrows():
        doc.headline[f"{row['model']}/test_acc"] = as_float(row["test_acc"])
        doc.headline[f"{row['model']}/cifar10c_mean15"] = as_float(row["c_mean15"])
    return {"models": frame["model"].tolist(), "missing": missing, "headline": doc.headline,
            "labels": labels.__dict__, "shortcuts": cuts, "figures": sorted(p.name for p in figures.glob("*.png"))}


def _setup_section(doc: _Doc, inputs: Inputs, params: Params, labels: Labels, cuts: list[str]) -> None:
    d, c = params.data, params.corrupt
    train = d.train_images_per_class
    test = d.test_per_class if d.test_per_class is not None else CIFAR_PER_CLASS_TEST
    evaluated = sorted({int(e["test_images"]) for e in inputs.evals.values() if e.get("test_images") is not None})
    c_images = sorted({int(e["cifar10c_images_per_severity"]) for e in inputs.evals.values()
                       if e.get("cifar10c_images_per_severity") is not None})
    c_per_class = c.images_per_class if c.images_per_class is not None else test
    lines = [
        f"## Setup ({labels.heading()})\n",
        f"- Data: {labels.dataset}; training {CLASSES * train:,} images ({train:,} per class), validation "
        f"{CLASSES * d.val_per_class:,} ({d.val_per_class:,} per class), test {CLASSES * test:,} ({test:,} per class)"
        + (f"; evaluated on {', '.join(f'{n:,}' for n in evaluated)} test images" if evaluated else "") + ".",
        f"- CIFAR-10-C: {labels.corruption}; {CLASSES * c_per_class:,} images per corruption and severity "
        f"({c_per_class:,} per class)"
        + (f", {', '.join(f'{n:,}' for n in c_images)} evaluated" if c_images else "")
        + f"; corruptions: {'all 19' if c.corruptions is None else ', '.join(c.corruptions)}.",
        (f"- Profile: `{params.profile}`. Methods (table order): "
         f"{', '.join(method_order(params.ablation.methods))}; seeds {', '.join(map(str, params.ablation.seeds))}; "
         f"the method under test is `{REFERENCE_METHOD}`; the configured run `distill` uses "
         f"`{params.distill.method}`."),
        ("- Shortcuts compared with the paper setting (docs/method.md, Defaults: 200 epochs, batch 128, SGD lr 0.1 "
         "with Nesterov momentum 0.9, weight decay 5e-4, cosine schedule; 45,000/5,000/10,000 images; the full "
         "CIFAR-10-C):") + ("" if cuts else " none."),
    ]
    lines += [f"  - {cut}" for cut in cuts]
    doc.md.append("\n".join(lines) + "\n")
    changing = [cut for cut in cuts if "(exact" not in cut]
    if changing:
        doc.md.append(f"> Profile `{params.profile}` departs from the paper setting in {len(changing)} way(s) that "
                      "change the result (listed above): compare methods with each other here, not these numbers "
                      "with the paper's.\n")


def _summary_section(doc: _Doc, runs: pd.DataFrame, inputs: Inputs, labels: Labels, figures: Path) -> None:
    doc.md.append(f"## Summary: does {REFERENCE_METHOD} beat the baselines? ({labels.heading()})\n")
    if runs.empty:
        doc.md.append("_No ablation runs (metrics/student/<method>-seed<k>.json): run `dvc repro` (stages "
                      "ablation@<method>-<seed>) or `matekd ablation`._\n")
        return
    methods_figure(runs, f"Accuracy per method: one dot per seed, mean (bar) and 95% t-interval ({labels.heading()})",
                   figures / "methods-accuracy.png")
    doc.md.append("Each method's CIFAR-10 test accuracy and CIFAR-10-C 15-corruption mean: one dot per seed, the "
                  f"mean as a bar, the 95% t-interval over seeds as an error bar (from {MIN_SEEDS_FOR_INTERVAL} "
                  "seeds on).\n\n![methods-accuracy](figures/methods-accuracy.png)\n")
    doc.md.append(f"### Paired difference {REFERENCE_METHOD} − baseline over common seeds ({labels.heading()})\n")
    if REFERENCE_METHOD not in set(runs["method"]):
        doc.md.append(f"_No {REFERENCE_METHOD} ablation run: nothing to pair._\n")
    else:
        acc, rob = paired_differences(runs, "test_acc"), paired_differences(runs, "c_mean15")
        merged = acc.merge(rob, on="baseline", how="left", suffixes=("_acc", "_c"))
        rows = []
        for r in merged.itertuples():
            rows.append([r.baseline, r.n_acc, r.seeds_acc or "–", percent(r.mean_acc, signed=True),
                         format_interval(r.interval_acc, signed=True), per_seed_text(r.per_seed_acc),
                         percent(r.mean_c, signed=True),
                         format_interval(r.interval_c, signed=True) if isinstance(r.interval_c, Interval) else "–",
                         per_seed_text(r.per_seed_c) if isinstance(r.per_seed_c, dict) else "–"])
        doc.md.append(markdown_table(
            ["baseline", "pairs", "common seeds", "Δ CIFAR-10 (pp)", "95% CI (pp)", "Δ per seed (pp)",
             "Δ CIFAR-10-C-15 (pp)", "95% CI (pp)", "Δ per seed (pp)"], rows))
        doc.md.append(f"\nPositive: {REFERENCE_METHOD} is better. pp = percentage points. The 95% interval is "
                      "mean ± t(0.975, n−1) · sd / √n over the per-seed differences (Student t, n−1 degrees of "
                      f"freedom); an interval that excludes 0 is a difference these seeds resolve. With fewer than "
                      f"{MIN_SEEDS_FOR_INTERVAL} common seeds: {NO_INTERVAL}.\n")
        for name, table in (("test_acc", acc), ("cifar10c_mean15", rob)):
            for r in table.itertuples():
                model = f"{REFERENCE_METHOD}-{r.baseline}"
                for stat in ("mean", "sd", "half", "low", "high", "n"):
                    doc.number("ablation_paired", model, f"{name}_diff_{stat}", getattr(r, stat))
                for seed, value in r.per_seed.items():
                    doc.number("ablation_paired", model, f"{name}_diff/seed{seed}", value)
                doc.headline[f"paired/{model}/{name}_diff_mean"] = as_float(r.mean)
                if r.interval.has_interval:
                    doc.headline[f"paired/{model}/{name}_diff_half"] = r.half
    _weighting_table(doc, runs, inputs, labels)


def _weighting_table(doc: _Doc, runs: pd.DataFrame, inputs: Inputs, labels: Labels) -> None:
    doc.md.append(f"### Teacher weighting: how far the learned weights are from equal ({labels.heading()})\n")
    table = weighting_frame(runs, inputs)
    fixed = [f"`{m}` ({method_table.METHODS[m].weighting})" for m in method_order(runs["method"])
             if m in method_table.METHODS and not method_table.METHODS[m].per_sample_weights]
    if table.empty:
        doc.md.append("_No ablation run of a method with per-sample teacher weights._\n")
    else:
        rows = []
        for r in table.itertuples():
            spread = ("–" if math.isnan(r.entropy_relative_min)
                      else f"{r.entropy_relative_min:.3f}–{r.entropy_relative_max:.3f}")
            weights = ", ".join(f"{t} {w:.3f}" for t, w in r.weight_mean.items()) or "–"
            rows.append([r.method, r.weighting, r.runs, plain(r.entropy_relative, 3), spread,
                         plain(r.entropy_relative_epochs, 3), weights])
            doc.number("weighting", r.method, "entropy_relative", r.entropy_relative)
            doc.number("weighting", r.method, "entropy_relative_epochs", r.entropy_relative_epochs)
            doc.headline[f"weighting/{r.method}/entropy_relative"] = as_float(r.entropy_relative)
            for teacher, weight in r.weight_mean.items():
                doc.number("weighting", r.method, f"weight_mean/{teacher}", weight)
        doc.md.append(markdown_table(
            ["method", "weighting", "runs", "entropy relative to uniform, last epoch (mean over seeds)",
             "range over seeds", "mean over all epochs", "mean weight per teacher, last epoch"], rows))
        doc.md.append("\nEntropy of each training sample's teacher weights divided by log K (K teachers), "
                      "averaged over the samples: 1 = equal weights for every sample (the weighting does nothing), "
                      "0 = one teacher takes each sample. Values near 1 mean the method is close to equal-weight "
                      "multi-teacher KD.\n")
    if fixed:
        doc.md.append("Fixed weights by construction (no entropy to measure): " + ", ".join(fixed) + ".\n")


def _seed_table(doc: _Doc, frame: pd.DataFrame, labels: Labels) -> None:
    doc.md.append(f"## 1. Seed's table: {labels.heading()}\n")
    rows = []
    for _, row in frame.iterrows():
        rows.append([model_label(row), percent(row["test_acc"]), millions(row["params"]), plain(row["size_mb"]),
                     c15_cell(row), percent(row["c_mean19"])])
        for metric, name in (("test_acc", "test_acc"), ("params", "params"), ("size_mb", "size_mb"),
                             ("c_mean15", "cifar10c_mean15"), ("c_mean19", "cifar10c_mean19")):
            doc.number("seed", row["model"], name, row[metric])
    doc.md.append(markdown_table(["model", "CIFAR-10 acc. (%)", "parameters", "size (MB)",
                                  "CIFAR-10-C mean, 15 standard (%)", "CIFAR-10-C mean, all 19 (%)"], rows))
    incomplete = frame[frame["c_mean15_complete"].eq(False)]
    if len(incomplete):
        gaps = sorted({str(m) for m in incomplete["c_missing"].dropna()})
        doc.md.append(f"\n\\* mean over the available standard corruptions only (missing: {'; '.join(gaps)}); "
                      "not comparable with published 15-corruption means.\n")
    sources = sorted({s for s in frame["acc_source"].dropna()} - {"evaluate"})
    if sources:
        doc.md.append(f"\nSome accuracies come from {', '.join(sources)} (no metrics/eval file for those models): "
                      "the test accuracy measured at the end of training or copied by evaluate, without the "
                      "per-corruption detail.\n")
    doc.md.append("\nThe 19-corruption mean includes the 4 extra corruptions and is not comparable with "
                  "published 15-means. Sizes are fp32 parameters + BatchNorm statistics, in MB (10^6 bytes).\n")
    doc.md.append("\nFor reference, the paper claims (canonical CIFAR-10, official CIFAR-10-C, 200 epochs):\n\n")
    doc.md.append(markdown_table(["model", "CIFAR-10 (%)", "parameters", "size", "CIFAR-10-C average (%)"], CLAIMED))


def _ablation_section(doc: _Doc, runs: pd.DataFrame, inputs: Inputs, params: Params, labels: Labels) -> None:
    doc.md.append(f"\n## 2. Ablation: mean and 95% t-interval over seeds ({labels.heading()})\n")
    if runs.empty:
        doc.md.append("_No ablation runs (metrics/student/<method>-seed<k>.json) found: run `dvc repro`._\n")
    else:
        summary = ablation_summary(runs)
        doc.md.append(markdown_table(
            ["method", "n seeds", "seeds", "CIFAR-10 mean (%)", "95% CI (pp)", "CIFAR-10-C-15 mean (%)",
             "95% CI (pp)"],
            [[r.method, r.n, r.seeds, percent(r.test_acc_mean), format_interval(r.test_acc_interval),
              percent(r.c_mean15_mean), format_interval(r.c_mean15_interval)] for r in summary.itertuples()]))
        doc.md.append(f"\n95% CI: mean ± t(0.975, n−1) · sd / √n over the seeds, as (low to high); "
                      f"{NO_INTERVAL} below {MIN_SEEDS_FOR_INTERVAL} seeds.\n")
        for r in summary.itertuples():
            for metric, name in (("test_acc", "test_acc"), ("c_mean15", "cifar10c_mean15")):
                for stat in ("mean", "sd", "half", "low", "high", "n"):
                    doc.number("ablation", r.method, f"{name}_{stat}", getattr(r, f"{metric}_{stat}"))
                doc.headline[f"ablation/{r.method}/{name}_mean"] = as_float(getattr(r, f"{metric}_mean"))
    methods = method_order({*params.ablation.methods, *runs["method"]})
    doc.md.append(f"\n### Values each method trained with ({labels.heading()})\n")
    values = method_values(methods, inputs, params)
    rows = []
    for v in values:
        own = "; ".join(f"{k} {yaml_value(x)}" for k, x in v["values"].items()) or "– (no hyperparameters)"
        recipe = v["recipe"]
        rows.append([v["method"], v["source"], own, yaml_value(recipe.get("lr", "–")),
                     yaml_value(recipe.get("weight_decay", "–")), recipe.get("epochs", "–"),
                     recipe.get("batch_size", "–")])
        for key, x in {**v["values"], **{f"recipe.{k}": y for k, y in recipe.items()}}.items():
            if isinstance(x, (int, float)) and not isinstance(x, bool):
                doc.number("values", v["method"], key, x)
        doc.number("values", v["method"], "tuned", 1.0 if v["tuned"] else 0.0)
    doc.md.append(markdown_table(["method", "values from", "its hyperparameters", "lr", "weight decay", "epochs",
                                  "batch"], rows))
    doc.md.append("\nShared: the distill.* values of params.yaml, the same for every method. Tuned: the method's own "
                  "Optuna study (`matekd tune --method <m>`), used when ablation.tuned is true. The configured run "
                  "`distill` always trains with the shared values.\n")


def _robustness_sections(doc: _Doc, frame: pd.DataFrame, runs: pd.DataFrame, inputs: Inputs, labels: Labels,
                         figures: Path) -> None:
    evaluated = [m for m in frame["model"] if m in inputs.evals]
    doc.md.append(f"\n## 3. Robustness per corruption: accuracy (%) averaged over severities 1-5 "
                  f"({labels.heading()})\n")
    if not evaluated:
        doc.md.append("_No metrics/eval files: run `dvc repro evaluate`._\n")
        return
    groups = robustness_groups(frame, runs, inputs.evals)
    sizes = {name: len(models) for name, models in groups.items()}
    header = [f"{name} (mean of {n})" if n > 1 else name for name, n in sizes.items()]
    per_model_c = corruption_frame(inputs.evals, evaluated)
    per_c = grouped_mean(per_model_c, groups)
    doc.md.append(_percent_table("corruption", per_c, header))
    doc.md.append("\nMethods: mean over their ablation seeds (each model's numbers are in results.csv, table "
                  "`robustness`). – : corruption not evaluated. Extra corruptions (speckle_noise, gaussian_blur, "
                  "spatter, saturate) are outside the 15-corruption benchmark mean.\n")
    for model in evaluated:
        for corruption, accs in ((inputs.evals[model].get("cifar10c") or {}).get("accuracy") or {}).items():
            for s, a in enumerate(accs, start=1):
                doc.number("robustness", model, f"{corruption}/severity{s}", a)
    corruptions = [c for c in [*STANDARD_CORRUPTIONS, *EXTRA_CORRUPTIONS] if per_c.loc[c].notna().any()]
    if corruptions:
        corruption_heatmap(per_c.loc[corruptions].T, f"Accuracy (%) per corruption, mean over severities 1-5; methods: "
                                                     f"mean over ablation seeds ({labels.heading()})",
                           figures / "corruption-accuracy.png")
    doc.md.append(f"\n## 4. Robustness per severity: mean over the standard corruptions (%) ({labels.heading()})\n")
    per_model_s = severity_frame(inputs.evals, evaluated)
    per_s = grouped_mean(per_model_s, groups)
    doc.md.append(_percent_table("severity", per_s, header))
    per_s_all = grouped_mean(severity_frame(inputs.evals, evaluated, "all"), groups)
    doc.md.append("\nMean over all evaluated corruptions (incl. the extras) per severity (%) "
                  f"({labels.heading()}):\n\n")
    doc.md.append(_percent_table("severity", per_s_all, header))
    for model in evaluated:
        for i in per_model_s.index:
            doc.number("severity", model, "clean" if i == "clean" else f"severity{i}", per_model_s.loc[i, model])
    # Severity is ordered, so lines are right here.
    lines_figure(per_s, "severity", "accuracy (%)",
                 f"Accuracy per severity, mean over the standard corruptions; methods: mean over ablation seeds "
                 f"({labels.heading()})", figures / "severity-accuracy.png")


def _percent_table(first: str, frame: pd.DataFrame, header: list[str]) -> str:
    """Accuracies as a markdown table in percent: a `first` column of the index, then `header`."""
    return markdown_table([first, *header], [[i, *(percent(v) for v in frame.loc[i])] for i in frame.index])


def _gradcam_section(doc: _Doc, inputs: Inputs, labels: Labels) -> None:
    doc.md.append(f"\n## 5. Grad-CAM agreement of students with teachers ({labels.heading()})\n")
    if not inputs.gradcam:
        doc.md.append("_No metrics/eval/gradcam-*.json: run `dvc repro evaluate`._\n")
        return
    rows = []
    for student, g in sorted(inputs.gradcam.items()):
        teachers = g.get("teachers", [])
        entropy = as_float(g.get("weight_entropy"))
        relative = entropy / math.log(len(teachers)) if len(teachers) > 1 else math.nan
        for teacher in teachers:
            rows.append([student, teacher, plain(g["similarity_mean"].get(teacher), 3),
                         plain(g["similarity_std"].get(teacher), 3), plain(g["weight_mean"].get(teacher), 3),
                         percent(g["dominant_fraction"].get(teacher), 1), plain(relative, 3)])
            for key in ("similarity_mean", "similarity_std", "weight_mean", "dominant_fraction"):
                doc.number("gradcam", student, f"{key}/{teacher}", g[key].get(teacher))
        doc.number("gradcam", student, "weight_entropy_relative", relative)
    any_g = next(iter(inputs.gradcam.values()))
    doc.md.append(f"\n{any_g.get('images')} test images (classes interleaved), Grad-CAM of the true class; "
                  f"similarity `{any_g.get('similarity')}`, weights softmax(sim / {any_g.get('tau')}); weight entropy "
                  "relative to uniform as in the summary (1 = equal weights).\n\n")
    doc.md.append(markdown_table(["student", "teacher", "similarity mean", "similarity std", "weight mean",
                                  "dominant (% of images)", "weight entropy / log K"], rows))


def _training_section(doc: _Doc, runs: pd.DataFrame, inputs: Inputs, frame: pd.DataFrame, labels: Labels,
                      figures: Path, plots: Path) -> None:
    doc.md.append(f"\n## 6. Training curves and figures ({labels.heading()})\n")
    lines: list[str] = []
    overlays, weight_sources = overlay_frames(runs, inputs)
    write_overlays(overlays, plots)
    weights = overlays["teacher_weights"]
    for name, ylabel, caption, scale in (
            ("val_acc", "validation accuracy (%)", "Validation accuracy per epoch", 100.0),
            ("train_loss", "training loss", ("Training loss per epoch (each method's own total loss: its terms "
                                             "differ, so compare shapes, not levels)"), 1.0)):
        data = overlays[name]
        if data.empty:
            continue
        wide = data.pivot(index="epoch", columns="series", values=name)[method_order(data["series"])]
        lines_figure(wide, "epoch", ylabel, f"{caption.split(' (')[0]}; mean over ablation seeds ({labels.heading()})",
                     figures / f"{name.replace('_', '-')}.png", scale=scale)
        lines.append(f"{caption}, mean over each method's ablation seeds ({labels.dataset}; profile "
                     f"`{labels.profile}`):\n\n![{name}](figures/{name.replace('_', '-')}.png)\n")
    if not weights.empty:
        weights_figure(weights, f"Mean teacher weight per epoch; mean over ablation seeds ({labels.heading()})",
                       figures / "teacher-weights.png")
        lines.append("Teacher-weight evolution per teacher, one line per weighting method "
                     f"({', '.join(sorted(weight_sources))}; training images of {labels.dataset}):\n\n"
                     "![teacher-weights](figures/teacher-weights.png)\n")
    for name, caption in (("corruption-accuracy", "Accuracy per corruption (methods: mean over ablation seeds)"),
                          ("severity-accuracy", "Accuracy per severity")):
        if (figures / f"{name}.png").exists():
            lines.append(f"{caption} ({labels.corruption}, profile `{labels.profile}`):\n\n"
                         f"![{name}](figures/{name}.png)\n")
    pick = _confusion_model(inputs, frame)
    if pick is not None:
        e = inputs.evals[pick]
        names = e.get("class_names") or [str(i) for i in range(len(e["confusion_matrix"]))]
        confusion_figure(e["confusion_matrix"], names, f"{pick}: confusion matrix, {e.get('dataset')} test set",
                         figures / f"confusion-{pick}.png")
        lines.append(f"Confusion matrix of {pick} (rows true, columns predicted; {labels.dataset}, "
                     f"profile `{labels.profile}`):\n\n![confusion](figures/confusion-{pick}.png)\n")
    for student, path in sorted(inputs.gradcam_png.items()):
        shutil.copyfile(path, figures / f"gradcam-{student}.png")
        lines.append(f"Grad-CAM of {student} vs the teachers (first rows of the analysed test images; "
                     f"{labels.dataset}):\n\n![gradcam-{student}](figures/gradcam-{student}.png)\n")
    doc.md += lines or ["_No figures: no evaluation or training plots found._\n"]
    doc.md.append("\nOverlay data for `dvc plots` (one series per method, mean over its ablation seeds): "
                  + ", ".join(f"`plots/{name}.csv` ({', '.join((OVERLAYS[name][0], 'series', OVERLAYS[name][1]))})"
                              for name in OVERLAYS) + ".\n")


def _confusion_model(inputs: Inputs, frame: pd.DataFrame) -> str | None:
    students = [m for m in frame[frame["kind"] == "student"]["model"] if m in inputs.evals]
    pick = f"student-{DISTILL_OUTPUT}" if f"student-{DISTILL_OUTPUT}" in students else None
    if pick is None and students:
        pick = max(students, key=lambda m: as_float(inputs.evals[m].get("test_acc")))
    if pick is None and inputs.evals:
        pick = max(inputs.evals, key=lambda m: as_float(inputs.evals[m].get("test_acc")))
    return pick if pick is not None and inputs.evals[pick].get("confusion_matrix") else None


def _missing_inputs(inputs: Inputs, params: Params, frame: pd.DataFrame) -> list[str]:
    out = []
    for name in params.teachers:
        if name not in inputs.teachers:
            out.append(f"metrics/teachers/{name}.json is missing: run `dvc repro train_teacher@{name}`")
        if name not in inputs.evals:
            out.append(f"metrics/eval/{name}.json is missing: run `dvc repro evaluate`")
    if not inputs.students:
        out.append("no metrics/student/*.json: run `dvc repro` (stages distill and ablation@<method>-<seed>)")
    for output in sorted(inputs.students):
        if f"student-{output}" not in inputs.evals:
            out.append(f"metrics/eval/student-{output}.json is missing: run `dvc repro evaluate`")
    expected = {f"{m}-seed{s}" for m in params.ablation.methods for s in params.ablation.seeds}
    absent = sorted(expected - set(inputs.students))
    if absent:
        out.append(f"ablation runs missing ({len(absent)} of {len(expected)}): {', '.join(absent)}; "
                   "run `dvc repro` (or `matekd ablation`)")
    for method in method_order(params.ablation.methods):
        if method not in inputs.method_inputs:
            out.append(f"{method_inputs_path(method)} is missing: its values are shown from params.yaml; "
                       f"run `dvc repro method_inputs@{method}`")
        elif bool(inputs.method_inputs[method].get("tuned")) != params.ablation.tuned:
            out.append(f"{method_inputs_path(method)} says tuned = {bool(inputs.method_inputs[method].get('tuned'))} "
                       f"but params.yaml has ablation.tuned: {str(params.ablation.tuned).lower()}; run `dvc repro`")
    distill = frame[frame["output"] == DISTILL_OUTPUT]
    if len(distill) and distill["method_source"].iloc[0] == "params.distill.method":
        out.append("the method of student-distill comes from params.distill.method (models/student/"
                   "distill.safetensors and metrics/eval hold none)")
    return out


def _provenance(inputs: Inputs, params: Params, frame: pd.DataFrame) -> str:
    def unique(values: Iterable[Any]) -> list[str]:
        return sorted({str(v) for v in values if v not in (None, "") and not is_missing(v)})

    everything = [*inputs.teachers.values(), *inputs.students.values(), *inputs.evals.values()]
    data_hashes = unique(e.get("dataset_sha256") for e in everything)
    data_hashes += unique(m.get("dataset_sha256") for m in inputs.student_meta.values() if
                          m.get("dataset_sha256") not in data_hashes)
    c_hashes = unique(e.get("cifar10c_manifest_sha256") for e in inputs.evals.values())
    eval_digests = unique(e.get("params_sha256") for e in inputs.evals.values())
    devices = unique(frame["device"])
    git = git_state()
    lines = ["\n## How these numbers were obtained\n",
             "Commands (from the project root):\n",
             "```",
             "dvc repro                      # the whole pipeline: prepare, train_teacher@<t>, cache@<t>,",
             "                               #   method_inputs@<m>, distill, ablation@<m>-<seed>, corrupt,",
             "                               #   evaluate, report",
             "matekd ablation --devices cuda:0,cuda:1   # every ablation student at once, over the GPUs",
             "matekd tune --method mate_kd   # one Optuna study per method -> tuning/best/<method>.yaml",
             "dvc exp run -S ablation.tuned=true          # the ablation with each method's tuned values",
             "dvc exp run -S 'ablation.seeds=[0,1,2,3,4]' # more seeds: narrower intervals",
             "cp profiles/paper.yaml params.yaml && dvc repro   # the paper-scale setting",
             "matekd report                  # this report only",
             "```\n",
             f"- profile: `{params.profile}`; params digest (validated params): `{params.digest()}`",
             f"- params digest recorded by evaluate: {', '.join(f'`{d}`' for d in eval_digests) or 'unknown'}"
             + (" (differs from the current params: rerun `dvc repro`)"
                if eval_digests and eval_digests != [params.digest()] else ""),
             f"- prepared data (manifest sha256): {', '.join(f'`{h}`' for h in data_hashes) or 'unknown'}",
             f"- CIFAR-10-C manifest sha256: {', '.join(f'`{h}`' for h in c_hashes) or 'unknown'}",
             f"- device(s) of evaluate: {', '.join(devices) or 'unknown'}",
             f"- git commit: `{git['git_commit']}`"
             + (f" (uncommitted changes: {git['git_dirty']})" if git["git_commit"] != "unknown" else ""),
             ("- accuracies: top-1 on the prepared test split; CIFAR-10-C accuracies per corruption x severity "
              "on the corrupt stage's images; all runs tracked in MLflow (experiment "
              f"`{params.tracking.experiment}`, this report in the run named `report`)."),
             ("- results.csv holds every number above in long format (table, model, metric, value; accuracies "
              "as fractions); plots/*.csv hold the overlay data for `dvc plots show`.\n")]
    return "\n".join(lines)
