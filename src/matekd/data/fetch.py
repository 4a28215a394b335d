"""`matekd fetch`: put exactly one raw CIFAR-10 source into data/ and record it with `dvc add`.

Not a pipeline stage: data/ is pinned by the top-level data.dvc, which this command updates.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from ..storage import sha256_file
from .sources import (
    CANONICAL_ARCHIVE,
    CANONICAL_DIR,
    CANONICAL_MD5,
    CANONICAL_URL,
    HOW_TO_PROVIDE,
    KIND_CANONICAL,
    SOURCE_ENV,
    file_md5,
    find_source,
    is_archive_name,
    md5_error,
    skip_md5,
)

log = logging.getLogger(__name__)



@dataclass
class FetchResult:
    """What `fetch` did: the source now in data/, how it got there, and the DVC outcome."""

    kind: str
    path: Path
    action: str  # linked | copied | downloaded | unchanged | present
    removed: list[str] = field(default_factory=list)
    dvc: str = ""


def _raw_sources(data_dir: Path) -> list[Path]:
    """Every entry of data/ that find_source could pick up."""
    if not data_dir.is_dir():
        return []
    found = []
    for entry in sorted(data_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and is_archive_name(entry.name):
            found.append(entry)
        elif entry.is_dir() and entry.name in (CANONICAL_DIR, "train", "test"):
            found.append(entry)
    return found


def _same_content(a: Path, b: Path) -> bool:
    if not (a.exists() and b.exists()) or a.is_dir() != b.is_dir():
        return False
    with contextlib.suppress(OSError):
        if os.path.samefile(a, b):
            return True
    if a.is_file() and a.stat().st_size != b.stat().st_size:
        return False
    return sha256_file(a) == sha256_file(b)


def _place(item: Path, dest: Path) -> str:
    """Hardlink (else copy) a file or copy a folder to `dest`, which must not exist."""
    if item.is_dir():
        shutil.copytree(item, dest, symlinks=False)
        return "copied"
    try:
        os.link(item, dest)
        return "linked"
    except OSError:
        shutil.copy2(item, dest)
        return "copied"


def _plan_source(source: Path) -> list[tuple[Path, str]]:
    """(item to place, name in data/) pairs for a user-given source file or folder."""
    if not source.exists():
        raise DataError(f"CIFAR-10 source {source} does not exist. {HOW_TO_PROVIDE}")
    if source.is_file():
        if not is_archive_name(source.name):
            raise DataError(f"{source} is not a .tar.gz, .tgz or .tar archive")
        return [(source, source.name)]
    if (source / "data_batch_1").is_file():
        return [(source, CANONICAL_DIR)]
    if (source / CANONICAL_DIR).is_dir():
        return [(source / CANONICAL_DIR, CANONICAL_DIR)]
    if (source / "train").is_dir() and (source / "test").is_dir():
        return [(source / "train", "train"), (source / "test", "test")]
    raise DataError(f"{source} is a folder but holds neither the CIFAR-10 python batches (data_batch_1, ...) "
                    "nor train/ and test/ class folders")


def _install(plan: list[tuple[Path, str]], data_dir: Path) -> tuple[str, list[str]]:
    """Stage the new source beside data/'s content, then swap it in for every other raw source."""
    data_dir.mkdir(parents=True, exist_ok=True)
    targets = {data_dir / name for _, name in plan}
    if all(_same_content(item, data_dir / name) for item, name in plan):
        action = "unchanged"
        staged: list[tuple[Path, Path]] = []
        stage = None
    else:
        stage = Path(tempfile.mkdtemp(prefix=".fetch.", dir=data_dir))
        staged = []
        action = "copied"
        try:
            for item, name in plan:
                action = _place(item, stage / name)
                staged.append((stage / name, data_dir / name))
        except OSError as exc:
            shutil.rmtree(stage, ignore_errors=True)
            raise DataError(f"cannot copy {item} into {data_dir}: {exc.strerror or exc}") from exc
    keep = set() if staged else targets
    old = [p for p in _raw_sources(data_dir) if p not in keep]
    trash = Path(tempfile.mkdtemp(prefix=".fetch-old.", dir=data_dir)) if old else None
    moved: list[tuple[Path, Path]] = []
    try:
        for entry in old:
            os.replace(entry, trash / entry.name)  # type: ignore[operator]
            moved.append((trash / entry.name, entry))  # type: ignore[operator]
        for src, dst in staged:
            os.replace(src, dst)
    except OSError as exc:
        for src, dst in moved:
            with contextlib.suppress(OSError):
                os.replace(src, dst)
        if trash is not None:
            with contextlib.suppress(OSError):
                trash.rmdir()  # only if everything went back; never delete the user's data here
        raise DataError(f"cannot update {data_dir}: {exc.strerror or exc}") from exc
    finally:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return action, sorted(p.name for p in old if p not in targets)


