"""What ran where: Python, packages, GPU and code, kept as the run's environment.json.

The GPU is asked of nvidia-smi, so the runner process never opens a CUDA context (the stages,
its subprocesses, need the GPU's memory)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from .layout import REPO_ROOT

PACKAGES = ("torch", "numpy", "pydantic", "scipy", "pillow", "matplotlib", "safetensors")


def command_output(command: Sequence[str]) -> str | None:
    """The standard output of `command`, or None when it cannot run (not installed, hung)."""
    try:
        return subprocess.run(list(command), capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str]:
    import importlib.metadata  # here: slow to import, and only a run needs it

    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def gpu_description() -> str:
    """Name, memory and driver of every GPU, `none`, or why nvidia-smi could not say."""
    query = command_output(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    if query is None:
        return "nvidia-smi not available"
    return "; ".join(line.strip() for line in query.splitlines() if line.strip()) or "none"


def git_commit() -> str | None:
    """The checkout's commit, marked when src/ or profiles/ differ from it; None without git."""
    if not (REPO_ROOT / ".git").exists():
        return None
    head = command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src", "profiles"])
    if head is None or dirty is None:
        return None
    return head.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def environment_record(params: Any) -> dict[str, Any]:
    """Python, packages, GPU, CPUs, code (the commit and storage.source_digest, the digest the
    tracked runs carry as their `matekd.source_sha256` tag) and the params' digest."""
    from ...storage import source_digest

    return {"python": sys.version.split()[0], "packages": package_versions(),
            "gpu": "none" if params.device == "cpu" else gpu_description(), "cpu_count": os.cpu_count(),
            "git_commit": git_commit() or "unknown (no git checkout: a copied working tree)",
            "source_sha256": source_digest(), "params_sha256": params.digest()}
