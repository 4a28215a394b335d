"""Where a run and its outputs come from: the tags a run starts with (MLflow's source and git
tags, the matekd source digest, DVC's experiment, the owning process), and the index from an
output file's sha256 to the run that wrote it, kept out of the file itself (a run id inside a
DVC output would give two identical trainings different hashes)."""

from __future__ import annotations

import functools
import getpass
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..storage import sha256_file, source_digest, write_json
from .interface import NullRun
from .lifecycle import process_identity
from .roots import default_store_dir, workspace_root

# Environment variables DVC sets for a stage command (dvc.env; DVC_EXP_* only under `dvc exp run`).
DVC_ENV_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev",
                "DVC_STAGE": "dvc.stage"}
SOURCE_DIGEST_TAG, SOURCE_DIR_TAG = "matekd.source_sha256", "matekd.source_dir"
OUTPUT_TAG = "matekd.output.{name}.sha256"  # on the run that wrote output <name>: the file's sha256


# ---------------------------------------------------------------------------------------------
# the tags a run starts with


def _run_git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(root: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the workspace; 'unknown' outside git."""
    root = workspace_root() if root is None else root
    unknown = {"git_commit": "unknown", "git_dirty": "unknown"}
    head = _run_git(root, "rev-parse", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return unknown  # not a repository, no commit yet, or no git
    status = _run_git(root, "status", "--porcelain", "--untracked-files=no")
    dirty = str(bool(status.stdout.strip())).lower() if status is not None and status.returncode == 0 else "unknown"
    return {"git_commit": head.stdout.strip(), "git_dirty": dirty}


@functools.cache
def installed_packages() -> str:
    """pip-freeze style list of the installed distributions (read once per process: ~0.3 s, and
    a stage may open many runs: one per student, per evaluated model, per trial)."""
    names = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()
                    if d.metadata["Name"]}, key=str.lower)
    return "\n".join(names) + "\n"


def _strip_credentials(url: str) -> str:
    parsed = urlsplit(url)
    if not parsed.scheme or "@" not in parsed.netloc:
        return url
    return urlunsplit((parsed.scheme, parsed.netloc.rpartition("@")[2], parsed.path, parsed.query, parsed.fragment))


def _git_source(root: Path) -> dict[str, str | None]:
    """Branch and remote URL (credentials stripped) of the checkout, by the git command line; the
    commit comes from git_state. (MLflow's own helpers, `mlflow.utils.git_utils`, are not public.)"""
    branch = _run_git(root, "symbolic-ref", "--short", "-q", "HEAD")
    remotes = _run_git(root, "remote")
    url = None
    if remotes is not None and remotes.returncode == 0 and remotes.stdout.split():
        names = remotes.stdout.split()
        got = _run_git(root, "remote", "get-url", "origin" if "origin" in names else names[0])
        url = _strip_credentials(got.stdout.strip()) if got is not None and got.returncode == 0 else None
    name = branch.stdout.strip() if branch is not None and branch.returncode == 0 else ""
    return {"mlflow.source.git.branch": name or None, "mlflow.source.git.repoURL": url}


def source_tags(stage: str, root: Path, git: dict[str, str]) -> dict[str, str]:
    """MLflow's system tags: user and source type from MLflow's run-context providers
    (mlflow_private.context_tags, which also honours MLFLOW_RUN_CONTEXT and plugin providers),
    source name `matekd <stage>`, and the git commit/branch/URL/dirty flag of the workspace.
    MLflow's own git provider is left out: it looks at sys.argv[0] (the console script inside
    .venv, or pytest), not at the checkout that runs."""
    try:
        from .mlflow_private import context_tags

        tags: dict[str, Any] = context_tags()
    except ImportError:  # offline on a machine without mlflow: the same tags by hand
        try:
            user = getpass.getuser()
        except Exception:
            user = "unknown"
        tags = {"mlflow.user": user, "mlflow.source.type": "LOCAL"}
    tags["mlflow.source.name"] = f"matekd {stage}"
    tags.update({key: value for key, value in _git_source(root).items() if value})
    if git.get("git_commit", "unknown") != "unknown":
        tags["mlflow.source.git.commit"] = git["git_commit"]
    if git.get("git_dirty", "unknown") != "unknown":
        tags["mlflow.source.git.dirty"] = git["git_dirty"]
    return {key: str(value) for key, value in tags.items()}


def dvc_tags() -> dict[str, str]:
    """The DVC experiment name, its baseline commit and the stage, when DVC runs us."""
    return {tag: os.environ[var] for var, tag in DVC_ENV_TAGS.items() if os.environ.get(var)}


def torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "absent"


def command_line() -> str:
    argv = list(sys.argv) or ["?"]
    if Path(argv[0]).name == "matekd":
        argv[0] = "matekd"
    return shlex.join(argv)[:1000]


def source_provenance() -> dict[str, str]:
    """The sha256 of the matekd package source that runs (storage.source_digest) and its folder.
    The git tags describe the workspace, which is not always the code that runs: an editable
    install inside a DVC experiment executor imports the original checkout's src/."""
    import matekd

    return {SOURCE_DIGEST_TAG: source_digest(), SOURCE_DIR_TAG: str(Path(matekd.__file__).resolve().parent)}


def run_tags(stage: str, tags: dict[str, Any] | None = None) -> dict[str, str]:
    """Every tag a new run starts with; the caller's `tags` win."""
    root = workspace_root()
    git = git_state(root)
    all_tags: dict[str, Any] = {**source_tags(stage, root, git), "stage": stage, "torch_version": torch_version(),
                                "python": sys.version.split()[0], **git, **source_provenance(),
                                "matekd.command": command_line(),
                                **dvc_tags(), **process_identity(), **(tags or {})}
    return {key: str(value) for key, value in all_tags.items()}


# ---------------------------------------------------------------------------------------------
# which run wrote an output file: the run's tag OUTPUT_TAG, and `<store root>/mlruns/provenance/
# <sha256>.json` for later stages of this checkout (evaluate links its runs to the training run;
# several runs that wrote the same bytes share one entry, the latest wins)


def provenance_dir() -> Path:
    return default_store_dir() / "provenance"


def record_output(run: NullRun, name: str, path: str | os.PathLike, model_id: str | None = None) -> str | None:
    """Tag `run` with the sha256 of the output `path` (under `name`, e.g. "weights") and index it,
    with the id of the logged model that holds these weights when there is one (log_model's
    return value); returns the hash (None when the run is not tracked: nothing to link)."""
    if not run.active or not run.run_id:
        return None
    digest = sha256_file(path)
    run.set_tags({OUTPUT_TAG.format(name=name): digest})
    write_json(provenance_dir() / f"{digest}.json", {"run_id": run.run_id, "mode": run.mode, "name": name,
                                                     "path": str(path), "model_id": model_id})
    return digest


def producing_run(path: str | os.PathLike) -> dict[str, str] | None:
    """The index entry ({run_id, mode, name, path, model_id}) of the run that last wrote these
    exact bytes, None when no tracked run of this checkout did (tracking off, another machine,
    index removed)."""
    return run_for_digest(sha256_file(path))


def run_for_digest(digest: str) -> dict[str, str] | None:
    """producing_run for a file known by its sha256 (e.g. the one an evaluation recorded)."""
    entry = provenance_dir() / f"{digest}.json"
    try:
        return json.loads(entry.read_text())
    except (OSError, ValueError):
        return None


__all__ = ["OUTPUT_TAG", "git_state", "installed_packages", "producing_run", "provenance_dir", "record_output",
           "run_for_digest", "run_tags"]
