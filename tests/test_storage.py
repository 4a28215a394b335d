"""Atomic writes, safetensors round trips and corruption, safe loading and safe extraction."""

from __future__ import annotations

import io
import os
import pickle
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from matekd.errors import MatekdError
from matekd.storage import (
    atomic_path,
    load_tensors,
    read_json,
    safe_extract_tar,
    safe_torch_load,
    save_tensors,
    sha256_array,
    sha256_file,
    write_json,
)

torch.set_num_threads(1)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------
# atomic_path


def test_atomic_path_keeps_old_content_on_error(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_path(target) as tmp:
            tmp.write_text("half-writ")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_keyboard_interrupt_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"  # parent folders are created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("first")
        assert not target.exists()  # invisible until the block succeeds
    assert target.read_text() == "first"
    with atomic_path(target) as tmp:
        tmp.write_text("second")
    assert target.read_text() == "second"
    assert leftovers(target.parent) == []


def test_atomic_path_gives_the_umask_mode(tmp_path: Path) -> None:
    # mkstemp creates 0600; an output must get the mode of any other file this process writes
    (tmp_path / "plain.txt").write_text("x")
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777


def test_atomic_path_in_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):  # root ignores permission bits: simulate the refusal
            def refuse(*args, **kwargs):
                raise PermissionError(13, "Permission denied", str(folder))
            monkeypatch.setattr(tempfile, "mkstemp", refuse)
        target = folder / "out.json"
        with pytest.raises(MatekdError) as info:
            write_json(target, {"a": 1})
        assert str(target) in str(info.value)
        assert "Permission denied" in str(info.value)
        assert not target.exists()
    finally:
        folder.chmod(0o755)


def test_json_round_trip_and_bad_json(tmp_path: Path) -> None:
    write_json(tmp_path / "a.json", {"x": np.float32(0.5), "n": np.int64(3), "v": np.arange(3)})
    assert read_json(tmp_path / "a.json") == {"x": 0.5, "n": 3, "v": [0, 1, 2]}
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(MatekdError, match="b.json"):
        read_json(tmp_path / "b.json")
    with pytest.raises(MatekdError, match="missing file"):
        read_json(tmp_path / "c.json")


# ---------------------------------------------------------------------------------------
# safetensors


def sample_tensors() -> dict[str, torch.Tensor]:
    return {"w": torch.linspace(-1, 1, 24).reshape(2, 3, 4),
            "idx": torch.arange(5, dtype=torch.int64),
            "half": torch.full((3,), 0.25, dtype=torch.float16),
            "count": torch.tensor(7),  # 0-dim, like BatchNorm's num_batches_tracked
            "mask": torch.tensor([True, False, True])}


def test_tensors_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = sample_tensors()
    save_tensors(path, tensors, {"architecture": "resnet20", "epochs": 3})
    loaded, meta = load_tensors(path)
    assert meta == {"architecture": "resnet20", "epochs": "3"}  # values become strings
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
        assert torch.equal(loaded[key], value)
    assert leftovers(tmp_path) == []


def test_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    base = torch.arange(12.0).reshape(3, 4)
    save_tensors(tmp_path / "t.safetensors", {"t": base.t()})
    loaded, meta = load_tensors(tmp_path / "t.safetensors")
    assert meta == {}
    assert torch.equal(loaded["t"], base.t())


