"""The `matekd` command: every stage is listed, user errors exit 2 with one line, --set reaches stages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import matekd.stages.prepare
from matekd.cli import build_parser, main
from matekd.errors import DataError
from matekd.params import Params

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
PARAMS = str(ROOT / "params.yaml")
STAGES = ("fetch", "prepare", "train-teacher", "cache", "method-inputs", "distill", "ablation", "corrupt", "evaluate",
          "report", "tune", "bench", "sync-runs", "methods", "gpu-run")


def python(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return python("-m", "matekd.cli", *args, cwd=cwd)


def test_help_lists_every_stage() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for stage in STAGES:  # each stage starts an indented line of the STAGE list
        assert re.search(rf"^\s+{re.escape(stage)}(\s|$)", result.stdout, re.M), stage


def test_parser_has_exactly_the_stages(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert all(stage in out for stage in STAGES)
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(STAGES)


@pytest.mark.parametrize("stage", [s for s in STAGES if s not in ("fetch", "sync-runs", "methods", "gpu-run")])
def test_every_stage_takes_params_and_set(stage: str) -> None:
    extra = {"train-teacher": ["resnet110"], "cache": ["resnet110"], "method-inputs": ["ce"]}.get(stage, [])
    args = build_parser().parse_args([stage, *extra, "--params", "p.yaml", "--set", "a.b=1", "-S", "c=2"])
    assert args.params == "p.yaml" and args.set == ["a.b=1", "c=2"]


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[Params]:
    """Replace the prepare stage with one that records the params it was given."""
    seen: list[Params] = []
    monkeypatch.setattr(matekd.stages.prepare, "run_prepare", seen.append)
    return seen


def test_stage_error_exits_2_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def boom(params: Any) -> None:
        raise DataError("boom")

    monkeypatch.setattr(matekd.stages.prepare, "run_prepare", boom)
    assert main(["prepare", "--params", PARAMS]) == 2
    captured = capsys.readouterr()
    assert captured.err == "error: boom\n"
    assert "Traceback" not in captured.err + captured.out


def test_other_exceptions_are_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(params: Any) -> None:
        raise ZeroDivisionError("a bug, not a user error")

    monkeypatch.setattr(matekd.stages.prepare, "run_prepare", bug)
    with pytest.raises(ZeroDivisionError):
        main(["prepare", "--params", PARAMS])


def test_user_error_in_a_real_process_has_no_traceback(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run_cli("prepare", "--params", str(missing), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_params_fail_before_torch_is_imported() -> None:
    """Validation comes first, so a typo costs a fraction of a second, not a torch import."""
    code = ("import sys; from matekd.cli import main; "
            f"rc = main(['train-teacher', 'resnet110', '--params', {PARAMS!r}, '--set', 'distill.ce_weight=2']); "
            "print('torch' in sys.modules); sys.exit(rc)")
    result = python("-c", code)
    assert result.returncode == 2 and "distill.ce_weight" in result.stderr
    assert result.stdout.strip() == "False"


def test_set_reaches_the_stage_typed(captured: list[Params]) -> None:
    assert main(["prepare", "--params", PARAMS, "--set", "distill.ce_weight=0.5", "-S", "data.train_per_class=null",
                 "--set", "distill.method=kd", "--set", "teachers.resnet110.epochs=7"]) == 0
    (params,) = captured
    assert isinstance(params.distill.ce_weight, float) and params.distill.ce_weight == 0.5
    assert params.data.train_per_class is None
    assert params.distill.method == "kd"
    assert params.teachers["resnet110"].epochs == 7
    # everything not overridden comes from the file
    assert params.profile == "quick" and params.data.val_per_class == 20


def test_without_set_the_file_is_used(captured: list[Params]) -> None:
    assert main(["prepare", "--params", PARAMS]) == 0
    assert captured[0].distill.ce_weight == 0.3


@pytest.mark.parametrize("pair, named", [
    ("distill.ce_weight=2", "distill.ce_weight"),
    ("distill.ce_weight=abc", "distill.ce_weight"),
    ("distill.kd_temprature=4", "distill.kd_temprature"),
    ("distill.ce_weight=[1", "distill.ce_weight"),
    ("distill.ce_weight.x=1", "distill.ce_weight"),
    ("distill.ce_weight", "distill.ce_weight"),
])
def test_bad_set_exits_2_naming_the_key(captured: list[Params], capsys: pytest.CaptureFixture,
                                        pair: str, named: str) -> None:
    assert main(["prepare", "--params", PARAMS, "--set", pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "Traceback" not in err
    assert captured == []  # the stage never ran


def test_unknown_stage_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["distil"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
