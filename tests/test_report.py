"""Stage report: tables from fixture metric files, paired ablation differences, missing inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from matekd.errors import MatekdError
from matekd.evaluate import EXTRA_CORRUPTIONS, STANDARD_CORRUPTIONS
from matekd.params import validate_params
from matekd.report import (
    ablation_summary,
    histogram_mean_weights,
    paired_differences,
    run_report,
    weight_evolution,
)

torch.set_num_threads(1)

DATASET = "CIFAR-10 (JPEG q75 mirror)"
CORRUPTION = "CIFAR-10-C (regenerated, seed 0)"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# (output name, method, seed, test accuracy, CIFAR-10-C level)
STUDENTS = [("distill", "mate_kd", 0, 0.82, 0.60), ("ce-seed0", "ce", 0, 0.78, 0.50),
            ("ce-seed1", "ce", 1, 0.79, 0.52), ("kd-seed0", "kd", 0, 0.81, 0.55),
            ("mate_kd-seed0", "mate_kd", 0, 0.80, 0.58), ("mate_kd-seed1", "mate_kd", 1, 0.84, 0.61)]
TEACHERS = [("resnet110", 0.90, 0.70), ("vgg19_bn", 0.91, 0.71)]


def params(**extra):
    recipe = {"epochs": 1, "batch_size": 8, "lr": 0.1}
    return validate_params({
        "profile": "quick", "device": "cpu", "teachers": {"resnet110": recipe, "vgg19_bn": recipe},
        "distill": {"student": "resnet20", "kd_teacher": "resnet110", "recipe": recipe},
        "ablation": {"methods": ["ce", "kd", "mate_kd"], "seeds": [0, 1]},
        "tracking": {"enabled": False}, **extra})


def eval_entry(model: str, kind: str, acc: float, level: float, **extra) -> dict:
    """A metrics/eval JSON: every corruption but frost at `level` - 0.05*(s-1), extras 0.3."""
    table = {n: [level - 0.05 * s for s in range(5)] for n in STANDARD_CORRUPTIONS if n != "frost"}
    table.update({n: [0.3] * 5 for n in EXTRA_CORRUPTIONS})
    standard = level - 0.1
    cm = np.zeros((10, 10), int)
    np.fill_diagonal(cm, 8)
    cm[0, 1] = 2
    return {"model": model, "kind": kind, "test_acc": acc, "params": 270000, "size_mb": 1.1,
            "dataset": DATASET, "corruption_dataset": CORRUPTION, "profile": "quick",
            "cifar10c_skipped": {"frost": "no textures"}, "class_names": CLASSES,
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


@pytest.fixture
def fixture_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATEKD_TRACKING", "off")
    for name, acc, level in TEACHERS:
        write(tmp_path / f"metrics/teachers/{name}.json",
              {"model": name, "test_acc": acc, "params": 1_700_000, "size_mb": 6.8, "device": "cpu"})
        write(tmp_path / f"metrics/eval/{name}.json", eval_entry(name, "teacher", acc, level))
    for output, method, seed, acc, level in STUDENTS:
        write(tmp_path / f"metrics/student/{output}.json",
              {"model": f"student-{output}", "method": method, "seed": seed, "test_acc": acc,
               "params": 270000, "size_mb": 1.1})
        write(tmp_path / f"metrics/eval/student-{output}.json",
              eval_entry(f"student-{output}", "student", acc, level, output=output, method=method, seed=seed))
    gradcam = {"student": "student-distill", "teachers": ["resnet110", "vgg19_bn"], "images": 8,
               "similarity": "cosine", "tau": 0.2,
               "similarity_mean": {"resnet110": 0.8, "vgg19_bn": 0.7},
               "similarity_std": {"resnet110": 0.1, "vgg19_bn": 0.1},
               "weight_mean": {"resnet110": 0.6, "vgg19_bn": 0.4},
               "dominant_fraction": {"resnet110": 0.75, "vgg19_bn": 0.25}}
    write(tmp_path / "metrics/eval/gradcam-student-distill.json", gradcam)
    from PIL import Image

    Image.new("RGB", (4, 4)).save(tmp_path / "metrics/eval/gradcam-student-distill.png")
    plots = tmp_path / "plots/student"
    plots.mkdir(parents=True)
    pd.DataFrame({"epoch": [1, 2], "train_loss": [2.0, 1.5], "val_acc": [0.3, 0.4],
                  "train_weight_mean/resnet110": [0.5, 0.6], "train_weight_mean/vgg19_bn": [0.5, 0.4]}
                 ).to_csv(plots / "distill.csv", index=False)
    pd.DataFrame({"epoch": [1, 2], "train_loss": [2.0, 1.5]}).to_csv(plots / "mate_kd-seed0.csv", index=False)
    write(plots / "mate_kd-seed0-weights.json",
          [{"epoch": 1, "bins": 4, "counts": {"resnet110": [2, 0, 0, 2], "vgg19_bn": [0, 0, 4, 0]}}])
    return tmp_path


def test_report_renders_every_table_with_labels(fixture_root) -> None:
    stale = fixture_root / "reports" / "figures" / "stale.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    run_report(params())
    md = (fixture_root / "reports" / "results.md").read_text()
    headings = [line for line in md.splitlines() if line.startswith("## ") or line.startswith("### ")]
    for expected in ("## 1. Seed's table", "## 2. Ablation", "### Paired difference mate_kd",
                     "## 3. Robustness per corruption", "## 4. Robustness per severity", "## 5. Grad-CAM",
                     "## 6. Figures", "## How these numbers were obtained"):
        assert any(h.startswith(expected) for h in headings), expected
    for heading in headings:
        if heading.startswith(("## How", "## Missing")):
            continue
        assert DATASET in heading and f"{CORRUPTION}, frost skipped" in heading and "profile `quick`" in heading
    assert "Profile `quick`" in md and "not a result" in md
    # seed's table: the distill student's row with accuracy, size and the (incomplete) 15-mean
    row = next(line for line in md.splitlines() if line.startswith("| student-distill (mate_kd, seed 0)"))
    assert "82.00" in row and "0.27M" in row and "1.10" in row and "50.00*" in row
    assert "missing: frost" in md
    for hash_ in ("d" * 64, "c" * 64, params().digest()):
        assert hash_ in md
    figures = sorted(p.name for p in (fixture_root / "reports" / "figures").iterdir())
    assert figures == sorted(["confusion-student-distill.png", "accuracy-per-corruption.png",
                              "accuracy-per-severity.png", "gradcam-student-distill.png",
                              "teacher-weights-distill.png", "teacher-weights-mate_kd-seed0.png"])
    assert not stale.exists()                            # reports/ is rebuilt, not patched
    missing = md.split("## Missing or inconsistent inputs")[1].split("\n## ")[0]
    assert [line for line in missing.splitlines() if line.startswith("- ")] == [
        "- ablation runs missing (1 of 6): kd-seed1; run `dvc repro ablation`"]


def test_report_csv_paired_differences_match_hand_computation(fixture_root) -> None:
    run_report(params())
    csv = pd.read_csv(fixture_root / "reports" / "results.csv")
    assert list(csv.columns) == ["table", "model", "metric", "value"]

    def value(table: str, model: str, metric: str) -> float:
        hit = csv[(csv.table == table) & (csv.model == model) & (csv.metric == metric)]
        assert len(hit) == 1, (table, model, metric)
        return float(hit.value.iloc[0])

    # mate_kd seeds 0,1: 0.80, 0.84; ce: 0.78, 0.79 -> differences 0.02, 0.05
    assert value("ablation_paired", "mate_kd-ce", "test_acc_diff_mean") == pytest.approx(0.035)
    assert value("ablation_paired", "mate_kd-ce", "test_acc_diff_std") == pytest.approx(0.03 / math.sqrt(2))
    assert value("ablation_paired", "mate_kd-ce", "test_acc_diff_n") == 2
    # kd only has seed 0: one pair 0.80 - 0.81
    assert value("ablation_paired", "mate_kd-kd", "test_acc_diff_mean") == pytest.approx(-0.01)
    assert value("ablation_paired", "mate_kd-kd", "test_acc_diff_n") == 1
    assert math.isnan(value("ablation_paired", "mate_kd-kd", "test_acc_diff_std"))
    # CIFAR-10-C 15-mean = level - 0.1: mate_kd 0.48, 0.51; ce 0.40, 0.42 -> 0.08, 0.09
    assert value("ablation_paired", "mate_kd-ce", "cifar10c_mean15_diff_mean") == pytest.approx(0.085)
    assert value("ablation", "ce", "test_acc_mean") == pytest.approx(0.785)
    assert value("ablation", "ce", "test_acc_std") == pytest.approx(0.01 / math.sqrt(2))
    # the distill student is not an ablation run: mate_kd averages seeds 0 and 1 only
    assert value("ablation", "mate_kd", "test_acc_mean") == pytest.approx(0.82)
    assert value("ablation", "mate_kd", "test_acc_n") == 2
    assert value("seed", "vgg19_bn", "test_acc") == pytest.approx(0.91)
    assert value("robustness", "resnet110", "fog/severity2") == pytest.approx(0.65)
    assert value("severity", "student-ce-seed0", "clean") == pytest.approx(0.78)
    assert value("gradcam", "student-distill", "weight_mean/resnet110") == pytest.approx(0.6)


def test_paired_and_summary_functions_directly() -> None:
    runs = pd.DataFrame({"method": ["mate_kd", "mate_kd", "mate_kd", "ce", "ce", "kd"],
                         "seed": [0, 1, 2, 0, 2, 5],
                         "test_acc": [0.9, 0.8, 0.7, 0.6, 0.65, 0.5]})
    diff = paired_differences(runs, "test_acc").set_index("baseline")
    # common seeds with ce: 0 and 2 -> 0.3, 0.05; kd shares no seed
    assert diff.loc["ce", "n"] == 2 and diff.loc["ce", "seeds"] == "0 2"
    assert diff.loc["ce", "mean"] == pytest.approx(0.175)
    assert diff.loc["ce", "std"] == pytest.approx(0.25 / math.sqrt(2))
    assert diff.loc["kd", "n"] == 0 and math.isnan(diff.loc["kd", "mean"])
    summary = ablation_summary(runs, metrics=("test_acc",)).set_index("method")
    assert list(summary.index) == ["ce", "kd", "mate_kd"]
    assert summary.loc["mate_kd", "test_acc_mean"] == pytest.approx(0.8)
    assert summary.loc["mate_kd", "test_acc_std"] == pytest.approx(0.1)


def test_weight_evolution_sources() -> None:
    hist = histogram_mean_weights([{"epoch": 1, "bins": 4, "counts": {"a": [2, 0, 0, 2], "b": [0, 0, 4, 0]}}])
    # bin centres 0.125, 0.375, 0.625, 0.875
    assert hist.loc[1, "a"] == pytest.approx(0.5) and hist.loc[1, "b"] == pytest.approx(0.625)
    history = pd.DataFrame({"epoch": [1, 2], "train_weight_mean/a": [0.3, 0.4]})
    frame, source = weight_evolution(history, None)
    assert frame.loc[2, "a"] == pytest.approx(0.4) and "training" in source
    assert weight_evolution(pd.DataFrame({"epoch": [1]}), []) is None


def test_report_lists_missing_inputs(fixture_root) -> None:
    (fixture_root / "metrics/eval/student-kd-seed0.json").unlink()
    (fixture_root / "metrics/student/ce-seed1.json").unlink()
    (fixture_root / "metrics/eval/student-ce-seed1.json").unlink()
    (fixture_root / "metrics/teachers/vgg19_bn.json").write_text("{not json")
    run_report(params())
    md = (fixture_root / "reports" / "results.md").read_text()
    missing = md.split("## Missing or inconsistent inputs")[1].split("\n## ")[0]
    assert "metrics/eval/student-kd-seed0.json is missing" in missing
    assert "ce-seed1" in missing and "dvc repro ablation" in missing
    assert "unreadable" in missing and "vgg19_bn.json" in missing


def test_report_without_any_input_raises(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATEKD_TRACKING", "off")
    with pytest.raises(MatekdError, match="dvc repro"):
        run_report(params())
    assert not (tmp_path / "reports").exists()


def test_report_with_training_metrics_only(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATEKD_TRACKING", "off")
    write(tmp_path / "metrics/teachers/resnet110.json", {"model": "resnet110", "test_acc": 0.5, "params": 1_700_000,
                                                         "size_mb": 6.8, "dataset_sha256": "e" * 64})
    write(tmp_path / "metrics/student/distill.json", {"model": "student-distill", "method": "mate_kd", "seed": 0,
                                                      "test_acc": 0.4, "params": 270000, "size_mb": 1.1})
    run_report(params())
    md = (tmp_path / "reports" / "results.md").read_text()
    assert "| resnet110 | 50.00 | 1.70M | 6.80 | – | – |" in md
    assert "student-distill (mate_kd, seed 0) | 40.00" in md
    assert "metrics/eval/resnet110.json is missing" in md and "dvc repro ablation" in md
    assert "No metrics/eval files" in md and "dataset unknown" in md and "e" * 64 in md
