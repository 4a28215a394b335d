"""The report: t-intervals, shortcuts, tables and overlay plot data from small synthetic metric files."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from matekd import methods as method_table
from matekd.corruptions import EXTRA_4 as EXTRA_CORRUPTIONS
from matekd.corruptions import STANDARD_15 as STANDARD_CORRUPTIONS
from matekd.errors import MatekdError
from matekd.params import validate_params
from matekd.report import (
    NO_INTERVAL,
    ablation_summary,
    format_interval,
    histogram_mean_weights,
    paired_differences,
    per_model_summary,
    run_weighting,
    shortcuts,
    t_interval,
    weight_evolution,
)
from matekd.stages import context as stage_context
from matekd.stages.report import run_report

DATASET = "CIFAR-10 (JPEG q75 mirror)"
CORRUPTION = "CIFAR-10-C (regenerated, seed 0)"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
TEACHERS = [("resnet110", 0.90, 0.70), ("vgg19_bn", 0.91, 0.71)]
DUMMY = "dummy_conf"
# (output, method, seed, test accuracy, CIFAR-10-C level); ce vs mate_kd differ by 0.01, 0.03, 0.02
STUDENTS = [("distill", "mate_kd", 0, 0.82, 0.60),
            ("ce-seed0", "ce", 0, 0.79, 0.50), ("ce-seed1", "ce", 1, 0.81, 0.52), ("ce-seed2", "ce", 2, 0.81, 0.51),
            ("kd-seed0", "kd", 0, 0.81, 0.55), ("kd-seed1", "kd", 1, 0.80, 0.56),
            ("mate_kd_noattr-seed0", "mate_kd_noattr", 0, 0.80, 0.57),
            ("mate_kd-seed0", "mate_kd", 0, 0.80, 0.58), ("mate_kd-seed1", "mate_kd", 1, 0.84, 0.61),
            ("mate_kd-seed2", "mate_kd", 2, 0.83, 0.60),
            ("ca_mkd-seed0", "ca_mkd", 0, 0.79, 0.54), (f"{DUMMY}-seed0", DUMMY, 0, 0.78, 0.53)]
# final-epoch entropy relative to uniform per weighting run
ENTROPY = {"mate_kd_noattr-seed0": 0.95, "mate_kd-seed0": 0.90, "mate_kd-seed1": 0.80, "mate_kd-seed2": 0.85,
           "ca_mkd-seed0": 0.99, f"{DUMMY}-seed0": 0.5}


@contextlib.contextmanager
def dummy_method():
    """A method registered only while the report is built: it must appear from the table alone."""
    ca_mkd = method_table.get("ca_mkd")
    method_table.register(method_table.Method(
        name=DUMMY, teachers="all", weighting="confidence", weigh=ca_mkd.weigh, loss=ca_mkd.loss, terms=ca_mkd.terms,
        hyperparameters=ca_mkd.hyperparameters, summary="test-only method"))
    try:
        yield DUMMY
    finally:
        method_table.unregister(DUMMY)


def quick_params(methods=("ce", "kd", "mate_kd_noattr", "mate_kd", "ca_mkd"), **extra):
    recipe = {"epochs": 2, "batch_size": 64, "lr": 0.05}
    raw = {"profile": "quick", "device": "cpu", "teachers": {"resnet110": recipe, "vgg19_bn": recipe},
           "data": {"train_per_class": 100, "val_per_class": 20, "test_per_class": 50},
           "cache": {"logit_variants": "used"},
           "distill": {"student": "resnet20", "kd_teacher": "resnet110", "teacher_signals": "cached", "recipe": recipe},
           "ablation": {"methods": list(methods), "seeds": [0, 1, 2], "group_size": 4},
           "corrupt": {"images_per_class": 4}, "tracking": {"enabled": False}}
    raw.update(extra)
    return validate_params(raw)


def paper_params(**distill):
    recipe = {"epochs": 200, "batch_size": 128, "lr": 0.1, "momentum": 0.9, "nesterov": True,
              "weight_decay": 5e-4, "schedule": "cosine"}
    return validate_params({
        "profile": "paper", "teachers": {t: recipe for t in ("resnet110", "densenet121", "vgg19_bn")},
        "data": {"train_per_class": None, "val_per_class": 500, "test_per_class": None},
        "distill": {"student": "resnet20", "kd_teacher": "resnet110", "recipe": recipe, **distill},
        "ablation": {"seeds": [0, 1, 2]}})


def eval_entry(model: str, kind: str, acc: float, level: float, **extra) -> dict:
    """A metrics/eval JSON: every corruption but frost at `level` - 0.05*(s-1), extras 0.3."""
    table = {n: [level - 0.05 * s for s in range(5)] for n in STANDARD_CORRUPTIONS if n != "frost"}
    table.update({n: [0.3] * 5 for n in EXTRA_CORRUPTIONS})
    standard = level - 0.1
    cm = np.zeros((10, 10), int)
    np.fill_diagonal(cm, 8)
    cm[0, 1] = 2
    return {"model": model, "kind": kind, "test_acc": acc, "params": 270000, "size_mb": 1.1,
            "dataset": DATASET, "corruption_dataset": CORRUPTION, "profile": "quick", "test_images": 500,
            "cifar10c_images_per_severity": 40, "cifar10c_skipped": {"frost": "no textures"}, "class_names": CLASSES,
            "confusion_matrix": cm.tolist(), "dataset_sha256": "d" * 64, "cifar10c_manifest_sha256": "c" * 64,
            "device": "cpu (1 threads)", "params_sha256": "p" * 64,
            "cifar10c": {"accuracy": table, "standard_mean": standard, "standard_mean_complete": False,
                         "standard_missing": ["frost"], "all_mean": (14 * standard + 4 * 0.3) / 18,
                         "extra_mean": 0.3,
                         "per_severity_standard": [level - 0.05 * s for s in range(5)],
                         "per_severity_all": [(14 * (level - 0.05 * s) + 4 * 0.3) / 18 for s in range(5)],
                         "per_corruption": {n: float(np.mean(v)) for n, v in table.items()}},
            **extra}


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_safetensors_header(path: Path, metadata: dict[str, str]) -> None:
    """A valid safetensors file without tensors: just the header with its metadata."""
    header = json.dumps({"__metadata__": metadata}).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def history(output: str, seed: int, weighting: bool) -> pd.DataFrame:
    frame = pd.DataFrame({"epoch": [1, 2], "lr": [0.05, 0.01], "train_acc": [0.3, 0.5],
                          "train_loss": [2.0 - 0.1 * seed, 1.5 - 0.1 * seed],
                          "val_acc": [0.3 + 0.01 * seed, 0.4 + 0.01 * seed]})
    if weighting:
        final = ENTROPY[output]
        frame["train_entropy_relative"] = [1.0, final]
        frame["train_weight_mean/resnet110"] = [0.5, 0.6]
        frame["train_weight_mean/vgg19_bn"] = [0.5, 0.4]
    return frame


def write_fixture(tmp_path: Path) -> Path:
    """Metric files of 2 teachers and 12 students (see STUDENTS) in the shapes the stages write."""
    for name, acc, level in TEACHERS:     # numbers only: the model is the file stem
        write(tmp_path / f"metrics/teachers/{name}.json",
              {"val_acc": acc, "test_acc": acc, "params": 1_700_000, "size_mb": 6.8, "epochs": 2, "seconds": 3.0})
        write(tmp_path / f"metrics/eval/{name}.json", eval_entry(name, "teacher", acc, level))
    plots = tmp_path / "plots/student"
    for output, method, seed, acc, level in STUDENTS:
        weighting = method_table.get(method).per_sample_weights and output != "distill"
        metrics = {"val_acc": acc, "test_acc": acc, "train_acc": 0.5, "params": 270000, "size_mb": 1.1,
                   "epochs": 2, "seconds": 1.0, "images_per_second": 100.0, "seed": seed}
        if weighting and method == "ca_mkd":      # the flat shape of the weighting numbers
            metrics.update({"weighting.entropy_relative": ENTROPY[output], "weighting.weight_mean.resnet110": 0.6,
                            "weighting.weight_mean.vgg19_bn": 0.4})
        elif weighting:
            metrics["weighting"] = {"entropy_relative": ENTROPY[output],
                                    "weight_mean": {"resnet110": 0.6, "vgg19_bn": 0.4}}
        write(tmp_path / f"metrics/student/{output}.json", metrics)
        extra = {"output": output, "seed": seed} | ({} if output == "distill" else {"method": method})
        write(tmp_path / f"metrics/eval/student-{output}.json",
              eval_entry(f"student-{output}", "student", acc, level, **extra))
        plots.mkdir(parents=True, exist_ok=True)
        history(output, seed, weighting).to_csv(plots / f"{output}.csv", index=False)
    # the distill student's method is only in its weights' metadata
    write_safetensors_header(tmp_path / "models/student/distill.safetensors", {"method": "mate_kd", "seed": "0"})
    write(plots / "mate_kd-seed0-weights.json",
          [{"epoch": 1, "bins": 4, "counts": {"resnet110": [2, 0, 0, 2], "vgg19_bn": [0, 0, 4, 0]}}])
    write(tmp_path / "methods/mate_kd.json",
          {"method": "mate_kd", "values": {"distill.kd_temperature": 4.2, "distill.ce_weight": 0.25},
           "recipe": {"distill.recipe.lr": 0.07, "distill.recipe.weight_decay": 5e-4, "distill.recipe.epochs": 2,
                      "distill.recipe.batch_size": 64},
           "tuned": {"from": "tuning/best/mate_kd.yaml", "trials": 12}, "teachers": {}})
    write(tmp_path / "methods/ce.json",
          {"method": "ce", "values": {}, "recipe": {"distill.recipe.lr": 0.05, "distill.recipe.epochs": 2},
           "tuned": None, "teachers": {}})
    gradcam = {"student": "student-distill", "teachers": ["resnet110", "vgg19_bn"], "images": 8,
               "similarity": "cosine", "tau": 0.2, "weight_entropy": 0.5 * math.log(2),
               "similarity_mean": {"resnet110": 0.8, "vgg19_bn": 0.7},
               "similarity_std": {"resnet110": 0.1, "vgg19_bn": 0.1},
               "weight_mean": {"resnet110": 0.6, "vgg19_bn": 0.4},
               "dominant_fraction": {"resnet110": 0.75, "vgg19_bn": 0.25}}
    write(tmp_path / "metrics/eval/gradcam-student-distill.json", gradcam)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "metrics/eval/gradcam-student-distill.png")
    return tmp_path


def fixture_params():
    return quick_params(methods=("ce", "kd", "mate_kd_noattr", "mate_kd", "ca_mkd", DUMMY))


@dataclass
class Built:
    root: Path
    params_digest: str
    shortcuts: list[str]
    summary: dict
    logged: dict
    md: str


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The report of the fixture files, rendered once for the tests that only read it, with the
    stage's tracked run replaced by a recorder of what it logs."""
    logged: dict = {"artifacts": [], "metrics": {}, "text": []}

    class Recorder:
        def log_dict(self, obj, name): pass
        def log_text(self, text, name): logged["text"].append(name)
        def log_artifact(self, path, folder=None): logged["artifacts"].append(f"{folder}/{Path(path).name}")
        def log_metrics(self, metrics): logged["metrics"].update(metrics)

    @contextlib.contextmanager
    def fake_start_run(**kwargs):
        assert kwargs["run_name"] == "report"
        yield Recorder()

    with pytest.MonkeyPatch.context() as mp, dummy_method():
        root = write_fixture(tmp_path_factory.mktemp("project"))
        stale = root / "reports" / "figures" / "stale.png"
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"old")
        mp.chdir(root)
        mp.setattr(stage_context, "start_run", fake_start_run)   # what stages.context.tracked_run opens
        params = fixture_params()
        summary = run_report(params)
        return Built(root, params.digest(), shortcuts(params), summary, logged,
                     (root / "reports" / "results.md").read_text())


