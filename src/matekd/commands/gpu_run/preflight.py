"""Before any stage runs: the inputs are there and the output and work folders can be used,
else an error naming what is missing and how to fix it; then both folders made ready."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...errors import MatekdError
from ..pack import SAFE_NAME, is_pack_file
from .layout import LOOSE_FILES, WORK_MARKER
from .machine import EXCLUSIVE_MODES, GpuState

MEMORY_IN_USE_WARNING = 0.9     # free below this share of the total: another process holds the GPU


def preflight(params: Any, env: dict[str, str], output: Path, work: Path) -> None:
    """Fail before any stage runs: data archive, frost textures, output name and folders."""
    from ...cifar10c import resolve_corruptions, resolve_frost_dir
    from ...corruptions import FrostUnavailable, frost_texture_files

    archive = env.get("MATEKD_CIFAR10", "")
    if not archive:
        raise MatekdError("MATEKD_CIFAR10 is not set: point it at the CIFAR-10 archive (cifar-10-python.tar.gz, or "
                          "the JPEG mirror cifar10-jpeg.tar.gz), e.g. copied into the ignored folder .gpu-data/ "
                          "that the device call carries: MATEKD_CIFAR10=.gpu-data/cifar10-jpeg.tar.gz")
    if not Path(archive).exists():
        raise MatekdError(f"MATEKD_CIFAR10={archive}: no such file or folder (copy the archive into .gpu-data/ and "
                          "name that folder in the device call's carry)")
    cp = params.corrupt
    if not cp.source and "frost" in resolve_corruptions(cp.corruptions):
        try:
            frost_texture_files(resolve_frost_dir(cp.frost_dir, env))
        except FrostUnavailable as exc:
            raise MatekdError(f"CIFAR-10-C with frost needs its textures: {exc}. Set MATEKD_FROST (e.g. "
                              "MATEKD_FROST=.gpu-data/frost), or leave frost out with -S corrupt.corruptions=[...]"
                              ) from None
    if not SAFE_NAME.match(output.name):
        raise MatekdError(f"output folder name {output.name!r}: use letters, digits, '.', '_' and '-' only (the "
                          "names a GPU machine hands back)")
    out, wk = output.resolve(), work.resolve()
    if out == wk or wk in out.parents or out in wk.parents:
        raise MatekdError(f"the output folder {output} and the work folder {work} must not contain each other")


def check_gpus(device: str, states: Sequence[GpuState] | None,
               visible: str | None = None) -> tuple[list[str], bool]:
    """The lines preflight prints about the GPUs (compute mode, free memory), and whether the
    stages that share a GPU must run one at a time. An exclusive compute mode admits one process
    per GPU, and the runner starts the teachers (and their caches) together: they run one after
    another there instead of failing. Raises MatekdError where no stage could use the GPU."""
    if device == "cpu":
        return [], False
    if states is not None and visible is not None:     # CUDA_VISIBLE_DEVICES: only those count
        ids = {v.strip() for v in visible.split(",") if v.strip()}
        if ids and all(v.isdigit() for v in ids):     # indices (UUIDs: keep every GPU)
            states = [g for g in states if g.index in ids]
    if states is None:
        return ["GPUs: nvidia-smi not available; compute mode and free memory unknown"], False
    if not states:
        if device == "cuda":
            raise MatekdError("device is cuda but nvidia-smi lists no GPU")
        return ["GPUs: none found by nvidia-smi; device auto runs the stages on the CPU"], False
    prohibited = [g.index for g in states if g.compute_mode == "Prohibited"]
    if prohibited:
        raise MatekdError(f"GPU {', '.join(prohibited)} is in compute mode Prohibited: no process may use it "
                          "(nvidia-smi -c DEFAULT, or hide it with CUDA_VISIBLE_DEVICES)")
    lines = [g.line() for g in states]
    for g in states:
        if g.free_mib is not None and g.total_mib and g.free_mib < MEMORY_IN_USE_WARNING * g.total_mib:
            lines.append(f"warning: GPU {g.index}: {g.total_mib - g.free_mib:,} MiB already in use by another "
                         "process; the stages have less memory than the profile assumes")
    one_at_a_time = any(g.compute_mode in EXCLUSIVE_MODES for g in states)
    if one_at_a_time:
        lines.append("exclusive compute mode: stages that would share a GPU (teachers, caches) run one at a time")
    return lines, one_at_a_time


def clear_output(output: Path) -> None:
    """The output folder must be new, empty, or hold only what this command writes there."""
    if output.exists() and not output.is_dir():
        raise MatekdError(f"output {output} is a file; give a folder")
    if not output.exists():
        output.mkdir(parents=True)
        return
    ours = [p for p in output.iterdir() if p.name in LOOSE_FILES or is_pack_file(p.name)]
    others = sorted(p.name for p in output.iterdir() if p not in ours)
    if others:
        raise MatekdError(f"output folder {output} holds other files ({', '.join(others[:5])}); give an empty or "
                          "new folder (only the packs, MANIFEST.txt, timings.json and results.txt go there)")
    for path in ours:
        path.unlink()


def clear_work(work: Path) -> None:
    """The work folder is the runner's scratch space: new, empty, or one it made before."""
    if work.exists():
        if (work / WORK_MARKER).is_file():
            shutil.rmtree(work)
        elif any(work.iterdir()):
            raise MatekdError(f"work folder {work} is not empty and was not made by `matekd gpu-run`; give a new "
                              "folder with --work-dir (everything in it is deleted at the next run)")
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("scratch folder of `matekd gpu-run`; deleted at its next run\n")
