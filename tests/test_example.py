"""examples/one_student.py runs on tiny data and trains the very student the pipeline trains."""

from __future__ import annotations

import runpy
from pathlib import Path

import torch

from matekd.data.prepared import load_prepared
from matekd.params import load_params
from matekd.precision import use_precision
from matekd.tracking import NullRun
from matekd.training.loop import configure_determinism
from matekd.training.students import resolve_spec, train_students
from test_tune import build_workspace

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "one_student.py"
CPU = torch.device("cpu")


def test_the_example_trains_the_student_the_pipeline_trains(tmp_path, monkeypatch, capsys):
    root = build_workspace(tmp_path / "ws", train_teachers=True)
    monkeypatch.chdir(root)
    example = runpy.run_path(str(EXAMPLE))
    student = example["main"](["--epochs", "2"])
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "kd=" in printed and "attr=" in printed and "test_acc=" in printed

    params = load_params("params.yaml", {"distill.method": "mate_kd", "distill.recipe.epochs": 2})
    configure_determinism(params.distill.seed, deterministic=False)
    use_precision("fp32", CPU)
    spec = resolve_spec(params, "mate_kd", params.distill.seed, "example")
    (trained,) = train_students(params, [spec], load_prepared("prepared"), CPU, [NullRun()], None, progress=False,
                                with_test=False)
    pipeline = trained.model.state_dict()
    for key, value in student.state_dict().items():       # the same weights, to the last bit
        assert torch.equal(value, pipeline[key]), key