@pytest.fixture
def fixture_root(tmp_path, monkeypatch):
    """Fixture files of one test, with the dummy method registered and tracking off."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATEKD_TRACKING", "off")
    with dummy_method():
        yield write_fixture(tmp_path)


def section(md: str, heading: str) -> str:
    return md.split(heading, 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


# --------------------------------------------------------------------------------------
# Intervals


def test_t_interval_matches_hand_computation() -> None:
    iv = t_interval([0.01, 0.03, 0.02])
    assert iv.n == 3 and iv.mean == pytest.approx(0.02) and iv.sd == pytest.approx(0.01)
    # t_{0.975, 2} = 4.302653; 4.302653 * 0.01 / sqrt(3) = 0.024841
    assert iv.half_width == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-6)
    assert iv.half_width == pytest.approx(0.02484, abs=5e-6)
    assert (iv.low, iv.high) == pytest.approx((0.02 - 0.024841, 0.02 + 0.024841), abs=1e-6)
    assert format_interval(iv, signed=True) == "± 2.48 (-0.48 to +4.48)"


def test_fewer_than_three_seeds_give_no_interval() -> None:
    for values in ([0.01, 0.05], [0.02], []):
        iv = t_interval(values)
        assert not iv.has_interval and math.isnan(iv.half_width)
    assert format_interval(t_interval([0.01, 0.05])) == NO_INTERVAL == "no interval (needs >= 3 seeds)"
    assert t_interval([0.01, 0.05]).mean == pytest.approx(0.03)
    assert t_interval([0.01, float("nan"), 0.05, 0.03]).n == 3    # NaNs are dropped, not counted


def test_paired_and_summary_functions_directly() -> None:
    runs = pd.DataFrame({"method": ["mate_kd"] * 4 + ["ce"] * 3 + ["kd"],
                         "seed": [0, 1, 2, 3, 0, 2, 3, 5],
                         "test_acc": [0.9, 0.8, 0.7, 0.6, 0.89, 0.67, 0.58, 0.5]})
    diff = paired_differences(runs, "test_acc").set_index("baseline")
    # common seeds with ce: 0, 2, 3 -> 0.01, 0.03, 0.02; kd shares no seed
    assert diff.loc["ce", "n"] == 3 and diff.loc["ce", "seeds"] == "0 2 3"
    assert diff.loc["ce", "per_seed"] == pytest.approx({0: 0.01, 2: 0.03, 3: 0.02})
    assert diff.loc["ce", "mean"] == pytest.approx(0.02) and diff.loc["ce", "half"] == pytest.approx(0.024841, abs=1e-6)
    assert diff.loc["kd", "n"] == 0 and math.isnan(diff.loc["kd", "mean"]) and math.isnan(diff.loc["kd", "half"])
    assert list(diff.index) == ["ce", "kd"]                 # table order, not alphabetical
    summary = ablation_summary(runs, metrics=("test_acc",)).set_index("method")
    assert list(summary.index) == ["ce", "kd", "mate_kd"]
    assert summary.loc["mate_kd", "test_acc_mean"] == pytest.approx(0.75)
    assert summary.loc["mate_kd", "test_acc_sd"] == pytest.approx(np.std([0.9, 0.8, 0.7, 0.6], ddof=1))
    assert summary.loc["mate_kd", "test_acc_half"] == pytest.approx(
        3.182446 * np.std([0.9, 0.8, 0.7, 0.6], ddof=1) / 2, rel=1e-6)
    assert math.isnan(summary.loc["kd", "test_acc_half"])


# --------------------------------------------------------------------------------------
# Shortcuts


def test_shortcuts_of_a_quick_profile() -> None:
    cuts = shortcuts(quick_params())
    text = "\n".join(cuts)
    assert "fewer epochs: teacher resnet110 2, teacher vgg19_bn 2, students 2 (paper: 200)" in cuts
    assert "teachers resnet110, vgg19_bn instead of" in text
    assert "training subset: 100 images per class (1,000 instead of 45,000)" in cuts
    assert "validation split: 20 images per class (200 instead of 5,000)" in cuts
    assert "test subset: 50 images per class (500 of the 10,000 test images)" in cuts
    assert any(c.startswith("CIFAR-10-C subset: 4 images per class") for c in cuts)
    assert ("smaller batches: teacher resnet110, teacher vgg19_bn, students batch 64 with learning rate 0.05 "
            "(paper: batch 128, lr 0.1; the linear scaling rule)") in cuts          # one line for alike recipes
    assert any(c.startswith("teacher logits read from the cache (exact") for c in cuts)
    assert any(c.startswith("cache.logit_variants: used (exact") for c in cuts)
    assert any(c.startswith("ablation students trained 4 at a time") and "exact by construction" in c for c in cuts)


def test_shortcuts_of_a_paper_equivalent_setting_are_none() -> None:
    assert shortcuts(paper_params()) == []
    # exact speed-ups are still named, and say they are exact
    assert shortcuts(paper_params(teacher_signals="cached")) == [
        ("teacher logits read from the cache (exact: each crop/flip variant's logits computed once by the cache "
         "stage, the same numbers as running the teachers online)")]


def test_shortcuts_name_larger_batches_warmup_and_changed_values() -> None:
    recipe = {"epochs": 200, "batch_size": 512, "lr": 0.4, "warmup_epochs": 2}
    params = paper_params(recipe=recipe, kd_temperature=4.0)
    cuts = shortcuts(params)
    assert ("larger batches: students batch 512 with learning rate 0.4 (paper: batch 128, lr 0.1; "
            "the linear scaling rule)") in cuts
    assert "linear learning-rate warm-up: students 2 epoch(s) (not in the paper recipe)" in cuts
    assert ("shared distill values differ from the paper's seed configuration: kd_temperature 4 (paper 3)") in cuts
    assert len(cuts) == 3
    wide = paper_params(recipe={"epochs": 200, "batch_size": 256, "lr": 0.1})
    assert shortcuts(wide) == [("larger batches: students batch 256 with learning rate 0.1 (paper: batch 128, "
                                "lr 0.1; linear scaling would give 0.2)")]


# --------------------------------------------------------------------------------------
# The report from fixture files


def test_report_tables_labels_intervals_and_figures(built) -> None:
    md = built.md
    headings = [line for line in md.splitlines() if line.startswith(("## ", "### "))]
    for expected in ("## Setup", "## Summary", "### Paired difference mate_kd", "### Teacher weighting",
                     "## 1. Seed's table", "## 2. Ablation", "### Values each method trained with",
                     "## 3. Robustness per corruption", "## 4. Robustness per severity", "## 5. Grad-CAM",
                     "## 6. Training curves", "## How these numbers were obtained"):
        assert any(h.startswith(expected) for h in headings), expected
    for heading in headings:
        if heading.startswith(("## How", "## Missing")):
            continue
        assert DATASET in heading and f"{CORRUPTION}, frost skipped" in heading and "profile `quick`" in heading
    # the header: data sizes and the shortcuts derived from the params
    setup = section(md, "## Setup")
    assert "training 1,000 images (100 per class)" in setup and "evaluated on 500 test images" in setup
    assert "40 images per corruption and severity (4 per class), 40 evaluated" in setup
    assert built.shortcuts
    for cut in built.shortcuts:
        assert f"  - {cut}" in setup
    assert built.summary["shortcuts"] == built.shortcuts
    assert "change the result" in md
    # seed's table: the distill student, method from its weights' metadata
    row = next(line for line in md.splitlines() if line.startswith("| student-distill (mate_kd, seed 0)"))
    assert "82.00" in row and "0.27M" in row and "1.10" in row and "50.00*" in row
    # paired differences: ce has 3 common seeds (0.01, 0.03, 0.02), kd only 2
    paired = section(md, "### Paired difference")
    ce = table_rows(paired, "ce |")[0]
    assert ce[1:6] == ["3", "0 1 2", "+2.00", "± 2.48 (-0.48 to +4.48)", "0: +1.00, 1: +3.00, 2: +2.00"]
    kd = table_rows(paired, "kd |")[0]
    assert kd[1] == "2" and kd[4] == NO_INTERVAL and kd[5] == "0: -1.00, 1: +4.00"
    assert [r[0] for r in table_rows(paired, "")[1:]] == ["ce", "kd", "mate_kd_noattr", "ca_mkd", DUMMY]
    # ablation table: mean and interval per method, table order
    ablation = section(md, "## 2. Ablation")
    rows = table_rows(ablation, "")[1:]
    assert [r[0] for r in rows] == ["ce", "kd", "mate_kd_noattr", "mate_kd", "ca_mkd", DUMMY]
    ce_row = rows[0]
    iv = t_interval([0.79, 0.81, 0.81])
    assert ce_row[3] == "80.33" and ce_row[4] == format_interval(iv)
    assert rows[1][4] == NO_INTERVAL
    figures = sorted(p.name for p in (built.root / "reports" / "figures").iterdir())
    assert figures == sorted(["methods-accuracy.png", "corruption-accuracy.png", "severity-accuracy.png",
                              "val-acc.png", "train-loss.png", "teacher-weights.png",
                              "confusion-student-distill.png", "gradcam-student-distill.png"])
    assert all(f"figures/{name}" in md for name in figures)
    assert "stale.png" not in figures                    # reports/ is rebuilt, not patched
    missing = section(md, "## Missing or inconsistent inputs")
    assert ("ablation runs missing (7 of 18): ca_mkd-seed1, ca_mkd-seed2, dummy_conf-seed1, dummy_conf-seed2, "
            "kd-seed2, mate_kd_noattr-seed1, mate_kd_noattr-seed2;") in missing
    assert "methods/kd.json is missing" in missing and "method_inputs@kd" in missing
    assert "methods/mate_kd.json says tuned = True but params.yaml has ablation.tuned: false" in missing
    for hash_ in ("d" * 64, "c" * 64, built.params_digest):
        assert hash_ in md
    assert "matekd tune --method" in md and "dvc exp run -S ablation.tuned=true" in md


def test_values_table_says_tuned_or_shared(built) -> None:
    md = built.md
    values = section(md, "### Values each method trained with")
    rows = {r[0]: r for r in table_rows(values, "")[1:]}
    assert rows["mate_kd"][1] == "tuned (12 trials, from tuning/best/mate_kd.yaml)"
    assert rows["mate_kd"][2] == "kd_temperature 4.2; ce_weight 0.25" and rows["mate_kd"][3] == "0.07"
    assert rows["ce"][1] == "shared distill.* values" and rows["ce"][2] == "– (no hyperparameters)"
    assert rows["kd"][1].startswith("params.yaml distill.* (fallback: methods/kd.json missing")
    assert "kd_teacher resnet110; kd_temperature 3; ce_weight 0.3" == rows["kd"][2]
    assert rows[DUMMY][2] == "kd_temperature 3; ce_weight 0.3"      # its hyperparameters from the table


def test_weighting_entropy_per_weighting_method(built) -> None:
    md = built.md
    weighting = section(md, "### Teacher weighting")
    rows = {r[0]: r for r in table_rows(weighting, "")[1:]}
    assert list(rows) == ["mate_kd_noattr", "mate_kd", "ca_mkd", DUMMY]    # ce, kd, mtkd_equal have fixed weights
    assert rows["mate_kd"][1:6] == ["attribution", "3", "0.850", "0.800–0.900", "0.925"]
    assert rows["ca_mkd"][3] == "0.990" and rows[DUMMY][3] == "0.500"
    assert "resnet110 0.600, vgg19_bn 0.400" in rows["mate_kd"][6]
    assert "`ce` (none)" in weighting and "`kd` (one-hot)" in weighting
    csv = pd.read_csv(built.root / "reports" / "results.csv")
    hit = csv[(csv.table == "weighting") & (csv.model == "mate_kd") & (csv.metric == "entropy_relative")]
    assert float(hit.value.iloc[0]) == pytest.approx(0.85)
    # the Grad-CAM table's entropy: 0.5 log 2 / log 2
    assert "| student-distill | resnet110 | 0.800 | 0.100 | 0.600 | 75.0 | 0.500 |" in md


def test_overlay_csvs_have_the_agreed_columns_and_one_series_per_method(built) -> None:
    plots = built.root / "reports" / "plots"
    methods = ["ce", "kd", "mate_kd_noattr", "mate_kd", "ca_mkd", DUMMY]
    val = pd.read_csv(plots / "val_acc.csv")
    assert list(val.columns) == ["epoch", "series", "val_acc"]
    assert list(dict.fromkeys(val.series)) == methods                 # the distill run is not a series
    ce2 = val[(val.series == "ce") & (val.epoch == 2)].val_acc
    assert ce2.tolist() == pytest.approx([np.mean([0.40, 0.41, 0.42])])    # mean over seeds 0, 1, 2
    loss = pd.read_csv(plots / "train_loss.csv")
    assert list(loss.columns) == ["epoch", "series", "train_loss"] and list(dict.fromkeys(loss.series)) == methods
    weights = pd.read_csv(plots / "teacher_weights.csv")
    assert list(weights.columns) == ["epoch", "series", "weight"]
    assert sorted(set(weights.series)) == sorted(f"{m}/{t}" for m in ("mate_kd_noattr", "mate_kd", "ca_mkd", DUMMY)
                                                 for t in ("resnet110", "vgg19_bn"))
    assert weights[(weights.series == "mate_kd/resnet110") & (weights.epoch == 2)].weight.iloc[0] == pytest.approx(0.6)
    corr = pd.read_csv(plots / "corruption_accuracy.csv")
    assert list(corr.columns) == ["corruption", "series", "accuracy"]
    assert list(dict.fromkeys(corr.series)) == methods
    assert set(corr.corruption) == set(STANDARD_CORRUPTIONS + EXTRA_CORRUPTIONS) - {"frost"}
    # fog at level L: mean over severities of L - 0.05 s = L - 0.1; mate_kd levels 0.58, 0.61, 0.60
    fog = corr[(corr.series == "mate_kd") & (corr.corruption == "fog")].accuracy.iloc[0]
    assert fog == pytest.approx(np.mean([0.58, 0.61, 0.60]) - 0.1)


def test_report_csv_numbers(built) -> None:
    csv = pd.read_csv(built.root / "reports" / "results.csv")
    assert list(csv.columns) == ["table", "model", "metric", "value"]

    def value(table: str, model: str, metric: str) -> float:
        hit = csv[(csv.table == table) & (csv.model == model) & (csv.metric == metric)]
        assert len(hit) == 1, (table, model, metric)
        return float(hit.value.iloc[0])

    assert value("ablation_paired", "mate_kd-ce", "test_acc_diff_mean") == pytest.approx(0.02)
    assert value("ablation_paired", "mate_kd-ce", "test_acc_diff_half") == pytest.approx(0.024841, abs=1e-6)
    assert value("ablation_paired", "mate_kd-ce", "test_acc_diff/seed1") == pytest.approx(0.03)
    assert math.isnan(value("ablation_paired", "mate_kd-kd", "test_acc_diff_half"))
    # the distill student is not an ablation run: mate_kd averages seeds 0-2 only
    assert value("ablation", "mate_kd", "test_acc_mean") == pytest.approx(np.mean([0.80, 0.84, 0.83]))
    assert value("ablation", "mate_kd", "test_acc_n") == 3
    assert value("values", "mate_kd", "tuned") == 1 and value("values", "ce", "tuned") == 0
    assert value("seed", "vgg19_bn", "test_acc") == pytest.approx(0.91)
    assert value("robustness", "resnet110", "fog/severity2") == pytest.approx(0.65)


def test_stage_logs_the_report_and_its_figures_to_the_run(built) -> None:
    logged = built.logged
    assert "report/figures/methods-accuracy.png" in logged["artifacts"]
    assert {f"report/plots/{n}.csv" for n in ("val_acc", "train_loss", "teacher_weights", "corruption_accuracy")} \
        <= set(logged["artifacts"])
    assert "report/results.md" in logged["artifacts"] and "report/shortcuts.txt" in logged["text"]
    assert logged["metrics"]["paired/mate_kd-ce/test_acc_diff_mean"] == pytest.approx(0.02)
    assert logged["metrics"]["weighting/mate_kd/entropy_relative"] == pytest.approx(0.85)


def test_weight_evolution_sources() -> None:
    hist = histogram_mean_weights([{"epoch": 1, "bins": 4, "counts": {"a": [2, 0, 0, 2], "b": [0, 0, 4, 0]}}])
    # bin centres 0.125, 0.375, 0.625, 0.875
    assert hist.loc[1, "a"] == pytest.approx(0.5) and hist.loc[1, "b"] == pytest.approx(0.625)
    frame, source = weight_evolution(pd.DataFrame({"epoch": [1, 2], "train_weight_mean/a": [0.3, 0.4]}), None)
    assert frame.loc[2, "a"] == pytest.approx(0.4) and "training" in source
    assert weight_evolution(pd.DataFrame({"epoch": [1]}), []) is None


def test_run_weighting_from_either_shape_of_metrics_or_from_the_history() -> None:
    nested = run_weighting({"weighting": {"entropy_relative": 0.7, "weight_mean": {"a": 0.6, "b": 0.4}}}, None)
    flat = run_weighting({"weighting.entropy_relative": 0.7, "weighting.weight_mean.a": 0.6,
                          "weighting.weight_mean.b": 0.4}, None)
    assert nested == flat and nested["final"] == 0.7 and nested["weights"] == {"a": 0.6, "b": 0.4}
    # an older history with the entropy in nats only: relative = entropy / log K, K = 2 weight columns
    old = pd.DataFrame({"epoch": [1, 2], "train_entropy": [math.log(2), 0.5 * math.log(2)],
                        "train_weight_mean/a": [0.5, 0.7], "train_weight_mean/b": [0.5, 0.3]})
    found = run_weighting({"seed": 0}, old)
    assert found["final"] == pytest.approx(0.5) and found["over_epochs"] == pytest.approx(0.75)
    assert found["weights"] == pytest.approx({"a": 0.7, "b": 0.3})


def test_summary_json_in_either_shape() -> None:
    nested = {"resnet110": {"test_acc": 0.9, "cifar10c_mean15": 0.7}}
    assert per_model_summary(nested) == per_model_summary({"resnet110/test_acc": 0.9,
                                                           "resnet110/cifar10c_mean15": 0.7}) == nested
    assert per_model_summary({"student-mate_kd-seed0/test_acc": 0.8}) == {"student-mate_kd-seed0": {"test_acc": 0.8}}


def test_report_lists_missing_inputs(fixture_root) -> None:
    (fixture_root / "metrics/eval/student-kd-seed0.json").unlink()
    (fixture_root / "metrics/student/ce-seed1.json").unlink()
    (fixture_root / "metrics/eval/student-ce-seed1.json").unlink()
    (fixture_root / "metrics/teachers/vgg19_bn.json").write_text("{not json")
    run_report(fixture_params())
    md = (fixture_root / "reports" / "results.md").read_text()
    missing = section(md, "## Missing or inconsistent inputs")
    assert "metrics/eval/student-kd-seed0.json is missing" in missing
    assert "ce-seed1" in missing and "dvc repro" in missing
    assert "unreadable" in missing and "vgg19_bn.json" in missing


def test_report_without_any_input_raises(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATEKD_TRACKING", "off")
    with pytest.raises(MatekdError, match="dvc repro"):
        run_report(quick_params())
    assert not (tmp_path / "reports").exists()


def test_report_with_training_metrics_only(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATEKD_TRACKING", "off")
    write(tmp_path / "metrics/teachers/resnet110.json", {"test_acc": 0.5, "params": 1_700_000, "size_mb": 6.8})
    write(tmp_path / "metrics/teachers/vgg19_bn.json", {"test_acc": 0.6, "params": 20_000_000, "size_mb": 80.0})
    write(tmp_path / "metrics/student/distill.json", {"seed": 0, "test_acc": 0.4, "params": 270000, "size_mb": 1.1})
    # evaluate's numbers-only summary stands in for a missing metrics/eval file
    write(tmp_path / "metrics/summary.json", {"vgg19_bn": {"test_acc": 0.61, "cifar10c_mean15": 0.35,
                                                           "cifar10c_mean19": 0.33}})
    run_report(quick_params())
    md = (tmp_path / "reports" / "results.md").read_text()
    assert "| resnet110 | 50.00 | 1.70M | 6.80 | – | – |" in md
    assert "| vgg19_bn | 61.00 | 20.00M | 80.00 | 35.00 | 33.00 |" in md
    assert "metrics/summary.json, training metrics" in md
    assert "student-distill (mate_kd, seed 0) | 40.00" in md
    assert "the method of student-distill comes from params.distill.method" in md
    assert "metrics/eval/resnet110.json is missing" in md and "No ablation runs" in md
    assert "No metrics/eval files" in md and "dataset unknown" in md
    for name in ("val_acc", "train_loss", "teacher_weights", "corruption_accuracy"):
        assert len(pd.read_csv(tmp_path / "reports" / "plots" / f"{name}.csv")) == 0   # header only


# --------------------------------------------------------------------------------------
# Figure layout: titles and legends off the data


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_report_legends_sit_outside_every_axes(fixture_root, monkeypatch) -> None:
    from matekd.report import figures as report_figures

    checked = []

    def check_then_close(fig, path):
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
        plots = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(_overlaps(box, ax.get_window_extent(renderer)) for ax in plots), path.name
        title = fig._suptitle.get_window_extent(renderer)
        assert not any(_overlaps(title, ax.get_tightbbox(renderer)) for ax in plots), path.name
        checked.append((path.name, len(legends)))
        import matplotlib.pyplot as plt

        plt.close(fig)

    monkeypatch.setattr(report_figures, "_save", check_then_close)
    run_report(fixture_params())
    names = dict(checked)
    assert {"methods-accuracy.png", "val-acc.png", "train-loss.png", "teacher-weights.png",
            "severity-accuracy.png", "corruption-accuracy.png"} <= set(names)
    assert names["methods-accuracy.png"] == 1 and names["val-acc.png"] == 1 and names["teacher-weights.png"] == 1


def test_gradcam_grid_title_sits_above_the_column_labels() -> None:
    import matplotlib.pyplot as plt
    import torch

    from matekd.evaluation import gradcam_figure

    # 8 rows (evaluate.grid_images of the quick and paper profiles), 2 teachers (the narrowest grid):
    # with tight_layout the title overlapped the column labels from 4 rows on.
    rows, k = 8, 2
    rng = np.random.default_rng(0)
    fig = gradcam_figure(rng.integers(0, 255, (rows, 32, 32, 3), dtype=np.uint8), np.arange(rows) % 10,
                         torch.rand(rows, 8, 8), torch.rand(k, rows, 8, 8), torch.rand(k, rows),
                         torch.full((k, rows), 1 / k), ["resnet110", "vgg19_bn"], CLASSES,
                         "student-mate_kd_noattr-seed2: Grad-CAM vs teachers (s = cosine, w = softmax(s/0.2)), "
                         "a title long enough to need wrapping on a narrow grid")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    figure = fig.bbox
    assert figure.x0 <= title.x0 and title.x1 <= figure.x1 and title.y1 <= figure.y1   # not cut off
    for ax in fig.axes:
        assert not _overlaps(title, ax.title.get_window_extent(renderer))
        assert title.y0 >= ax.title.get_window_extent(renderer).y1 - 0.5                 # above every label
    plt.close(fig)


def test_shortcuts_name_a_shared_data_stream_and_gpu_precision() -> None:
    params = paper_params()
    params.distill.data_seed = 0
    cuts = shortcuts(params, ["NVIDIA H200", "cpu (2 threads)"])
    assert any(c.startswith("one data stream for every student (distill.data_seed 0)") for c in cuts)
    assert any(c.startswith("bf16 autocast and channels_last on the GPU (NVIDIA H200)") for c in cuts)
    assert not any("bf16" in c for c in shortcuts(paper_params(), ["cpu (2 threads)"]))


def test_shortcuts_name_what_ran_in_bf16_from_the_metric_files() -> None:
    from matekd.report.document import bf16_parts
    from matekd.report.inputs import Inputs

    recorded = Inputs(teachers={"resnet110": {"bf16": 1}}, students={"ce-seed0": {"bf16": 1}},
                      evals={"resnet110": {"precision": "fp32"}})
    assert bf16_parts(recorded) == ["teachers", "students"]
    assert bf16_parts(Inputs(teachers={"resnet110": {"test_acc": 0.9}})) is None   # older outputs: no record
    cuts = shortcuts(paper_params(), ["cpu (2 threads)"], bf16_parts(recorded))
    assert "bf16 autocast and channels_last for teachers, students on cpu (2 threads) (precision param); " \
           "the paper recipe is fp32" in cuts
    # recorded fp32 everywhere: no bf16 line even on a GPU
    assert not any("bf16" in c for c in shortcuts(paper_params(), ["NVIDIA H200"], []))
