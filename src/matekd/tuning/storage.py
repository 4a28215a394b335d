"""Where the studies live: `tune.storage` / `--storage` parsed into a StorageSpec, opened as
an Optuna storage.

- a SQLite file (`*.db`, `*.sqlite`, `*.sqlite3`, or a `sqlite:///` URL); the default,
  `tuning/optuna.db`, holds one study per method; one worker process only (check_workers);
- a journal file (`*.log`, `*.jsonl`, `*.journal`, or `journal:PATH`): append-only, safe for
  several local processes, no database;
- an RDB URL (`postgresql://user:password@host:port/db`, `mysql+pymysql://...`): several
  machines on one study. The password never appears in messages, tags or metrics.

RDB storages (SQLite included) run a heartbeat: a trial whose worker stopped beating for
GRACE_PERIOD_S is failed and retried once (matekd.tuning.recovery), also for workers on other
machines.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import optuna
from optuna.storages.journal import JournalFileBackend

from ..errors import MatekdError, ParamsError
from .recovery import retry_trial

HEARTBEAT_INTERVAL_S = 20
GRACE_PERIOD_S = 90
SQLITE_TIMEOUT_S = 60  # `matekd tune` runs, the dashboard or a sync may share one SQLite file: wait for its lock
JOURNAL_SUFFIXES = (".log", ".jsonl", ".journal")
SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


@dataclass(frozen=True)
class StorageSpec:
    kind: str     # sqlite | journal | rdb
    target: str   # SQLAlchemy URL (sqlite, rdb) or journal file path
    shown: str    # for messages, tags and summaries: the password masked

    def open(self) -> optuna.storages.BaseStorage:
        """The Optuna storage; RDB storages get a heartbeat so that killed trials become FAIL."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)   # the heartbeat
            if self.kind == "journal":
                Path(self.target).parent.mkdir(parents=True, exist_ok=True)
                return optuna.storages.JournalStorage(JournalFileBackend(self.target))
            return self._open_rdb()

    def _open_rdb(self) -> optuna.storages.RDBStorage:
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if self.kind == "sqlite" else {}
        # Optuna < 4.9 calls the stale-trial callback `failed_trial_callback`.
        callback = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                    else "failed_trial_callback")
        attempts = 5
        for attempt in range(attempts):
            try:
                return optuna.storages.RDBStorage(
                    self.target, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=GRACE_PERIOD_S, **{callback: retry_trial})
            except ImportError as exc:
                raise MatekdError(f"Optuna storage {self.shown} needs a database driver that is not installed "
                                  f"({exc.__cause__ or exc}); for PostgreSQL: pip install psycopg2-binary") from exc
            except Exception as exc:  # sqlalchemy errors: unreachable server, bad credentials
                if _lost_creation_race(exc) and attempt < attempts - 1:
                    time.sleep(0.2 * (attempt + 1))
                    continue
                first_line = str(exc).splitlines()[0] if str(exc) else ""
                raise MatekdError(f"cannot open Optuna storage {self.shown}: {type(exc).__name__}: "
                                  f"{first_line}") from exc
        raise AssertionError("unreachable")


def check_workers(spec: StorageSpec, workers: int) -> None:
    """Refuse several worker processes on a SQLite file: Optuna's documentation advises against
    SQLite for parallel optimisation (every write locks the whole file; concurrent workers end in
    "database is locked" errors and lost heartbeats). A journal file does the same job for
    processes of one machine, PostgreSQL for several machines."""
    if workers > 1 and spec.kind == "sqlite":
        journal = _shown_path(Path(spec.target.removeprefix("sqlite:///").split("?", 1)[0]).with_suffix(".log"))
        raise ParamsError(f"--workers {workers} on the SQLite file {spec.shown}: Optuna advises against SQLite for "
                          f"parallel workers. Use a journal file for processes on this machine (`matekd tune "
                          f"--workers {workers} --storage {journal}`, or tune.storage: {journal}) or PostgreSQL "
                          f"for several machines (--storage postgresql://user:password@host:5432/db)")


def _lost_creation_race(exc: Exception) -> bool:
    """Whether another process was creating this new database at the same moment: it made a
    table first ("already exists") or stamped the schema version first (a duplicate key in
    alembic_version). The loser opens the database again, now complete."""
    text = str(exc)
    return "already exists" in text or "alembic_version" in text


def mask_password(url: str) -> str:
    """The URL with its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def with_driver(url: str) -> str:
    """`postgresql://` through whichever driver is installed (SQLAlchemy 2.1 defaults to
    psycopg 3, 2.0 to psycopg2; matekd's `postgres` extra installs psycopg2-binary)."""
    scheme, rest = url.split("://", 1)
    if scheme.lower() not in ("postgresql", "postgres"):
        return url
    for module in ("psycopg2", "psycopg"):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{module}://{rest}"
    return f"postgresql://{rest}"


def _shown_path(path: Path) -> str:
    """A path as the user would write it: relative to the project folder when inside it."""
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def resolve_storage(text: str) -> StorageSpec:
    """Interpret `tune.storage` / `--storage` (see the module docstring). Relative paths are
    taken from the current folder (the project root)."""
    text = text.strip()
    if not text:
        raise ParamsError("tune.storage is empty; give a SQLite file, a journal file or a database URL")
    if text.startswith("journal:"):
        path = Path(text.removeprefix("journal:").removeprefix("//")).expanduser().resolve()
        return StorageSpec("journal", str(path), f"journal:{_shown_path(path)}")
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme.startswith("sqlite"):
            database = text.split("://", 1)[1].removeprefix("/")
            if database and database != ":memory:":
                Path(database).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
            return StorageSpec("sqlite", text, text)
        return StorageSpec("rdb", with_driver(text), mask_password(text))
    path = Path(text).expanduser().resolve()
    shown = _shown_path(path)
    if path.suffix in JOURNAL_SUFFIXES:
        return StorageSpec("journal", str(path), f"journal:{shown}")
    if path.suffix in SQLITE_SUFFIXES:
        path.parent.mkdir(parents=True, exist_ok=True)
        return StorageSpec("sqlite", f"sqlite:///{path}", shown)
    raise ParamsError(f"tune.storage = {text!r}: not a SQLite file ({', '.join(SQLITE_SUFFIXES)}), a journal "
                      f"file ({', '.join(JOURNAL_SUFFIXES)} or journal:PATH) nor a database URL "
                      "(postgresql://user:password@host:port/db)")
