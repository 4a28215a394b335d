"""What ran where: Python, packages, GPU and code, kept as the run's environment.json; and the
GPUs' compute mode and free memory, checked before anything runs.

The GPU is asked of nvidia-smi, not torch.cuda (mem_get_info would open a CUDA context): the
runner process never opens one, since the stages, its subprocesses, need the GPU's memory, and
in an exclusive compute mode the runner's own context would lock them out of the GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
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


GPU_QUERY = ("nvidia-smi", "--query-gpu=index,name,compute_mode,memory.free,memory.total",
             "--format=csv,noheader,nounits")
EXCLUSIVE_MODES = ("Exclusive_Process", "Exclusive_Thread")


@dataclass(frozen=True)
class GpuState:
    """One GPU as nvidia-smi reports it (memory in MiB; None where it printed no number)."""

    index: str
    name: str
    compute_mode: str
    free_mib: int | None
    total_mib: int | None

    def line(self) -> str:
        memory = (f"{self.free_mib:,} MiB free of {self.total_mib:,} MiB"
                  if self.free_mib is not None and self.total_mib is not None else "free memory unknown")
        return f"GPU {self.index} ({self.name}): compute mode {self.compute_mode}, {memory}"


def _mib_or_none(text: str) -> int | None:
    try:
        return int(float(text))
    except ValueError:      # "[N/A]", "[Not Supported]"
        return None


def parse_gpu_states(text: str) -> list[GpuState]:
    """The GPUs in nvidia-smi's answer to GPU_QUERY (csv, no header, no units)."""
    states = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            continue        # a warning line, or an empty one
        index, name, mode, free, total = fields
        states.append(GpuState(index, name, mode, _mib_or_none(free), _mib_or_none(total)))
    return states


def gpu_states() -> list[GpuState] | None:
    """Every GPU's compute mode and free memory; None when nvidia-smi cannot run."""
    answer = command_output(GPU_QUERY)
    return None if answer is None else parse_gpu_states(answer)


def git_commit() -> str | None:
    """The checkout's commit, marked when src/ or profiles/ differ from it; None without git."""
    if not (REPO_ROOT / ".git").exists():
        return None
    head = command_output(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"])
    dirty = command_output(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "src", "profiles"])
    if head is None or dirty is None:
        return None
    return head.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def environment_record(params: Any, gpus: Sequence[GpuState] | None = None) -> dict[str, Any]:
    """Python, packages, GPU, CPUs, code (the commit and storage.source_digest, the digest the
    tracked runs carry as their `matekd.source_sha256` tag) and the params' digest."""
    from ...storage import source_digest

    return {"python": sys.version.split()[0], "packages": package_versions(),
            "gpu": "none" if params.device == "cpu" else gpu_description(), "cpu_count": os.cpu_count(),
            "git_commit": git_commit() or "unknown (no git checkout: a copied working tree)",
            "source_sha256": source_digest(), "params_sha256": params.digest(),
            "gpu_state": [vars(g) for g in gpus or ()]}
