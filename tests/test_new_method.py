"""A method is one module: registered from this file alone, a method with a new loss term and a new
hyperparameter is validated, trains, logs, tunes, is evaluated and reported, with no edit
anywhere else (the registry is the only place the rest of the code learns about it)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import optuna
import pytest
import torch
import yaml

from matekd import methods as method_table
from matekd.errors import ParamsError
from matekd.methods import Hyperparameter, Method
from matekd.methods.kd import KD_HYPERPARAMETERS, equal, kd_loss
from matekd.params import load_params
from matekd.stages import context as stage_context
from matekd.storage import read_json
from matekd.tracking import NullRun
from test_tune import build_workspace

NAME = "kd_entropy"
ENTROPY_WEIGHT = Hyperparameter("entropy_weight", float, 0.1, {"ge": 0}, label="g", tunable=True,
                                doc="weight of the confidence penalty (negative entropy of the student)")


def confidence_penalty_loss(inputs, values) -> dict:
    """KD from equal teachers plus g x sum_c p_c log p_c (a confidence penalty)."""
    probs = torch.softmax(inputs.student_logits, dim=-1)
    negative_entropy = torch.special.xlogy(probs, probs).sum(dim=-1)
    return {**kd_loss(inputs, values), "neg_entropy": (negative_entropy, values.entropy_weight)}


@pytest.fixture
def new_method():
    method = method_table.register(Method(
        name=NAME, teachers="all", weighting="equal", weigh=equal, loss=confidence_penalty_loss,
        terms=("ce", "kd", "neg_entropy"), hyperparameters=(*KD_HYPERPARAMETERS, ENTROPY_WEIGHT),
        summary="test-only: equal-weight KD with a confidence penalty"))
    try:
        yield method
    finally:
        method_table.unregister(NAME)


class RecordingRun(NullRun):
    active = True

    def __init__(self):
        self.metrics: list[dict] = []

    def log_metrics(self, metrics, step=None, **kwargs):
        self.metrics.append(dict(metrics))


def test_a_method_with_a_new_loss_term_trains_logs_tunes_and_reports(tmp_path, monkeypatch, new_method):
    root = build_workspace(tmp_path / "ws", train_teachers=True)
    monkeypatch.chdir(root)
    overrides = {"device": "cpu", "distill.entropy_weight": 0.2, "ablation.methods": ["ce", NAME],
                 "tune.methods": [NAME], "tune.n_trials": 2, "tracking.enabled": False,
                 "tune.space": {"entropy_weight": {"low": 0.0, "high": 0.5}}}
    params = load_params("params.yaml", overrides)
    assert params.distill.entropy_weight == 0.2
    with pytest.raises(ParamsError, match=r"distill\.entropy_weight = -1"):     # its bounds, its key
        load_params("params.yaml", {**overrides, "distill.entropy_weight": -1})

    # trains and logs its own term and hyperparameter
    from matekd.stages.distill import run_distill
    from matekd.stages.method_inputs import run_method_inputs

    opened: list[tuple[dict, RecordingRun]] = []

    @contextlib.contextmanager
    def recording_run(**kwargs):
        opened.append((kwargs, RecordingRun()))
        yield opened[-1][1]

    monkeypatch.setattr(stage_context, "start_run", recording_run)
    for method in ("ce", NAME):
        assert run_method_inputs(params, method)["method"] == method
        run_distill(params, method=method, seed=0, ablation=True, progress=False)
    assert read_json(Path("methods") / f"{NAME}.json")["values"]["distill.entropy_weight"] == 0.2
    kwargs, run = opened[-1]
    assert kwargs["params"]["distill.entropy_weight"] == 0.2 and "distill.entropy_weight" not in opened[0][0]["params"]
    assert "g=0.2" in kwargs["tags"]["hyperparameters"]
    epoch = next(m for m in run.metrics if "val_acc" in m)
    assert epoch["train_neg_entropy"] < 0 and epoch["train_kd"] > 0
    assert any("step/neg_entropy" in m for m in run.metrics)
    history = read_json(Path("metrics") / "student" / f"{NAME}-seed0.json")
    assert 0 <= history["test_acc"] <= 1

    # tunes its own new hyperparameter
    from matekd.stages.tune import run_tune

    run_tune(params, progress=False)
    study = optuna.load_study(study_name=f"{params.tune.study_name}-{NAME}", storage="sqlite:///tuning/optuna.db")
    assert all("distill.entropy_weight" in t.params for t in study.trials) and len(study.trials) == 2
    best = yaml.safe_load(Path("tuning/best").joinpath(f"{NAME}.yaml").read_text())
    assert 0.0 <= best["values"]["distill.entropy_weight"] <= 0.5

    # is evaluated and reported beside the built-in methods
    from matekd.stages.corrupt import run_corrupt
    from matekd.stages.evaluate import run_evaluate
    from matekd.stages.report import run_report

    run_corrupt(params)
    run_evaluate(params)
    run_report(params)
    results = Path("reports/results.md").read_text()
    assert NAME in results and "entropy_weight 0.2" in results
    assert NAME in Path("reports/results.csv").read_text()
