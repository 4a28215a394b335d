"""Fault injection on the real pipeline: determinism of the teacher and student stages and
SIGKILL mid-training followed by `dvc repro`, which must resume and end bit-identical."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers_repo import make_repo, repo_env, run
from matekd.stages.train_teacher import TIMING_KEYS
from matekd.storage import safe_torch_load, sha256_file

pytestmark = pytest.mark.slow

STAGES = {
    "teacher": ("train_teacher@resnet20", "models/teachers/resnet20.safetensors",
                "metrics/teachers/resnet20.json", "checkpoints/teachers/resnet20.pt"),
    "student": ("distill", "models/student/distill.safetensors", "metrics/student/distill.json",
                "checkpoints/student/distill.pt"),
}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    overrides = {
        "teachers": {"resnet20": {"epochs": 4, "batch_size": 16, "lr": 0.05, "eval_batch_size": 64}},
        "distill.kd_teacher": "resnet20",
        "distill.recipe.epochs": 4,
        "data.train_per_class": 12,
        "tracking.enabled": False,
    }
    repo = make_repo(tmp_path_factory.mktemp("rel") / "repo", overrides=overrides, synthetic=True)
    run(repo, "dvc", "repro", "distill")
    return repo


def _outputs(repo: Path, which: str) -> tuple[str, dict]:
    _, weights, metrics, _ = STAGES[which]
    data = json.loads((repo / metrics).read_text())
    return sha256_file(repo / weights), {k: v for k, v in data.items() if k not in TIMING_KEYS}


def _fresh_run(repo: Path, which: str) -> None:
    stage, _, _, checkpoint = STAGES[which]
    (repo / checkpoint).unlink(missing_ok=True)
    run(repo, "dvc", "repro", "-f", "-s", stage)


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_same_params_and_seed_give_bit_identical_weights_and_metrics(repo, which):
    first = _outputs(repo, which)
    _fresh_run(repo, which)
    assert _outputs(repo, which) == first


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_sigkill_then_dvc_repro_resumes_and_matches_an_uninterrupted_run(repo, which):
    stage, weights, _, checkpoint = STAGES[which]
    reference = _outputs(repo, which)
    (repo / checkpoint).unlink(missing_ok=True)
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=repo, env=repo_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            path = repo / checkpoint
            if path.exists() and safe_torch_load(path)["epoch"] >= 2:
                break
            assert proc.poll() is None, "the stage finished before it could be killed"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    killed_at = safe_torch_load(repo / checkpoint)["epoch"]
    assert 2 <= killed_at < 4
    assert not (repo / weights).exists()  # nothing half-written that a later stage could load
    # -f: plain `dvc repro` would check out the reference run's identical outputs from the DVC cache
    # (this repo already produced them); a first run that was killed has nothing to restore and
    # runs the command, which resumes the same way.
    resumed = run(repo, "dvc", "repro", "-f", "-s", stage)
    assert "resuming from checkpoints" in resumed.stdout + resumed.stderr
    assert f"after epoch {killed_at}" in resumed.stdout + resumed.stderr
    assert _outputs(repo, which) == reference


def _locked_outs(repo: Path, stage: str) -> dict[str, str]:
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]
    return {out["path"]: out["md5"] for out in lock["outs"]}


def test_tracked_reruns_of_a_student_give_the_same_dvc_lock_hashes(repo, tmp_path):
    """With tracking on (offline runs: each rerun is a new run with its own id), the student's
    weights and weight histograms keep their bytes, so dvc.lock keeps their hashes. (Its metrics
    and per-epoch plot hold the declared wall-clock fields, TIMING_KEYS: only those differ.)"""
    env = repo_env(MATEKD_TRACKING="offline", MATEKD_OFFLINE_DIR=str(tmp_path / "offline"))
    hashes, metrics = [], []
    for _ in range(2):
        (repo / STAGES["student"][3]).unlink(missing_ok=True)
        run(repo, "dvc", "repro", "-f", "-s", "distill", env=env)
        hashes.append({path: md5 for path, md5 in _locked_outs(repo, "distill").items()
                       if path in ("models/student/distill.safetensors", "plots/student/distill-weights.json")})
        metrics.append(_outputs(repo, "student")[1])
    assert hashes[0] == hashes[1] and len(hashes[0]) == 2
    assert metrics[0] == metrics[1]
    assert len(list((tmp_path / "offline").iterdir())) == 2   # two runs, two ids
