"""Files: atomic writes, safetensors, hashes and safe archive extraction.

Every output goes through `atomic_path` so that a crash or a failed write never leaves a
half-written file that a later stage would load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from .errors import DataError, MatekdError

ROOT_MARKERS = ("dvc.yaml", "params.yaml")   # a folder holding one of these is a project root


def repo_root() -> Path:
    """The project root: DVC_ROOT when DVC runs us, else the nearest folder with a ROOT_MARKER."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if any((folder / marker).exists() for marker in ROOT_MARKERS):
            return folder
    return here


def _umask() -> int:
    """The process umask (read once: os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
_DIR_MODE = 0o777 & ~_umask()
CHECKSUM_KEY = "matekd.sha256"  # safetensors metadata entry: hash of the tensors + other metadata


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise MatekdError(f"cannot write {target}: {exc.strerror or exc}") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.is_file():
            os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600; outputs get the usual umask mode
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MatekdError(f"cannot write {target}: {exc.strerror or exc}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling folder; swap it onto `target` only if the block succeeds
    (the previous content is removed then, so stale files never survive)."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        os.chmod(tmp, _DIR_MODE)   # mkdtemp makes 0700; the result is an ordinary folder
    except OSError as exc:
        raise MatekdError(f"cannot write {target}: {exc.strerror or exc}") from exc
    old: Path | None = None
    try:
        yield tmp
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:
                os.replace(old / target.name, target)
            raise
    except OSError as exc:
        raise MatekdError(f"cannot write {target}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise MatekdError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MatekdError(f"{path} is not valid JSON ({exc}); rerun the stage that writes it") from exc


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> None:
    """Save tensors as safetensors, atomically. Metadata values must be strings."""
    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if CHECKSUM_KEY in meta:
        raise ValueError(f"metadata key {CHECKSUM_KEY!r} is reserved")
    # safetensors has no checksum, so a flipped bit in the data would load silently.
    meta[CHECKSUM_KEY] = _tensors_checksum(contiguous, meta)
    with atomic_path(path) as tmp:
        tmp.write_bytes(_canonical_header(save(contiguous, metadata=meta)))


def _canonical_header(blob: bytes) -> bytes:
    """Rewrite the safetensors JSON header with sorted keys. safetensors serialises it from a
    hash map whose order changes between processes, so identical tensors would otherwise give
    files with different bytes (and DVC would see a changed output)."""
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data section stays 8-byte aligned
    return struct.pack("<Q", len(text)) + text + blob[8 + size:]


def _tensors_checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes (any dtype, bfloat16 included) and the metadata."""
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():  # an empty tensor has no bytes (and cannot be viewed as uint8)
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy
    return digest.hexdigest()


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file, read from its header only (no tensors,
    no checksum: for looking at what a file is, not for loading it)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return dict(header.get("__metadata__") or {})


def load_tensors(path: str | os.PathLike, device: str | torch.device = "cpu"
                 ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file (never a pickle). Corrupt or missing files raise MatekdError;
    files written by `save_tensors` are checked against their stored checksum."""
    path = Path(path)
    if not path.exists():
        raise MatekdError(f"missing file {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise MatekdError(f"{path} is not a valid safetensors file ({exc}); "
                          "delete it and rerun the stage that writes it") from exc
    stored = metadata.pop(CHECKSUM_KEY, None)
    if stored is not None and stored != _tensors_checksum(tensors, metadata):
        raise MatekdError(f"{path} is corrupt (its contents do not match the checksum written with it); "
                          "delete it and rerun the stage that writes it")
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


def safe_torch_load(path: str | os.PathLike) -> Any:
    """Load a non-safetensors checkpoint without executing code (weights_only=True)."""
    if not Path(path).exists():
        raise MatekdError(f"missing file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError and friends
        raise MatekdError(f"refusing to load {path}: it is not a plain weights file ({exc})") from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    path = Path(path)
    if path.is_dir():
        for member in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(member.relative_to(path)).encode())
            digest.update(sha256_file(member).encode())
        return digest.hexdigest()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_array(array: np.ndarray | torch.Tensor) -> str:
    """Hash of an array's dtype, shape and bytes."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.ascontiguousarray(array)
    digest = hashlib.sha256()
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def check_tar_member(archive: str | os.PathLike, member: tarfile.TarInfo) -> tuple[str, ...]:
    """A member's normalised path parts; DataError if it is absolute, climbs out with `..`, or is
    not a plain file or folder (symlink, hardlink, device, fifo, sparse file)."""
    name = member.name
    parts = PurePosixPath(name).parts
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
        raise DataError(f"{archive}: member {name!r} escapes the archive folder; refusing to read it")
    if not (member.isfile() or member.isdir()) or member.issparse():
        raise DataError(f"{archive}: member {name!r} is a link or special file; refusing to read it")
    return tuple(p for p in parts if p not in ("", "."))


def safe_extract_tar(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Extract a tar archive after checking every member with `check_tar_member`."""
    archive, dest = Path(archive), Path(dest).resolve()
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for member in members:
                check_tar_member(archive, member)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise MatekdError(f"{archive} is truncated or corrupt ({exc})") from exc


def digest_of(*parts: Any) -> str:
    """sha256 of a JSON rendering of `parts` (checkpoint and result identities)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def write_history_csv(path: str | os.PathLike, history: list[dict[str, float]]) -> None:
    """Per-epoch records as CSV (for `dvc plots` and the report)."""
    import pandas as pd

    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_csv(tmp, index=False)


def source_digest() -> str:
    """sha256 of matekd's own source files: a checkpoint or stored result written by other code
    is never resumed (DVC reruns a stage after a code change; it must not find old results)."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
