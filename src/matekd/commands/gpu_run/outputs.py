"""What a run hands back: which files are packed (and which are not, and why), the packs
themselves (commands/pack.py) and MANIFEST.txt, beside timings.json and results.txt."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from ..pack import MIB, Entry, LeftOut, manifest_text, pack_outputs
from .layout import MANIFEST, RECORD, RESULTS, TIMINGS

MANIFEST_RESERVE = MIB                # bytes of the total kept for MANIFEST.txt (written after the packs)

# What to pack, by path in the project folder: (prefix, priority, required, kind, bundle depth).
# Priority 0 is packed first; a required file that cannot be packed is an error, an optional one
# is left out and listed in the manifest. A bundle depth d packs the files under each folder d
# levels down together or not at all (an offline run folder: sync-runs refuses a partial run).
PACK_RULES: tuple[tuple[str, int, bool, str, int], ...] = (
    (f"{RECORD}/", 0, True, "run record (logs, timings, params)", 0),
    ("reports/", 1, True, "reports", 0),
    ("metrics/", 1, True, "metrics", 0),
    ("methods/", 1, True, "method inputs", 0),
    ("prepared/manifest.json", 1, True, "data manifest", 0),
    ("cifar10c/manifest.json", 1, True, "CIFAR-10-C manifest", 0),
    ("plots/", 2, True, "per-epoch histories", 0),
    ("models/student/", 3, True, "student weights", 0),
    ("mlruns-offline/", 4, False, "offline tracking record (`matekd sync-runs mlruns-offline`)", 2),
    ("models/teachers/", 5, False, "teacher weights", 0),
)
# Never packed: inputs and intermediates that the commands named here rebuild.
EXCLUDE_RULES: tuple[tuple[str, str], ...] = (
    ("data/", "the CIFAR-10 archive itself (the run's input)"),
    ("prepared/", "decoded data arrays; `matekd prepare` rebuilds them from the archive"),
    ("cams/", "teacher caches (maps, logits); `matekd cache <teacher>` rebuilds them"),
    ("cifar10c/", "regenerated CIFAR-10-C (seeded, so `matekd corrupt` rebuilds it bit for bit)"),
    ("checkpoints/", "resume checkpoints of unfinished training"),
    ("params.yaml", f"the same file is packed as {RECORD}/params.yaml"),
)


def pack_entries(project: Path, record: Path) -> tuple[list[Entry], list[LeftOut]]:
    """What to pack from the project folder and the run record (PACK_RULES), and what is left
    out by rule (EXCLUDE_RULES) with the reason."""
    entries: list[Entry] = []
    excluded: list[LeftOut] = []
    files = [(p, p.relative_to(project).as_posix()) for p in sorted(project.rglob("*")) if p.is_file()]
    files += [(p, f"{RECORD}/{p.relative_to(record).as_posix()}") for p in sorted(record.rglob("*")) if p.is_file()]
    for path, rel in files:
        rule = next((r for r in PACK_RULES if rel.startswith(r[0])), None)
        if rule is not None:
            _, priority, required, kind, depth = rule
            parts = rel.split("/")
            bundle = "/".join(parts[:depth]) if depth and len(parts) > depth else ""
            entries.append(Entry(rel, path, priority, required, kind, bundle))
            continue
        reason = next((why for prefix, why in EXCLUDE_RULES if rel.startswith(prefix)),
                      "not an output this command hands back")
        excluded.append(LeftOut(rel, path.stat().st_size, reason))
    return entries, excluded


def manifest_header(params: Any, environment: dict[str, Any], profile: Path, status: str,
                    error: str | None) -> list[str]:
    return [
        f"# matekd gpu-run: {params.profile} ({profile})",
        f"status: {status}" + (f" - {error.splitlines()[0]}" if error else ""),
        f"written: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"gpu: {environment['gpu']}; python {environment['python']}; torch {environment['packages']['torch']}",
        f"code: {environment['git_commit']}; source sha256 {environment['source_sha256'][:16]}",
        f"params sha256: {environment['params_sha256']}",
        "unpack: mkdir run && for p in pack-*.tar.gz; do tar -xzf \"$p\" -C run; done",
        "tracking: `matekd sync-runs run/mlruns-offline` imports the offline runs into MLflow",
        f"timings: {TIMINGS} (per stage, per epoch, paper extrapolation); results: {RESULTS}",
    ]


def write_outputs(output: Path, project: Path, record: Path, header: list[str], *, max_files: int, file_limit: int,
                  total_limit: int) -> None:
    """Pack into `output` beside timings.json and results.txt (already there; they count against
    the limits), then write MANIFEST.txt, for which a file and MANIFEST_RESERVE bytes are kept."""
    from ...storage import write_text

    loose = [output / TIMINGS, output / RESULTS]
    entries, excluded = pack_entries(project, record)
    result = pack_outputs(entries, output, loose=loose, reserve_files=1, max_files=max_files,
                          file_limit=file_limit, total_limit=total_limit - MANIFEST_RESERVE)
    write_text(output / MANIFEST, manifest_text(result, header, excluded, loose + [output / MANIFEST]))
