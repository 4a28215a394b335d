"""Before any stage runs: the inputs are there and the output and work folders can be used,
else an error naming what is missing and how to fix it; then both folders made ready."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from ...errors import MatekdError
from ..pack import SAFE_NAME, is_pack_file
from .layout import LOOSE_FILES, WORK_MARKER


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
