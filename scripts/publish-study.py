"""Copy a finished study's report into the repository, with its provenance and stage wall times.

    python scripts/publish-study.py ../cpu-study reports/cpu

Refuses a study whose pipeline is not complete (`dvc status` must be clean), so a published
table always comes from every stage finished at one commit. Writes into OUT: results.md,
results.csv, figures/, plots/ (the study's `reports/`), stage_times.csv (one row per tracked
run: stage, run name, start, end, wall seconds, from the study's MLflow store) and
provenance.md (commit, params digest, machine, dates).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path


def run(cwd: Path, *cmd: str) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def last_sign_of_life(client, run) -> int | None:
    """The time (ms) of a run's last logged metric: where an interrupted run really stopped. Its
    recorded end is when the next attempt marked it failed, which can be a session later."""
    times = [m.timestamp for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)]
    return max(times, default=None)


def stage_times(study: Path) -> list[dict]:
    """One row per tracked run, oldest first. wall_seconds: start to end for a finished run; for
    an interrupted one (killed, failed, still marked running) start to its last logged metric,
    so the time between sessions is not counted (its stage resumed from a checkpoint)."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    # A client bound to the study's store, not mlflow.set_tracking_uri: that would repoint (and
    # export) the process's tracking URI for whatever runs after us, tests included.
    client = MlflowClient(f"sqlite:///{study / 'mlruns' / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs, token = [], None
    while True:
        page = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1_000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    rows = []
    for r in runs:
        start, end = r.info.start_time, r.info.end_time
        if r.info.status != "FINISHED":
            end = last_sign_of_life(client, r) or start
        rows.append({"stage": r.data.tags.get("stage", ""), "run": r.info.run_name, "status": r.info.status,
                     "start_utc": datetime.fromtimestamp(start / 1000, UTC).isoformat(timespec="seconds"),
                     "end_utc": datetime.fromtimestamp(end / 1000, UTC).isoformat(timespec="seconds") if end else "",
                     "wall_seconds": round((end - start) / 1000, 1) if end else ""})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path, help="the study's worktree (ran `dvc repro` to the end)")
    parser.add_argument("out", type=Path, help="where to publish, e.g. reports/cpu")
    args = parser.parse_args()
    study = args.study.resolve()
    status = run(study, "dvc", "status")
    if "up to date" not in status:
        print(f"{study}: the pipeline is not complete (dvc status):\n{status}", file=sys.stderr)
        return 1
    if not (study / "reports" / "results.md").exists():
        print(f"{study}: no reports/results.md", file=sys.stderr)
        return 1
    out = args.out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("results.md", "results.csv"):
        shutil.copy2(study / "reports" / name, tmp / name)
    for folder in ("figures", "plots"):
        if (study / "reports" / folder).exists():
            shutil.copytree(study / "reports" / folder, tmp / folder)
    rows = stage_times(study)
    with open(tmp / "stage_times.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["stage"])
        writer.writeheader()
        writer.writerows(rows)
    import torch

    commit = run(study, "git", "rev-parse", "HEAD")
    dirty = run(study, "git", "status", "--porcelain", "--untracked-files=no")
    first = rows[0]["start_utc"] if rows else "?"
    last = max((r["end_utc"] for r in rows if r["end_utc"]), default="?")
    total = sum(r["wall_seconds"] for r in rows if r["wall_seconds"] != "")
    (tmp / "provenance.md").write_text(
        f"# Provenance\n\n"
        f"- commit: `{commit}`{' (with uncommitted changes!)' if dirty else ''} (`git log {commit[:7]}`)\n"
        f"- params: `params.yaml` of that commit (`dvc.lock` pins every stage's inputs)\n"
        f"- machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"Python {platform.python_version()}\n"
        f"- ran: {first} to {last} (UTC), across sessions; tracked runs' wall time added up: "
        f"{total / 3600:.2f} h (interrupted runs up to their last logged metric; untracked work such "
        f"as `prepare`, method_inputs and process start-ups not included)\n"
        f"- per-stage wall times: `stage_times.csv` (from the study's MLflow runs)\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"published {study} at {commit[:7]} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
