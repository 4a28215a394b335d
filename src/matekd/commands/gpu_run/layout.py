"""Where `matekd gpu-run` keeps things: the checkout, its default folders, the run's own files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

SOURCE_ROOT = Path(__file__).resolve().parents[3]      # src/ (put on the stages' PYTHONPATH)
REPO_ROOT = SOURCE_ROOT.parent
DEFAULT_PROFILE = "profiles/budget.yaml"
DEFAULT_PAPER_PROFILE = "profiles/paper.yaml"
DEFAULT_WORK = ".gpu-run/work"
DEFAULT_OUTPUT = ".gpu-run/out"
WORK_MARKER = ".matekd-gpu-run"       # a work folder with this file is the runner's own to clear
RECORD = "gpu-run"                    # the run's own files inside the packs: logs, timings, params
TIMINGS, RESULTS, MANIFEST = "timings.json", "results.txt", "MANIFEST.txt"
LOOSE_FILES = (TIMINGS, RESULTS, MANIFEST)               # beside the packs in OUTPUT_DIR


def find_path(path: str | os.PathLike) -> Path:
    """A path as given, else relative to the project checkout (profiles/ when run elsewhere)."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    beside = REPO_ROOT / given
    return beside if beside.exists() else given


def read_json_or_none(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable: a run, perhaps cut short,
    leaves what it got to, and the measurements and the table are made of what is there."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
