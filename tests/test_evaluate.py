"""Stage evaluate: accuracy/confusion maths, CIFAR-10-C summaries, Grad-CAM agreement, the stage."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from matekd import evaluation as ev
from matekd.augment import CIFAR_MEAN, CIFAR_STD, to_device_tensor
from matekd.evaluation import (
    EXTRA_CORRUPTIONS,
    STANDARD_CORRUPTIONS,
    confusion_matrix,
    corruption_label,
    corruption_table,
    dataset_label,
    evaluate_clean,
    gradcam_agreement,
    severity_accuracy,
    stratified_order,
    summarise_corruption,
)
from matekd.stages import evaluate as evaluate_stage

torch.set_num_threads(1)
CPU = torch.device("cpu")


class EncodedModel(nn.Module):
    """Predicts the class written into each image's top-left red pixel (value 20*c + 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw = (x[:, 0, 0, 0] * CIFAR_STD[0] + CIFAR_MEAN[0]) * 255.0   # undo normalize()
        cls = torch.round((raw - 5) / 20).long().clamp(0, 9)
        return torch.nn.functional.one_hot(cls, 10).float() + 0 * self.dummy


def encoded_images(pred: list[int]) -> np.ndarray:
    images = np.full((len(pred), 32, 32, 3), 128, dtype=np.uint8)
    images[:, 0, 0, 0] = np.asarray(pred) * 20 + 5
    return images


def test_known_predictions_give_known_accuracy_and_confusion() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    pred = [0, 1, 1, 1, 2, 0, 3, 9]
    x = to_device_tensor(encoded_images(pred), CPU)
    out = evaluate_clean(EncodedModel(), x, labels, batch_size=3, device=CPU, num_classes=10)
    assert out["accuracy"] == pytest.approx(5 / 8)
    expected = np.zeros((10, 10), dtype=np.int64)
    for t, p in [(0, 0), (0, 1), (1, 1), (1, 1), (2, 2), (2, 0), (3, 3), (3, 9)]:
        expected[t, p] += 1
    np.testing.assert_array_equal(out["confusion_matrix"], expected)
    per_class = out["per_class_accuracy"]
    np.testing.assert_allclose(per_class[:4], [0.5, 1.0, 0.5, 0.5])
    assert np.isnan(per_class[4:]).all()          # classes without test images


