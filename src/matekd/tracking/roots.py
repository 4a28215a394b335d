"""Where tracking data goes: the store root, the workspace whose code runs, the MLflow store and
its artifact folder, the offline folder. A DVC experiment executor folder (a copy of the
repository under `<repo>/.dvc/tmp/exps/`) logs into `<repo>`'s store, with the copy's git
provenance."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from ..storage import ROOT_MARKERS, repo_root

DVC_EXECUTORS = (".dvc", "tmp", "exps")  # the folder under which DVC runs experiment executors
DEFAULT_OFFLINE_DIR = "mlruns-offline"


def split_exps(path: Path) -> tuple[Path, Path] | None:
    """(`<repo>`, `<repo>/.dvc/tmp/exps/<name>`) when `path` lies inside a DVC experiment
    executor folder (dvc.repo.experiments.utils.EXEC_TMP_DIR), else None. The outermost match
    wins. (For `dvc exp run --temp`, <name> is `standalone` and the executor one level deeper:
    workspace_root looks for the checkout's dvc.yaml.)"""
    parts = path.parts
    for i in range(len(parts) - len(DVC_EXECUTORS) - 1):
        if parts[i + 1:i + 1 + len(DVC_EXECUTORS)] == DVC_EXECUTORS:
            origin = Path(*parts[:i + 1])
            return origin, Path(*parts[:i + 2 + len(DVC_EXECUTORS)])
    return None


def store_root() -> Path:
    """The repository whose `mlruns/` (and offline folder) this process logs into:
    `storage.repo_root()` (DVC_ROOT, else the nearest folder with dvc.yaml or params.yaml),
    mapped out of a DVC experiment executor folder to the repository that queued it."""
    root = repo_root()
    inside = split_exps(root)
    return inside[0] if inside else root


def workspace_root() -> Path:
    """The checkout whose code and params run now (for git provenance). It differs from
    store_root() only inside a DVC experiment executor folder: DVC >= 3 sets DVC_ROOT to the
    queuing repository there, but the commit and changes that run are the executor's."""
    root = repo_root()
    if split_exps(root):
        return root
    here = Path.cwd().resolve()
    inside = split_exps(here)
    if inside and inside[0] == root:
        for folder in (here, *here.parents):
            if any((folder / marker).exists() for marker in ROOT_MARKERS):
                return folder
            if folder == inside[1]:
                break
        return inside[1]
    return root


def default_store_dir() -> Path:
    return store_root() / "mlruns"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else the SQLite store `<store root>/mlruns/mlflow.db` (absolute)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    store = default_store_dir()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def is_default_store(uri: str) -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI") and uri == f"sqlite:///{default_store_dir() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI (None for other stores and in-memory databases)."""
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        return Path(uri.removeprefix("sqlite:///").split("?", 1)[0])
    return None


def artifact_root(uri: str | None = None) -> str:
    """Artifact folder of a SQLite store: `artifacts/` beside its database file (so a store
    named by MLFLOW_TRACKING_URI keeps its artifacts with it), else `<store root>/mlruns/artifacts`."""
    database = sqlite_path(uri) if uri else None
    if database is not None:
        return (database.resolve().parent / "artifacts").as_uri()
    return (default_store_dir() / "artifacts").as_uri()


def uri_to_path(location: str) -> Path | None:
    """The local path of a `file:` URI or of a plain absolute path (None for remote locations)."""
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    if location.startswith("/"):
        return Path(location)
    return None


def offline_root(offline_dir: str | os.PathLike | None = None) -> Path:
    """The offline run folder: MATEKD_OFFLINE_DIR, else `tracking.offline_dir`, else
    `mlruns-offline`; a relative path is taken from the store root (the repository)."""
    raw = os.environ.get("MATEKD_OFFLINE_DIR") or offline_dir or DEFAULT_OFFLINE_DIR
    path = Path(raw).expanduser()
    return path if path.is_absolute() else store_root() / path
