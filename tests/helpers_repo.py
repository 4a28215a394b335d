"""A throw-away copy of the project (git + DVC) with its own params, for pipeline tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from helpers_data import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPIED = ["src", "dvc.yaml", "profiles", "pyproject.toml", ".dvcignore", ".gitignore", "tuning"]


def repo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["MATEKD_TRACKING"] = "on"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "2"
    env.update(extra)
    return env


def run(repo: Path, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=repo, env=env or repo_env(), capture_output=True, text=True,
                          timeout=1800)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for part in parents:
        node = node[part]
    node[last] = value


def make_repo(repo: Path, profile: str = "tiny", overrides: dict[str, Any] | None = None,
              synthetic: bool = False) -> Path:
    """Copy the project into `repo`, write params (profile + overrides), fetch data, commit."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, repo / name)
    params = yaml.safe_load((ROOT / "profiles" / f"{profile}.yaml").read_text())
    for key, value in (overrides or {}).items():
        set_dotted(params, key, value)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    archive = os.environ.get("MATEKD_CIFAR10")
    if synthetic or not archive or not Path(archive).exists():
        archive = str(repo.parent / f"{repo.name}-synthetic.tar.gz")
        write_image_folder(archive, train_per_class=24, test_per_class=4)
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.invalid")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "init", "-q")
    run(repo, "matekd", "fetch", archive)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline under test")
    return repo