def test_confusion_matrix_rows_are_true_classes_and_rejects_bad_input() -> None:
    m = confusion_matrix(torch.tensor([2, 2, 1]), np.array([0, 2, 1]), 3)
    np.testing.assert_array_equal(m, [[0, 0, 1], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 3)


def test_corruption_table_reads_severity_blocks() -> None:
    n = 4
    labels = np.tile(np.arange(n), 5)
    pred = labels.copy()
    for s in range(5):                                 # severity s+1 has s wrong of 4
        pred[s * n:s * n + s] = (pred[s * n:s * n + s] + 1) % 10
    corrupted = {"gaussian_noise": encoded_images(pred.tolist()),
                 "saturate": encoded_images(labels.tolist())}
    table = corruption_table({"m": EncodedModel()}, corrupted, labels, batch_size=7, device=CPU)
    np.testing.assert_allclose(table["m"]["gaussian_noise"], [1.0, 0.75, 0.5, 0.25, 0.0])
    np.testing.assert_allclose(table["m"]["saturate"], [1.0] * 5)
    with pytest.raises(ValueError):
        severity_accuracy(np.ones(7))


def hand_table(drop: tuple[str, ...] = ()) -> dict[str, list[float]]:
    table = {name: [0.9, 0.8, 0.7, 0.6, 0.5] for name in STANDARD_CORRUPTIONS}
    table["gaussian_noise"] = [0.4] * 5
    table.update({name: [0.2] * 5 for name in EXTRA_CORRUPTIONS})
    return {k: v for k, v in table.items() if k not in drop}


def test_summary_separates_15_mean_19_mean_and_severities() -> None:
    s = summarise_corruption(hand_table())
    # 14 standard corruptions average 0.7, gaussian_noise 0.4, the 4 extras 0.2.
    assert s["standard_mean"] == pytest.approx((14 * 0.7 + 0.4) / 15)
    assert s["all_mean"] == pytest.approx((14 * 0.7 + 0.4 + 4 * 0.2) / 19)
    assert s["extra_mean"] == pytest.approx(0.2)
    assert s["standard_mean_complete"] and s["all_mean_complete"] and s["standard_missing"] == []
    assert s["per_severity_standard"] == pytest.approx([(14 * a + 0.4) / 15 for a in (0.9, 0.8, 0.7, 0.6, 0.5)])
    assert s["per_severity_all"] == pytest.approx([(14 * a + 0.4 + 0.8) / 19 for a in (0.9, 0.8, 0.7, 0.6, 0.5)])
    assert s["per_corruption"]["gaussian_noise"] == pytest.approx(0.4)
    assert s["per_corruption"]["fog"] == pytest.approx(0.7)


def test_missing_frost_is_flagged_and_excluded() -> None:
    s = summarise_corruption(hand_table(drop=("frost",)))
    assert s["standard_mean_complete"] is False
    assert s["standard_missing"] == ["frost"]
    assert s["standard_count"] == 14
    assert s["standard_mean"] == pytest.approx((13 * 0.7 + 0.4) / 14)
    assert s["all_mean"] == pytest.approx((13 * 0.7 + 0.4 + 0.8) / 18)
    assert s["all_mean_complete"] is False
    only_extras = summarise_corruption({"spatter": [0.5] * 5})
    assert only_extras["standard_mean"] is None and only_extras["extra_mean"] == pytest.approx(0.5)


def test_summary_rejects_unknown_names_and_wrong_shapes() -> None:
    with pytest.raises(ValueError, match="unknown"):
        summarise_corruption({"rain": [0.5] * 5})
    with pytest.raises(ValueError):
        summarise_corruption({"fog": [0.5] * 4})


def test_stratified_order_interleaves_classes() -> None:
    # class 0 at positions 2, 4; class 1 at 0, 1, 5; class 2 at 3
    assert stratified_order(np.array([1, 1, 0, 2, 0, 1])).tolist() == [2, 0, 3, 4, 1, 5]


def test_gradcam_agreement_resizes_and_weights() -> None:
    student = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 1.0], [0.0, 0.0]]])       # [B=2,2,2]
    same = torch.repeat_interleave(torch.repeat_interleave(student, 2, dim=1), 2, dim=2)  # 4x4 blocks
    orthogonal = torch.tensor([[[0.0, 3.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    out = gradcam_agreement(student, [same, orthogonal], tau=0.5)
    # a 2x2-block 4x4 map resizes (bilinear, factor 2) back exactly: cosine 1; the other is orthogonal.
    np.testing.assert_allclose(out["similarity"].numpy(), [[1, 1], [0, 0]], atol=1e-6)
    w0 = math.exp(2) / (math.exp(2) + 1)                 # softmax([1, 0] / 0.5)
    np.testing.assert_allclose(out["weights"].numpy(), [[w0, w0], [1 - w0, 1 - w0]], rtol=1e-5)
    np.testing.assert_allclose(out["dominant_fraction"].numpy(), [1.0, 0.0])


def test_data_labels() -> None:
    assert dataset_label({"source": {"kind": "cifar10-python"}}) == "CIFAR-10 (canonical)"
    assert dataset_label({"source_kind": "cifar10-python"}) == "CIFAR-10 (canonical)"
    mirror = {"source": {"kind": "image-folder", "sha256": ev.JPEG_MIRROR_SHA256, "lossy_jpeg": True}}
    assert dataset_label(mirror) == "CIFAR-10 (JPEG q75 mirror)"
    assert "image folder" in dataset_label({"source": {"kind": "image-folder", "sha256": "x", "lossy_jpeg": False}})
    assert "image folder" in dataset_label({"source_kind": "image-folder"})
    assert corruption_label({"kind": "official"}) == "CIFAR-10-C (official)"
    assert corruption_label({"kind": "regenerated", "seed": 3}) == "CIFAR-10-C (regenerated, seed 3)"
    base = {"kind": "regenerated", "array_sha256": {"fog": "a"}, "labels_sha256": "l", "seconds": {"fog": 1.0}}
    assert ev.corruption_digest(base) == ev.corruption_digest({**base, "seconds": {"fog": 9.0}})
    assert ev.corruption_digest(base) != ev.corruption_digest({**base, "array_sha256": {"fog": "b"}})


# --------------------------------------------------------------------------------------
# The stage, end to end on tiny fixtures (2 ResNet teachers, 2 students, 20 images)


def tiny_params(tmp_path):
    from matekd.params import validate_params

    recipe = {"epochs": 1, "batch_size": 8, "lr": 0.1}
    return validate_params({
        "profile": "test", "device": "cpu", "teachers": {"resnet20": recipe, "resnet56": recipe},
        "distill": {"student": "resnet20", "kd_teacher": "resnet20", "recipe": recipe},
        "ablation": {"methods": ["ce", "mate_kd"], "seeds": [0]},
        "evaluate": {"batch_size": 16, "gradcam_images": 6, "grid_images": 2},
        "tracking": {"enabled": False},
    })


@pytest.fixture
def stage_files(tmp_path, monkeypatch):
    from matekd.data.prepared import Prepared
    from matekd.models import build_model
    from matekd.storage import save_tensors

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATEKD_TRACKING", "off")
    rng = np.random.default_rng(0)
    test_labels = np.tile(np.arange(10), 2).astype(np.int64)
    test_images = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    empty = np.zeros((0, 32, 32, 3), np.uint8)
    idx = np.zeros(0, np.int64)
    prepared = Prepared(empty, idx, empty, idx, test_images, test_labels, idx, idx, np.arange(20),
                        manifest={"source": {"kind": "image-folder", "sha256": ev.JPEG_MIRROR_SHA256,
                                             "lossy_jpeg": True}}, manifest_hash="h" * 64)
    n = 4
    c_labels = np.tile(test_labels[:n], 5)
    corrupted = {name: rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
                 for name in ("gaussian_noise", "speckle_noise")}
    for array in corrupted.values():
        array.setflags(write=False)                    # load_corrupted memory-maps read-only .npy files
    c_manifest = {"kind": "regenerated", "seed": 3, "skipped": {"frost": "no textures"},
                  "prepared_manifest_sha256": "h" * 64}
    monkeypatch.setattr(evaluate_stage, "load_prepared", lambda *a, **k: prepared)
    monkeypatch.setattr(evaluate_stage, "load_corrupted", lambda *a, **k: (corrupted, c_labels, c_manifest))
    torch.manual_seed(0)
    r20 = build_model("resnet20")
    save_tensors("models/teachers/resnet20.safetensors", r20.state_dict(), {"architecture": "resnet20"})
    save_tensors("models/teachers/resnet56.safetensors", build_model("resnet56").state_dict(),
                 {"architecture": "resnet56"})
    # the `distill` student is a copy of the resnet20 teacher: identical maps and predictions
    save_tensors("models/student/distill.safetensors", r20.state_dict(),
                 {"architecture": "resnet20", "method": "mate_kd", "seed": "0"})
    save_tensors("models/student/ce-seed0.safetensors", build_model("resnet20").state_dict(),
                 {"architecture": "resnet20", "method": "ce", "seed": "0"})
    return tmp_path


def test_run_evaluate_writes_every_model(stage_files) -> None:
    params = tiny_params(stage_files)
    out = stage_files / "metrics" / "eval"
    out.mkdir(parents=True)
    (out / "stale.json").write_text("{}")               # a removed model must not survive
    results = evaluate_stage.run_evaluate(params)
    assert set(results) == {"resnet20", "resnet56", "student-distill", "student-ce-seed0"}
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["resnet20.json", "resnet56.json", "student-distill.json", "student-ce-seed0.json",
                            "gradcam-student-distill.json", "gradcam-student-distill.png",
                            "gradcam-student-ce-seed0.json", "gradcam-student-ce-seed0.png"])
    entry = json.loads((out / "student-distill.json").read_text())
    cm = np.asarray(entry["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == 20
    assert entry["test_acc"] == pytest.approx(np.trace(cm) / 20)
    assert entry["dataset"] == "CIFAR-10 (JPEG q75 mirror)"
    assert entry["corruption_dataset"] == "CIFAR-10-C (regenerated, seed 3)"
    assert entry["cifar10c_skipped"] == {"frost": "no textures"} and entry["cifar10c_matches_prepared"] is True
    assert entry["profile"] == "test" and entry["test_images"] == 20
    assert entry["method"] == "mate_kd" and entry["seed"] == 0 and entry["params"] > 0
    c = entry["cifar10c"]
    assert c["standard_mean_complete"] is False and "frost" in c["standard_missing"]
    assert c["standard_mean"] == pytest.approx(c["per_corruption"]["gaussian_noise"])
    assert c["extra_mean"] == pytest.approx(c["per_corruption"]["speckle_noise"])
    teacher = json.loads((out / "resnet20.json").read_text())
    assert teacher["confusion_matrix"] == entry["confusion_matrix"]   # same weights, same predictions
    assert teacher["cifar10c"]["accuracy"] == c["accuracy"]
    g = json.loads((out / "gradcam-student-distill.json").read_text())
    assert g["images"] == 6 and g["teachers"] == ["resnet20", "resnet56"]
    # identical maps: cosine 1, except where an untrained net's ReLU'd map is all zero (cosine 0)
    sims = np.array(g["per_image"]["similarity"]["resnet20"])
    assert np.all(np.isclose(sims, 1.0, atol=1e-5) | np.isclose(sims, 0.0)) and np.isclose(sims, 1.0).any()
    weights = np.array([g["per_image"]["weight"][t] for t in g["teachers"]])
    np.testing.assert_allclose(weights.sum(0), 1.0, rtol=1e-5)
    assert sorted(g["per_image"]["label"]) == sorted(range(6))  # classes interleaved: 6 different classes
    assert sum(g["dominant_fraction"].values()) == pytest.approx(1.0)

    assert not (stage_files / "metrics" / "eval-partial").exists()      # removed once metrics/eval is whole

    from matekd.stages.report import run_report

    run_report(params)
    md = (stage_files / "reports" / "results.md").read_text()
    assert "CIFAR-10 (JPEG q75 mirror)" in md and "frost skipped" in md
    assert (stage_files / "reports" / "figures" / "gradcam-student-distill.png").exists()


def test_each_student_is_analysed_with_the_values_it_trained_with(stage_files) -> None:
    """With ablation.tuned a student trained with its method's tuned values (methods/<m>.json
    records them): its Grad-CAM analysis uses those, not the shared distill.* values."""
    from matekd.models import build_model
    from matekd.storage import save_tensors, write_json

    params = tiny_params(stage_files)
    torch.manual_seed(1)
    save_tensors("models/student/mate_kd-seed0.safetensors", build_model("resnet20").state_dict(),
                 {"architecture": "resnet20", "method": "mate_kd", "seed": "0"})
    write_json(stage_files / "methods" / "mate_kd.json", {
        "method": "mate_kd", "values": {"distill.similarity_temperature": 0.7, "distill.similarity": "pearson",
                                        "distill.similarity_temperature_end": 0.35,
                                        "distill.similarity_schedule_epochs": 2},
        "recipe": {"distill.recipe.epochs": 5}, "tuned": {"from": "tuning/best/mate_kd.yaml", "trials": 3}})
    evaluate_stage.run_evaluate(params)
    out = stage_files / "metrics" / "eval"
    tuned = json.loads((out / "gradcam-student-mate_kd-seed0.json").read_text())
    assert tuned["tau"] == pytest.approx(0.35) and tuned["similarity"] == "pearson"   # its schedule's last value
    shared = json.loads((out / "gradcam-student-distill.json").read_text())             # the distill stage's
    assert shared["tau"] == params.distill.similarity_temperature and shared["similarity"] == "cosine"
    baseline = json.loads((out / "gradcam-student-ce-seed0.json").read_text())          # no file: shared values
    assert baseline["tau"] == params.distill.similarity_temperature


def test_evaluate_stopped_part_way_keeps_every_finished_model(stage_files, monkeypatch) -> None:
    """The students are evaluated first and each finished model is written at once: a stop
    while the second teacher is evaluated leaves the students' and the first teacher's numbers
    (the same as a whole run writes), and no metrics/eval."""
    params = tiny_params(stage_files)
    whole = evaluate_stage.run_evaluate(params)
    real_table, batches = evaluate_stage.corruption_table, []

    def stop_at_the_third_batch(models, *args, **kwargs):
        batches.append(sorted(models))
        if len(batches) == 3:
            raise KeyboardInterrupt        # what SIGTERM from the runner's time limit amounts to
        return real_table(models, *args, **kwargs)

    monkeypatch.setattr(evaluate_stage, "corruption_table", stop_at_the_third_batch)
    shutil.rmtree(stage_files / "metrics")
    with pytest.raises(KeyboardInterrupt):
        evaluate_stage.run_evaluate(params)
    assert batches == [["student-ce-seed0", "student-distill"], ["resnet20"], ["resnet56"]]
    partial = stage_files / "metrics" / "eval-partial"
    assert sorted(p.name for p in partial.iterdir()) == ["resnet20.json", "student-ce-seed0.json",
                                                         "student-distill.json"]
    for name in ("resnet20", "student-ce-seed0", "student-distill"):
        assert json.loads((partial / f"{name}.json").read_text()) == whole[name]
    assert not (stage_files / "metrics" / "eval").exists()


def test_fused_prediction_groups_give_each_models_own_logits() -> None:
    """On a GPU, ResNets of one depth are evaluated as one fused network; the grouping and the
    fused predictor are exercised here on the CPU by asking for it explicitly."""
    from matekd.evaluation import _FusedPredictor, prediction_groups
    from matekd.models import build_model
    from matekd.training.loop import predict_logits

    models = {}
    for seed in range(3):
        torch.manual_seed(seed)
        models[f"s{seed}"] = build_model("resnet20").eval()
    models["t"] = build_model("resnet56").eval()
    assert [names for names, _ in prediction_groups(models, CPU)] == [["s0"], ["s1"], ["s2"], ["t"]]
    images = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    fused = _FusedPredictor([models[f"s{k}"] for k in range(3)], CPU)
    logits = fused(images, 4, CPU)
    assert logits.shape == (3, 10, 10)
    for k in range(3):
        alone = predict_logits(models[f"s{k}"], images, 4, CPU)
        torch.testing.assert_close(logits[k], alone, atol=1e-4 * float(alone.abs().max()), rtol=0)


def test_every_model_gets_its_own_evaluation_run(stage_files, monkeypatch, tmp_path) -> None:
    """Nested runs `eval <model>` under the evaluate run, with the model's method and seed and its
    clean and CIFAR-10-C numbers: the runs table compares methods on robustness row by row."""
    from matekd.tracking import read_folder

    params = tiny_params(stage_files)
    params.tracking.enabled = True
    offline = tmp_path / "offline"
    monkeypatch.setenv("MATEKD_TRACKING", "offline")
    monkeypatch.setenv("MATEKD_OFFLINE_DIR", str(offline))
    results = evaluate_stage.run_evaluate(params)
    records = read_folder(offline)
    parent = next(r for r in records.values() if r.meta["run_name"] == "evaluate")
    children = {r.meta["run_name"]: r for r in records.values() if r.meta.get("parent_run_id") == parent.run_id}
    assert set(children) == {f"eval {name}" for name in results}
    ce = children["eval student-ce-seed0"]
    assert ce.meta["tags"]["method"] == "ce" and ce.meta["tags"]["stage"] == "evaluate-model"
    assert ce.meta["params"]["distill.method"] == "ce"
    logged = {m["key"]: m["value"] for m in ce.metrics}
    assert logged["test_acc"] == pytest.approx(results["student-ce-seed0"]["test_acc"])
    assert "cifar10c/gaussian_noise" in logged and "gradcam/similarity_mean/resnet20" in logged
    teacher = {m["key"] for m in children["eval resnet56"].metrics}
    assert "test_acc" in teacher and not any(k.startswith("gradcam/") for k in teacher)


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_a_students_evaluation_metrics_are_its_logged_models(stage_files, monkeypatch, tmp_path, mode) -> None:
    """MLflow 3 links: the evaluation metrics of a student carry the id of the logged model its
    training run made (found through the weights' provenance) and the dataset they were measured
    on; the evaluation datasets are the runs' inputs. Offline, sync maps the ids."""
    from matekd.models import build_model
    from matekd.storage import load_tensors
    from matekd.tracking import ModelBuilder, client_for, record_output, start_run, sync_runs

    params = tiny_params(stage_files)
    params.tracking.enabled = True
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    (tmp_path / "store").mkdir()
    monkeypatch.setenv("MATEKD_TRACKING", mode)
    monkeypatch.setenv("MATEKD_OFFLINE_DIR", str(tmp_path / "offline"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    weights = Path("models/student/ce-seed0.safetensors")
    student = build_model("resnet20")
    student.load_state_dict(load_tensors(weights)[0])
    example = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with start_run(enabled=True, mode=mode, experiment=params.tracking.experiment, run_name="ablation ce seed0",
                   stage="ablation", params={}, tags={}) as training:
        model_id = training.log_model(student.eval(), name="ce-seed0", input_example=example,
                                      registered_name="matekd-student-ce",
                                      builder=ModelBuilder("matekd.models:build_model", {"name": "resnet20"}))
        record_output(training, "weights", weights, model_id)
    assert model_id
    training_id = training.run_id
    results = evaluate_stage.run_evaluate(params)
    from matekd.stages.report import run_report

    run_report(params)   # marks the versions it reports
    if mode == "offline":
        summary = sync_runs(tmp_path / "offline", uri)
        assert not summary.unlinked and summary.aliases == ["matekd-student-ce@report-seed0 -> v1"]
        training_id = summary.imported[training_id]
    client = client_for(uri)
    (logged,) = client.search_logged_models([client.get_run(training_id).info.experiment_id],
                                            filter_string=f"source_run_id = '{training_id}'")
    by_key = {m.key: m for m in logged.metrics}
    assert by_key["test_acc"].value == pytest.approx(results["student-ce-seed0"]["test_acc"])
    assert by_key["test_acc"].dataset_name == "cifar10-test" and by_key["cifar10c/gaussian_noise"].dataset_name \
        == "cifar10-c"
    assert "gradcam/similarity_mean/resnet20" in by_key   # measured on test images
    evaluation = client.get_run(by_key["test_acc"].run_id)
    assert evaluation.info.run_name == "eval student-ce-seed0"
    assert evaluation.data.tags["training_run_id"] == training_id
    assert evaluation.data.tags["logged_model_id"] == logged.model_id
    assert [m.model_id for m in evaluation.inputs.model_inputs] == [logged.model_id]
    inputs = {d.dataset.name: d.dataset.digest for d in evaluation.inputs.dataset_inputs}
    assert inputs == {"cifar10-test": by_key["test_acc"].dataset_digest,
                      "cifar10-c": by_key["cifar10c/gaussian_noise"].dataset_digest}
    # the other student has no tracked training run: its metrics stay the evaluation run's only
    other = client.search_runs([evaluation.info.experiment_id], "attributes.run_name = 'eval student-distill'")
    assert other and "logged_model_id" not in other[0].data.tags
    # MLflow ranks logged models by an evaluation metric
    ranked = client.search_logged_models([evaluation.info.experiment_id], order_by=[
        {"field_name": "metrics.test_acc", "ascending": False}])
    assert [m.model_id for m in ranked] == [logged.model_id]
    version = client.get_model_version_by_alias("matekd-student-ce", "report-seed0")
    assert version.run_id == training_id and version.source == logged.artifact_location
