"""Trained teachers: load one from its safetensors weights, frozen and in eval mode."""

from __future__ import annotations

from pathlib import Path

from .errors import MatekdError
from .models import build_model
from .paths import cache_path, teacher_paths
from .storage import load_tensors, sha256_file
from .training.loop import prepare_model


def load_teacher(name: str, device, root: Path = Path(".")):
    """A trained teacher in eval mode, loaded from safetensors; missing weights fail clearly."""
    path = teacher_paths(name, root)["weights"]
    if not path.exists():
        raise MatekdError(f"missing teacher weights {path}; run `dvc repro train_teacher@{name}` "
                          f"(or `matekd train-teacher {name}`)")
    state, meta = load_tensors(path)
    if meta.get("architecture", name) != name:
        raise MatekdError(f"{path} holds a {meta.get('architecture')} model, not {name}")
    model = build_model(name)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise MatekdError(f"{path} does not match the {name} architecture ({exc})") from exc
    model = prepare_model(model, device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_hashes(names: list[str], root: Path = Path(".")) -> dict[str, str]:
    """sha256 of each teacher's weights file: the teachers' identity in checkpoints and results."""
    out = {}
    for name in names:
        path = teacher_paths(name, root)["weights"]
        if not path.exists():
            raise MatekdError(f"missing teacher weights {path}; run `dvc repro train_teacher@{name}` "
                              f"(or `matekd train-teacher {name}`)")
        out[name] = sha256_file(path)
    return out


def teacher_identity(names: list[str], with_caches: bool, root: Path = Path(".")) -> dict[str, dict[str, str]]:
    """{"weights": {name: sha256}, "caches": {name: sha256}} of the teachers a method reads (caches
    only when it reads them); a missing file fails with the command that makes it."""
    identity: dict[str, dict[str, str]] = {"weights": teacher_hashes(names, root), "caches": {}}
    for name in names if with_caches else []:
        path = cache_path(name, root)
        if not path.exists():
            raise MatekdError(f"missing CAM cache {path}; run `dvc repro cache@{name}` first")
        identity["caches"][name] = sha256_file(path)
    return identity
