"""A throw-away copy of the project (git + DVC) with its own params, for pipeline tests."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from helpers_data import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPIED = ["src", "dvc.yaml", "profiles", "pyproject.toml", ".dvcignore", ".gitignore", "tuning"]
DVC_FILES = ["config", "plots"]   # .dvc/ files the project commits (config, plot templates)
IGNORED = shutil.ignore_patterns("__pycache__", "*.egg-info", "optuna.db*", "*.log")


def repo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["MATEKD_TRACKING"] = "on"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "2"
    env.update(extra)
    return env


def run(repo: Path, *cmd: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=repo, env=env or repo_env(), capture_output=True, text=True, check=False,
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


def write_params(path: Path, profile: Path, overrides: dict[str, Any] | None = None) -> None:
    """The profile with `overrides` applied, round-trip: its comments and flow mappings stay, as
    in a user's params.yaml (the experiment tests check what `dvc exp run -S` does to them)."""
    rt = YAML()
    params = rt.load(profile.read_text())
    for key, value in (overrides or {}).items():
        set_dotted(params, key, value)
    with path.open("w") as fh:
        rt.dump(params, fh)


def make_repo(repo: Path, profile: str = "tiny", overrides: dict[str, Any] | None = None,
              synthetic: bool = False) -> Path:
    """Copy the project into `repo`, write params (profile + overrides), fetch data, commit."""
    repo.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, repo / name, ignore=IGNORED)
        elif src.exists():
            shutil.copy2(src, repo / name)
    write_params(repo / "params.yaml", ROOT / "profiles" / f"{profile}.yaml", overrides)
    tuned = repo / "tuning" / "best"
    if not tuned.is_dir():   # a dep of method_inputs@*: committed in the project, with its README
        tuned.mkdir(parents=True)
        (tuned / "README.md").write_text("Tuned values per method (`matekd tune`).\n")
    archive = os.environ.get("MATEKD_CIFAR10")
    if synthetic or not archive or not Path(archive).exists():
        archive = str(repo.parent / f"{repo.name}-synthetic.tar.gz")
        write_image_folder(archive, train_per_class=24, test_per_class=4)
    run(repo, "git", "init", "-q")
    run(repo, "git", "config", "user.email", "ci@example.invalid")
    run(repo, "git", "config", "user.name", "ci")
    run(repo, "dvc", "init", "-q")
    for name in DVC_FILES:
        src = ROOT / ".dvc" / name
        if src.is_dir():
            shutil.copytree(src, repo / ".dvc" / name, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, repo / ".dvc" / name)
    run(repo, "matekd", "fetch", archive)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "pipeline under test")
    return repo


def reproduced_repo(folder: Path) -> Path:
    """The project (tiny profile) after one `dvc repro`, everything committed; built once in
    `folder` (a pytest session's temp dir) and shared by the test modules. Tests that change
    it work on a `clone_repo` copy. `folder/repro.log` holds the repro's output."""
    repo = folder / "repo"
    done = folder / "reproduced"
    if not done.exists():
        if folder.exists():
            shutil.rmtree(folder)
        make_repo(repo)
        proc = run(repo, "dvc", "repro", check=False)
        (folder / "repro.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise AssertionError(f"dvc repro failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        run(repo, "git", "add", "-A")
        run(repo, "git", "commit", "-qm", "dvc repro")
        done.touch()
    return repo


def clone_repo(repo: Path, target: Path) -> Path:
    """A full copy (git history, DVC cache and outputs) that a test may change freely."""
    scratch = repo / ".dvc" / "tmp"   # DVC's locks and experiment workspaces stay behind
    shutil.copytree(repo, target, symlinks=True,
                    ignore=lambda folder, names: ["tmp"] if Path(folder) == scratch.parent else [])
    return target


def stages_run(output: str) -> list[str]:
    """Names of the stages DVC ran (not skipped or restored) according to its output."""
    return re.findall(r"Running stage '([^']+)'", output)
