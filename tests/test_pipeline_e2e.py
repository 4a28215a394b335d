"""End to end: `dvc repro` of the whole pipeline in a temporary copy of the repository with
the tiny profile, then the MLflow store, a no-op second repro and a one-teacher param change.

The reproduced repository is built once per test session and shared with
test_dvc_experiments.py (helpers_repo.reproduced_repo); tests that change it use a clone.
Uses the CIFAR-10 archive named by MATEKD_CIFAR10 (CI: the JPEG mirror) or, without it, a
small synthetic image-folder archive.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from helpers_repo import clone_repo, reproduced_repo, run, stages_run
from matekd.precision import resolve_precision

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return reproduced_repo(tmp_path_factory.getbasetemp() / "pipeline")


@pytest.fixture(scope="module")
def first_repro(repo) -> str:
    """The output of the shared `dvc repro`."""
    return (repo.parent / "repro.log").read_text()


def _client(repo: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("matekd")
    assert experiment is not None, "no MLflow experiment 'matekd' in the repo's store"
    return client, experiment.experiment_id


def _runs(repo: Path, stage: str):
    client, exp = _client(repo)
    return client, client.search_runs([exp], filter_string=f"tags.stage = '{stage}'", max_results=1000)


def test_repro_writes_every_output(repo, first_repro):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    expected = [repo / "prepared" / "manifest.json", repo / "prepared" / "cifar10.safetensors",
                repo / "reports" / "results.md", repo / "reports" / "results.csv"]
    for name in params["teachers"]:
        expected += [repo / "models" / "teachers" / f"{name}.safetensors",
                     repo / "metrics" / "teachers" / f"{name}.json",
                     repo / "plots" / "teachers" / f"{name}.csv",
                     repo / "cams" / f"{name}.safetensors"]
    for method in params["ablation"]["methods"]:
        expected.append(repo / "methods" / f"{method}.json")
        for seed in params["ablation"]["seeds"]:
            expected += [repo / "models" / "student" / f"{method}-seed{seed}.safetensors",
                         repo / "metrics" / "student" / f"{method}-seed{seed}.json",
                         repo / "plots" / "student" / f"{method}-seed{seed}-weights.json"]
    expected += [repo / "models" / "student" / "distill.safetensors", repo / "metrics" / "summary.json"]
    expected += [repo / "reports" / "plots" / name for name in
                 ("val_acc.csv", "train_loss.csv", "teacher_weights.csv", "corruption_accuracy.csv")]
    missing = [str(p.relative_to(repo)) for p in expected if not p.exists()]
    assert not missing, f"missing outputs: {missing}\n{first_repro[-3000:]}"


def test_mlflow_holds_one_run_per_teacher_with_per_epoch_metrics(repo, first_repro):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    client, runs = _runs(repo, "train_teacher")
    assert sorted(r.data.tags["model"] for r in runs) == sorted(params["teachers"])
    for teacher_run in runs:
        epochs = params["teachers"][teacher_run.data.tags["model"]]["epochs"]
        for key in ("val_acc", "train_loss", "train_acc", "lr", "images_per_second"):
            history = client.get_metric_history(teacher_run.info.run_id, key)
            # step = the 0-based epoch index (train.fit: shared with the per-epoch images)
            assert [m.step for m in history] == list(range(epochs)), key
        for tag in ("git_commit", "git_dirty", "dataset_sha256", "profile", "device", "precision", "torch_version",
                    "params_sha256"):
            assert teacher_run.data.tags.get(tag), tag
        model = teacher_run.data.tags["model"]
        # precision auto: what this machine resolves it to, in the run and in the metrics file
        resolved = resolve_precision(params["precision"], torch.device("cpu"))
        assert teacher_run.data.tags["precision"] == resolved
        metrics = json.loads((repo / "metrics" / "teachers" / f"{model}.json").read_text())
        assert metrics["bf16"] == int(resolved == "bf16")
        assert teacher_run.data.params[f"teachers.{model}.lr"] == str(params["teachers"][model]["lr"])
        assert teacher_run.info.status == "FINISHED"


def test_mlflow_student_runs_log_their_terms_teacher_statistics_and_histograms(repo, first_repro):
    """One run per student (stage distill and every ablation@...), each with the loss terms its
    method has: ce only for ce; kd for teacher methods; attr for mate_kd; per-teacher weight
    statistics where the weights vary per sample (similarities for the attribution weighting)."""
    params = yaml.safe_load((repo / "params.yaml").read_text())
    client, distill_runs = _runs(repo, "distill")
    _, ablation_runs = _runs(repo, "ablation")
    assert [r.data.tags["method"] for r in distill_runs] == [params["distill"]["method"]]
    assert sorted(r.data.tags["method"] for r in ablation_runs) == sorted(
        m for m in params["ablation"]["methods"] for _ in params["ablation"]["seeds"])
    teachers = list(params["teachers"])
    mate = next(r for r in distill_runs + ablation_runs if r.data.tags["method"] == "mate_kd")
    keys = set(mate.data.metrics)
    for term in ("total", "ce", "kd", "attr"):
        assert f"step/{term}" in keys and f"train_{term}" in keys, term
        assert len(client.get_metric_history(mate.info.run_id, f"step/{term}")) >= 1
    for teacher in teachers:
        for stat in ("weight_mean", "weight_std", "dominant_fraction", "similarity_mean", "similarity_std"):
            assert f"train_{stat}/{teacher}" in keys, (stat, teacher)
    assert "train_entropy" in keys and "val_acc" in keys and "test_acc" in keys and "lr" in keys
    images = [a.path for a in client.list_artifacts(mate.info.run_id, "images")]
    assert images, "no teacher-weight histogram image logged"
    histograms = [a.path for a in client.list_artifacts(mate.info.run_id, "histograms")]
    assert len(histograms) == params["distill"]["recipe"]["epochs"]
    by_method = {r.data.tags["method"]: set(r.data.metrics) for r in ablation_runs}
    if "ce" in by_method:
        assert {"train_total", "train_ce"} <= by_method["ce"]
        assert not {k for k in by_method["ce"] if k.startswith(("train_kd", "train_attr", "train_weight"))}
    if "ca_mkd" in by_method:   # confidence weighting: weight statistics, no similarities
        assert {f"train_weight_mean/{t}" for t in teachers} <= by_method["ca_mkd"]
        assert not {k for k in by_method["ca_mkd"] if k.startswith("train_similarity")}
    if "kd" in by_method:
        assert "train_kd" in by_method["kd"] and "train_attr" not in by_method["kd"]


def test_second_repro_does_nothing(repo, first_repro):
    _, before = _runs(repo, "train_teacher")
    proc = run(repo, "dvc", "repro")
    assert "Running stage" not in proc.stdout, proc.stdout
    _, after = _runs(repo, "train_teacher")
    assert len(after) == len(before)


def test_changing_one_teacher_reruns_only_that_teacher(repo, tmp_path):
    clone = clone_repo(repo, tmp_path / "repo")
    params_path = clone / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["teachers"]["resnet56"]["lr"] = 0.02
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    status = run(clone, "dvc", "status").stdout
    assert "train_teacher@resnet56" in status and "train_teacher@resnet20" not in status, status
    proc = run(clone, "dvc", "repro", "train_teacher@resnet20", "train_teacher@resnet56")
    assert stages_run(proc.stdout) == ["train_teacher@resnet56"], proc.stdout


def test_publish_study_copies_a_finished_report_with_provenance_and_stage_times(repo, first_repro, tmp_path):
    out = tmp_path / "published"
    script = Path(__file__).resolve().parents[1] / "scripts" / "publish-study.py"
    run(repo, sys.executable, str(script), str(repo), str(out))
    assert (out / "results.md").read_text() == (repo / "reports" / "results.md").read_text()
    assert (out / "results.csv").exists() and any((out / "figures").iterdir())
    commit = run(repo, "git", "rev-parse", "HEAD").stdout.strip()
    assert commit in (out / "provenance.md").read_text()
    with open(out / "stage_times.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"train_teacher", "ablation", "evaluate", "report"} <= {r["stage"] for r in rows}
    assert all(float(r["wall_seconds"]) >= 0 for r in rows if r["status"] == "FINISHED")
    # an unfinished pipeline is refused and nothing is written
    clone = clone_repo(repo, tmp_path / "unfinished")
    (clone / "params.yaml").write_text((clone / "params.yaml").read_text().replace("seed: 0", "seed: 1", 1))
    refused = run(clone, sys.executable, str(script), str(clone), str(tmp_path / "nothing"), check=False)
    assert refused.returncode == 1 and "not complete" in refused.stderr
    assert not (tmp_path / "nothing").exists()