@contextlib.contextmanager
def _download(data_dir: Path) -> Iterator[Path | None]:
    """Download the canonical archive (md5-verified) into a temporary folder in data/.

    Yields its path, or None when data/ already holds a verified copy.
    """
    target = data_dir / CANONICAL_ARCHIVE
    if target.is_file() and file_md5(target) == CANONICAL_MD5:
        yield None
        return
    try:
        from torchvision.datasets.utils import check_integrity, download_url
    except ImportError as exc:
        raise DataError("`--download` needs torchvision; install it or give a local archive") from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".download.", dir=data_dir))
    try:
        try:
            download_url(CANONICAL_URL, str(stage), filename=CANONICAL_ARCHIVE, md5=CANONICAL_MD5)
        except Exception as exc:  # URLError, HTTPError, OSError, RuntimeError (bad checksum)
            raise DataError(f"downloading {CANONICAL_URL} failed ({exc}). Without internet, give a local copy: "
                            "`MATEKD_CIFAR10=/path/to/cifar-10-python.tar.gz matekd fetch`") from exc
        if not check_integrity(str(stage / CANONICAL_ARCHIVE), CANONICAL_MD5):
            raise DataError(f"the download of {CANONICAL_URL} does not have md5 {CANONICAL_MD5}; try again")
        yield stage / CANONICAL_ARCHIVE
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _dvc_root(start: Path) -> Path | None:
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _dvc_executable() -> str | None:
    beside = Path(sys.executable).parent / "dvc"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("dvc")


def dvc_add(data_dir: Path) -> str:
    """Run `dvc add <data_dir>` so data.dvc matches data/; returns what happened."""
    data_dir = data_dir.resolve()
    root = _dvc_root(data_dir.parent)
    if root is None:
        message = f"skipped `dvc add`: {data_dir.parent} is not inside a DVC repository (run `dvc init`)"
        log.warning(message)
        return message
    dvc = _dvc_executable()
    if dvc is None:
        message = "skipped `dvc add`: dvc is not installed"
        log.warning(message)
        return message
    rel = os.path.relpath(data_dir, root)
    proc = subprocess.run([dvc, "add", rel], cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise DataError(f"`dvc add {rel}` failed (exit {proc.returncode}): {' '.join(tail)}")
    return f"dvc add {rel}: ok"


def fetch(source: str | os.PathLike | None = None, download: bool = False,
          data_dir: str | os.PathLike = "data") -> FetchResult:
    """Put exactly one CIFAR-10 source into data/ and record it with `dvc add data`.

    `source` (else $MATEKD_CIFAR10) is an archive or folder to link/copy in; `download` fetches
    the official archive. With neither, an existing source in data/ is kept (DataError if none).
    """
    data_dir = Path(data_dir)
    if source is not None and download:
        raise DataError("give either a source path or --download, not both")
    if source is None and not download and os.environ.get(SOURCE_ENV):
        source = os.environ[SOURCE_ENV]
    removed: list[str] = []
    if download:
        with _download(data_dir) as fresh:
            item = fresh if fresh is not None else data_dir / CANONICAL_ARCHIVE
            action, removed = _install([(item, CANONICAL_ARCHIVE)], data_dir)
            if fresh is not None:
                action = "downloaded"
    elif source is not None:
        plan = _plan_source(Path(source).expanduser())
        action, removed = _install(plan, data_dir)
    else:
        find_source(data_dir)  # raises the "where to put data" message when data/ is empty
        action = "present"
    kind, path = find_source(data_dir)
    # Read enough to fail now, not at `dvc repro`, when the source is obviously wrong.
    if kind == KIND_CANONICAL and path.name == CANONICAL_ARCHIVE and not skip_md5():
        actual = file_md5(path)
        if actual != CANONICAL_MD5:
            raise md5_error(str(path), CANONICAL_MD5, actual)
    result = FetchResult(kind=kind, path=path, action=action, removed=removed)
    result.dvc = dvc_add(data_dir)
    return result
