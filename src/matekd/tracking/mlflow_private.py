"""Every use of MLflow that is not its public API, in one place, each with the reason it is
needed; tests/test_mlflow_private.py exercises each against the installed mlflow, so an upgrade
that moves one fails there, by name. mlflow is imported inside each function (tried once per
process where it is missing): `import matekd.tracking` works without it."""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import sqlite3
from pathlib import Path
from types import ModuleType
from typing import Any

from ..errors import TrackingError
from .interface import OFF_SWITCH
from .roots import default_store_dir, sqlite_path, uri_to_path

log = logging.getLogger("matekd.tracking")


@functools.cache
def optional_module(name: str) -> ModuleType | None:
    """Module `name` of mlflow, or None where it is not installed (the GPU machine). Tried once
    per process: Python does not remember a failed import, and the callers run for every logged
    key."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------------
# validation of keys


def mlflow_name_problem(kind: str, name: str) -> str | None:
    """Why MLflow's own validator refuses `name` as a `kind` ("metric", "param", "tag") key, None
    when it accepts it. Raises ImportError without mlflow (the caller falls back to its rules).
    Private: `mlflow.utils.validation._validate_*_name`; MLflow has no public validator (its
    client validates inside each logging call), and the offline tracker must refuse a key when
    it is logged, not at sync, hours later."""
    validation = optional_module("mlflow.utils.validation")
    if validation is None:
        raise ImportError("mlflow is not installed")
    check = {"metric": validation._validate_metric_name, "param": validation._validate_param_name,
             "tag": validation._validate_tag_name}[kind]
    try:
        check(name)
    except optional_module("mlflow.exceptions").MlflowException as exc:
        return f"{kind} key {name!r}: {exc.message}"
    return None


# ---------------------------------------------------------------------------------------------
# run-context tags


def context_tags() -> dict[str, str]:
    """The tags MLflow's run-context providers give a new run (user, source type,
    MLFLOW_RUN_CONTEXT, plugin providers), without its git provider (which looks at sys.argv[0],
    the console script, not at the checkout that runs). Raises ImportError without mlflow.
    Private: `mlflow.tracking.context.registry.resolve_tags`, what `mlflow.start_run` adds;
    `MlflowClient.create_run` adds none, and offline runs need them recorded."""
    registry = optional_module("mlflow.tracking.context.registry")
    git_context = optional_module("mlflow.tracking.context.git_context") if registry is not None else None
    if registry is None or git_context is None:
        raise ImportError("mlflow is not installed")
    return {key: str(value) for key, value in registry.resolve_tags(ignore=[git_context.GitRunContext]).items()}


# ---------------------------------------------------------------------------------------------
# permanent deletion (sync roll-back): the runs and models a failed sync created are deleted for
# good, as `mlflow gc` does (a soft-deleted run keeps its offline-id tag, and a deleted model
# version's name stays taken); the public client only soft-deletes


def hard_delete_store(client: Any) -> Any | None:
    """The client's store when it can delete runs and logged models permanently (SQL stores),
    else None."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    return store if hasattr(store, "_hard_delete_run") else None


def hard_delete_run(store: Any, run_id: str) -> None:
    """Remove a (soft-deleted) run's rows for good: what `mlflow gc --run-ids` does
    (private: `store._hard_delete_run`)."""
    store._hard_delete_run(run_id)


def hard_delete_logged_model(store: Any, model_id: str) -> bool:
    """Remove a logged model's rows for good (what `mlflow gc` does); False when this store
    cannot (the caller soft-deletes it then)."""
    if not hasattr(store, "_hard_delete_logged_model"):
        return False
    store._hard_delete_logged_model(model_id)
    return True


def delete_artifacts(location: str) -> None:
    """Delete everything under an artifact location (a run's or a logged model's), as `mlflow gc`
    does; no public call deletes artifacts (private: `get_artifact_repository`)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    get_artifact_repository(location).delete_artifacts()


# ---------------------------------------------------------------------------------------------
# raw SQL on MLflow's tables: a copied or moved default store (MLflow has no API to change an
# experiment's, run's or logged model's artifact location)

_ARTIFACT_LOCATION_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                              ("logged_models", "artifact_location"))


def _old_store_dirs(locations: list[str], here: Path) -> set[Path]:
    """Other `<X>/mlruns` folders that experiments keep their artifacts in (`<X>/mlruns/artifacts`,
    the layout matekd creates), which are not this store's folder."""
    found = set()
    for location in locations:
        path = uri_to_path(location or "")
        if path is None or path.name != "artifacts" or path.parent.name != here.name:
            continue
        old = path.parent
        if old == here:
            continue
        with contextlib.suppress(OSError):
            if (old / "mlflow.db").exists() and os.path.samefile(old / "mlflow.db", here / "mlflow.db"):
                continue  # the same store under another name (a symlink)
        found.add(old)
    return found


def relocate_store(uri: str) -> int:
    """Make a copied or moved checkout's default store log into its own `mlruns/`.

    MLflow records absolute artifact locations (experiments.artifact_location, runs.artifact_uri,
    logged_models.artifact_location). A checkout copied or moved together with its mlruns/ would
    silently write new artifacts into the old checkout's folder and show the old ones from
    there. MLflow has no API to change an experiment's artifact location, so this rewrites the
    prefix `<old>/mlruns/` to `<this repo>/mlruns/` (file URI and plain path forms) in those
    columns, in one SQLite transaction. Only the default store is touched and only locations of
    the `<X>/mlruns/artifacts` layout that is not this store's. Returns the rows changed."""
    database = sqlite_path(uri)
    if database is None or not database.exists():
        return 0
    here = database.parent.resolve()
    if here != default_store_dir().resolve():
        return 0
    try:
        con = sqlite3.connect(str(database), timeout=60, isolation_level=None)
    except sqlite3.Error:
        return 0
    changed = 0
    try:
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "experiments" not in tables:
            return 0
        locations = [row[0] for row in con.execute("SELECT artifact_location FROM experiments")]
        if not _old_store_dirs(locations, here):
            return 0
        con.execute("BEGIN IMMEDIATE")
        try:
            old_dirs = _old_store_dirs([row[0] for row in con.execute("SELECT artifact_location FROM experiments")],
                                       here)  # again, under the write lock: another process may have done it
            for old in sorted(old_dirs):
                for old_prefix, new_prefix in ((old.as_uri() + "/", here.as_uri() + "/"),
                                               (f"{old}/", f"{here}/")):
                    for table, column in _ARTIFACT_LOCATION_COLUMNS:
                        if table not in tables:
                            continue
                        cursor = con.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE substr({column}, 1, ?) = ?",
                            (new_prefix, len(old_prefix) + 1, len(old_prefix), old_prefix))
                        changed += cursor.rowcount
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        if changed:
            log.warning("matekd: this MLflow store was copied or moved from %s; %d artifact locations now "
                        "point into %s", ", ".join(map(str, sorted(old_dirs))), changed, here)
    except sqlite3.Error as exc:
        raise TrackingError(f"cannot relocate the MLflow store {database} to this checkout ({exc}); "
                            f"run with {OFF_SWITCH}") from exc
    finally:
        con.close()
    return changed


__all__ = ["context_tags", "delete_artifacts", "hard_delete_logged_model", "hard_delete_run", "hard_delete_store",
           "mlflow_name_problem", "optional_module", "relocate_store"]
