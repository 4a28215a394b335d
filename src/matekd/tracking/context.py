"""The tags a run starts with: MLflow's source/user/git tags, our provenance, DVC's experiment
and the process that owns the run (so that a run left RUNNING by a killed process can be told
from one that is still alive)."""

from __future__ import annotations

import functools
import getpass
import importlib.metadata
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ._base import optional_module
from .roots import workspace_root

# Environment variables DVC sets for a stage command (dvc.env; DVC_EXP_* only under `dvc exp run`).
DVC_ENV_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev",
                "DVC_STAGE": "dvc.stage"}
HOST_TAG, PID_TAG, PID_START_TAG = "matekd.host", "matekd.pid", "matekd.pid_start"
STALE_TAG = "matekd.closed_as_stale"  # on a run closed as FAILED because its process had died


def _git(root: Path, *args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(root: Path | None = None) -> dict[str, str]:
    """Commit and dirty flag of the workspace; 'unknown' outside git."""
    root = workspace_root() if root is None else root
    unknown = {"git_commit": "unknown", "git_dirty": "unknown"}
    head = _git(root, "rev-parse", "HEAD")
    if head is None or head.returncode != 0 or not head.stdout.strip():
        return unknown  # not a repository, no commit yet, or no git
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
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
    """Commit, branch and remote URL, by MLflow's own helpers (GitPython) when mlflow is
    installed, else by the git command line."""
    git_utils = optional_module("mlflow.utils.git_utils")
    if git_utils is not None:
        return {"mlflow.source.git.commit": git_utils.get_git_commit(str(root)),
                "mlflow.source.git.branch": git_utils.get_git_branch(str(root)),
                "mlflow.source.git.repoURL": git_utils.get_git_repo_url(str(root))}
    branch = _git(root, "symbolic-ref", "--short", "-q", "HEAD")
    remotes = _git(root, "remote")
    url = None
    if remotes is not None and remotes.returncode == 0 and remotes.stdout.split():
        got = _git(root, "remote", "get-url", remotes.stdout.split()[0])
        url = _strip_credentials(got.stdout.strip()) if got is not None and got.returncode == 0 else None
    name = branch.stdout.strip() if branch is not None and branch.returncode == 0 else ""
    return {"mlflow.source.git.commit": None,  # filled from git_state by the caller
            "mlflow.source.git.branch": name or None, "mlflow.source.git.repoURL": url}


def source_tags(stage: str, root: Path, git: dict[str, str]) -> dict[str, str]:
    """MLflow's system tags: user and source type from MLflow's run-context providers
    (`mlflow.tracking.context.registry.resolve_tags`, which also honours MLFLOW_RUN_CONTEXT and
    plugin providers), source name `matekd <stage>`, and the git commit/branch/URL/dirty flag of
    the workspace. MLflow's own git provider is left out: it looks at sys.argv[0] (the console
    script inside .venv, or pytest), not at the checkout that runs."""
    git_context = optional_module("mlflow.tracking.context.git_context")
    registry = optional_module("mlflow.tracking.context.registry")
    if git_context is None or registry is None:  # offline on a machine without mlflow: the same tags by hand
        try:
            user = getpass.getuser()
        except Exception:
            user = "unknown"
        tags: dict[str, Any] = {"mlflow.user": user, "mlflow.source.type": "LOCAL"}
    else:
        tags = dict(registry.resolve_tags(ignore=[git_context.GitRunContext]))
    tags["mlflow.source.name"] = f"matekd {stage}"
    tags.update({key: value for key, value in _git_source(root).items() if value})
    if "mlflow.source.git.commit" not in tags and git.get("git_commit", "unknown") != "unknown":
        tags["mlflow.source.git.commit"] = git["git_commit"]
    if git.get("git_dirty", "unknown") != "unknown":
        tags["mlflow.source.git.dirty"] = git["git_dirty"]
    return {key: str(value) for key, value in tags.items()}


def dvc_tags() -> dict[str, str]:
    """The DVC experiment name, its baseline commit and the stage, when DVC runs us."""
    return {tag: os.environ[var] for var, tag in DVC_ENV_TAGS.items() if os.environ.get(var)}


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), None when unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    fields = _proc_stat(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def process_identity() -> dict[str, str]:
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    start = process_start(os.getpid())
    if start:
        tags[PID_START_TAG] = start
    return tags


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` (started at `start` ticks, when known) still runs on this host.
    A zombie counts as dead; a pid now owned by a later process counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, owned by another user
    except OSError:
        return True  # cannot tell: never touch it
    fields = _proc_stat(pid)
    if fields is None:
        return True
    if fields and fields[0] == "Z":
        return False
    return not (start and len(fields) > 19 and fields[19] != start)


def _local_owner(tags: dict[str, Any]) -> tuple[int, str | None] | None:
    """(pid, start ticks) of the process the tags name when it is one of this host, else None."""
    if tags.get(HOST_TAG) != socket.gethostname():
        return None  # another machine: we cannot know
    pid = str(tags.get(PID_TAG, ""))
    return (int(pid), tags.get(PID_START_TAG)) if pid.isdigit() else None


def owned_by_dead_process(tags: dict[str, Any]) -> bool:
    """True when the tags name this host and a process of it that no longer runs."""
    owner = _local_owner(tags)
    return owner is not None and not pid_alive(*owner)


def owned_by_live_process(tags: dict[str, Any]) -> bool:
    """True when the tags name this host and a process of it that still runs."""
    owner = _local_owner(tags)
    return owner is not None and pid_alive(*owner)


def stale_note(tags: dict[str, Any], stage: str) -> str:
    """The STALE_TAG value of a run of `stage` that a dead process left RUNNING."""
    return (f"process {tags.get(PID_TAG)} on {tags.get(HOST_TAG)} ended without closing the run (killed?); "
            f"closed as FAILED by pid {os.getpid()} at the next start of stage {stage}")


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


SOURCE_DIGEST_TAG, SOURCE_DIR_TAG = "matekd.source_sha256", "matekd.source_dir"


def source_provenance() -> dict[str, str]:
    """The sha256 of the matekd package source that runs (storage.source_digest) and its folder.
    The git tags describe the workspace, which is not always the code that runs: an editable
    install inside a DVC experiment executor imports the original checkout's src/."""
    import matekd

    from ..storage import source_digest

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