def _data_start(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


@pytest.mark.parametrize("damage", ["truncated", "empty", "header_flip", "data_flip", "metadata_flip"])
def test_corrupt_tensors_file(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.safetensors"
    save_tensors(path, sample_tensors(), {"architecture": "resnet20"})
    raw = bytearray(path.read_bytes())
    start = _data_start(bytes(raw))
    if damage == "truncated":
        raw = raw[: len(raw) - 7]
    elif damage == "empty":
        raw = bytearray()
    elif damage == "header_flip":
        raw[12] ^= 0xFF
    elif damage == "data_flip":
        raw[start + (len(raw) - start) // 2] ^= 0x01  # one bit inside the tensor bytes
    else:  # a changed metadata value that still parses: resnet20 -> resnet21
        at = raw.index(b"resnet20")
        raw[at + 7] = ord("1")
    path.write_bytes(bytes(raw))
    with pytest.raises(MatekdError) as info:
        load_tensors(path)
    assert str(path) in str(info.value)


def test_missing_tensors_file(tmp_path: Path) -> None:
    with pytest.raises(MatekdError, match="missing file"):
        load_tensors(tmp_path / "nope.safetensors")


def test_reserved_metadata_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_tensors(tmp_path / "t.safetensors", {"a": torch.zeros(1)}, {"matekd.sha256": "x"})


# ---------------------------------------------------------------------------------------
# pickles


class Exploit:
    """Unpickling this runs a shell command (the attack weights_only must stop)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_safe_torch_load_refuses_code(tmp_path: Path, writer: str) -> None:
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "evil.pt"
    payload = {"state": torch.zeros(2), "x": Exploit(sentinel)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(payload, handle)
    with pytest.raises(MatekdError) as info:
        safe_torch_load(path)
    assert str(path) in str(info.value)
    assert not sentinel.exists()


def test_exploit_is_real(tmp_path: Path) -> None:
    """A plain pickle.load of the same payload does run the command (so the test above can fail)."""
    sentinel = tmp_path / "SENTINEL"
    pickle.loads(pickle.dumps(Exploit(sentinel)))
    assert sentinel.exists()


def test_safe_torch_load_accepts_plain_weights(tmp_path: Path) -> None:
    state = {"model": {"w": torch.ones(2, 2), "b": torch.zeros(2)}, "epoch": 3, "lr": 0.1}
    torch.save(state, tmp_path / "ckpt.pt")
    loaded = safe_torch_load(tmp_path / "ckpt.pt")
    assert loaded["epoch"] == 3 and loaded["lr"] == 0.1
    assert torch.equal(loaded["model"]["w"], torch.ones(2, 2))


def test_safe_torch_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MatekdError, match="missing file"):
        safe_torch_load(tmp_path / "nope.pt")


# ---------------------------------------------------------------------------------------
# tar extraction


def _tar(path: Path, build) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        build(tar)
    return path


def _add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _add_link(tar: tarfile.TarFile, name: str, target: str, kind: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tar.addfile(info)


@pytest.mark.parametrize("member", ["../evil", "a/../../evil", "/tmp/evil_abs", "symlink", "hardlink"])
def test_safe_extract_refuses_bad_members(tmp_path: Path, member: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()

    def build(tar: tarfile.TarFile) -> None:
        _add_file(tar, "ok.txt", b"fine")
        if member == "symlink":
            _add_link(tar, "link", "/etc/passwd", tarfile.SYMTYPE)
        elif member == "hardlink":
            _add_link(tar, "link", "ok.txt", tarfile.LNKTYPE)
        else:
            _add_file(tar, member, b"evil")

    archive = _tar(tmp_path / "a.tar.gz", build)
    with pytest.raises(MatekdError) as info:
        safe_extract_tar(archive, dest)
    assert str(archive) in str(info.value)
    assert "refusing" in str(info.value)
    assert list(dest.iterdir()) == []  # checked before anything is written
    assert not (tmp_path / "evil").exists()


def test_safe_extract_normal_archive(tmp_path: Path) -> None:
    def build(tar: tarfile.TarFile) -> None:
        folder = tarfile.TarInfo("sub")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        _add_file(tar, "sub/a.bin", bytes(range(256)))
        _add_file(tar, "./b.txt", b"hello")

    archive = _tar(tmp_path / "a.tar.gz", build)
    dest = tmp_path / "dest"
    safe_extract_tar(archive, dest)
    assert (dest / "sub" / "a.bin").read_bytes() == bytes(range(256))
    assert (dest / "b.txt").read_text() == "hello"


def test_safe_extract_truncated_archive(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    archive = _tar(tmp_path / "a.tar.gz",
                   lambda tar: _add_file(tar, "noise.bin", rng.integers(0, 256, 20000, dtype=np.uint8).tobytes()))
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(MatekdError) as info:
        safe_extract_tar(archive, tmp_path / "dest")
    assert str(archive) in str(info.value) and "truncated or corrupt" in str(info.value)


def test_safe_extract_not_an_archive(tmp_path: Path) -> None:
    bogus = tmp_path / "x.tar.gz"
    bogus.write_bytes(b"this is not a tar archive at all" * 10)
    with pytest.raises(MatekdError, match="x.tar.gz"):
        safe_extract_tar(bogus, tmp_path / "dest")


# ---------------------------------------------------------------------------------------
# hashes


def test_sha256_array_covers_dtype_shape_and_bytes() -> None:
    a = np.arange(6, dtype=np.int32)
    base = sha256_array(a)
    assert sha256_array(a.copy()) == base
    assert sha256_array(a.reshape(2, 3)) != base          # same bytes, other shape
    assert sha256_array(a.astype(np.uint32)) != base      # same bytes, other dtype
    assert sha256_array(a.view(np.float32)) != base       # same bytes, other dtype
    changed = a.copy()
    changed[-1] += 1
    assert sha256_array(changed) != base
    assert sha256_array(torch.from_numpy(a)) == base      # tensors hash like their arrays
    assert sha256_array(a[::-1].copy()) != base
    assert sha256_array(np.arange(12, dtype=np.int32)[::2]) == sha256_array(np.arange(0, 12, 2, dtype=np.int32))


def test_sha256_file_of_folder_is_stable(tmp_path: Path) -> None:
    def make(root: Path, order: list[str]) -> Path:
        for name in order:  # creation order must not matter
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(name.upper())
        return root

    one = make(tmp_path / "one", ["a.txt", "sub/b.txt", "sub/c.txt"])
    two = make(tmp_path / "two", ["sub/c.txt", "a.txt", "sub/b.txt"])
    digest = sha256_file(one)
    assert sha256_file(one) == digest
    assert sha256_file(two) == digest
    (two / "sub" / "c.txt").write_text("changed")
    assert sha256_file(two) != digest
    (two / "sub" / "c.txt").write_text("SUB/C.TXT")
    assert sha256_file(two) == digest
    (two / "sub" / "c.txt").rename(two / "sub" / "d.txt")  # same content, other name
    assert sha256_file(two) != digest


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    import hashlib

    data = os.urandom(3 * 1024 + 5)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f", chunk=1024) == hashlib.sha256(data).hexdigest()
