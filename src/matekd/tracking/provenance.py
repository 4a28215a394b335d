"""Which tracked run wrote an output file, kept out of the file itself.

A DVC output's bytes must depend only on what it holds and the code, params and data that made
it: a run id (or any per-run value) inside a weights file would give two identical trainings
different files, different DVC hashes and a `dvc.lock` that changes for nothing. So the link from
a file to its run lives in two places that are not DVC outputs:

- the run carries the tag `matekd.output.<name>.sha256` with the file's sha256 (so MLflow can say
  which run produced a file: search `tags."matekd.output.<name>.sha256" = '<hash>'`);
- a small index `<store root>/mlruns/provenance/<sha256>.json` maps the file's hash to the run
  (online MLflow id or offline id, and the mode), for a later stage on this checkout (evaluate
  links its per-model runs to the training run). Several runs that wrote the same bytes share
  one entry: the latest one wins, each of them made exactly that file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..storage import sha256_file, write_json
from ._base import NullRun
from .roots import default_store_dir

OUTPUT_TAG = "matekd.output.{name}.sha256"


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


__all__ = ["OUTPUT_TAG", "producing_run", "provenance_dir", "record_output", "run_for_digest"]
