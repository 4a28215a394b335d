"""scripts/publish-study.py's stage wall times: an interrupted run counts up to its last logged
metric, not up to when the next session marked it failed (the study's runs span sessions)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "publish-study.py"


def _publish_module():
    spec = importlib.util.spec_from_file_location("publish_study", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interrupted_runs_count_until_their_last_metric_and_finished_runs_until_their_end(tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "mlruns").mkdir()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.create_experiment("study")
    t0 = 1_800_000_000_000  # ms
    # killed at t0 + 600 s, its end written by the next session three hours later
    cut = client.create_run(experiment, start_time=t0, tags={"stage": "train_teacher"}, run_name="teacher a")
    client.log_metric(cut.info.run_id, "step/loss", 2.0, timestamp=t0 + 300_000, step=1)
    client.log_metric(cut.info.run_id, "val_acc", 0.5, timestamp=t0 + 600_000, step=0)
    client.set_terminated(cut.info.run_id, "FAILED", end_time=t0 + 3 * 3_600_000)
    # the resumed attempt, finished after 100 s
    later = t0 + 3 * 3_600_000
    done = client.create_run(experiment, start_time=later, tags={"stage": "train_teacher"}, run_name="teacher a")
    client.log_metric(done.info.run_id, "val_acc", 0.6, timestamp=later + 50_000, step=1)
    client.set_terminated(done.info.run_id, "FINISHED", end_time=later + 100_000)
    # started and cut before it logged anything: no time counted
    silent = client.create_run(experiment, start_time=later + 200_000, tags={"stage": "cache"}, run_name="cache a")
    client.set_terminated(silent.info.run_id, "KILLED", end_time=later + 900_000)

    import mlflow

    uri_before, env_before = mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")
    rows = _publish_module().stage_times(tmp_path)
    # read through its own client: the process's tracking URI (which later tests rely on) is untouched
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == (uri_before, env_before)

    assert [(r["run"], r["status"], r["wall_seconds"]) for r in rows] == [
        ("teacher a", "FAILED", 600.0), ("teacher a", "FINISHED", 100.0), ("cache a", "KILLED", 0.0)]
    assert rows[0]["end_utc"] == "2027-01-15T08:10:00+00:00"
