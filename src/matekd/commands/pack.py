"""Pack a run's outputs into a few tar.gz files under size limits (`matekd gpu-run`).

A GPU machine hands back at most a few files of limited size (the device limits: 8 files of
16 MiB, 64 MiB together, no more than 2 folders deep). `pack_outputs` puts the files worth
keeping into `pack-<k>.tar.gz` bins:

- Entries come with a priority (0 first) and a `required` flag. Bins are filled first-fit in
  order of (priority, estimated size decreasing): first-fit decreasing within each priority,
  so lower-priority files take the room that is left.
- The size of a file in a pack is estimated by deflating it (what gzip does); a pack is checked
  after it is written, and the plan is redone with a smaller capacity when the estimate was
  short. No pack over the limit is ever left behind: PackError instead.
- A unit is what goes into one pack whole: a file, or a bundle of files that is useless in
  part (an offline tracking run: `sync-runs` refuses a run with a missing file). Large files
  with identical content are stored once, the other paths as hard links, so their units are
  joined into one.
- An optional unit that fits nowhere (too large alone, or no room left) is left out and listed
  with the reason; a required one that cannot be placed makes the layout impossible: PackError
  naming it, before anything is written.
"""

from __future__ import annotations

import os
import re
import tarfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MatekdError

MIB = 1 << 20
MAX_FILES = 8                  # files handed back per call
FILE_LIMIT = 16 * MIB          # bytes per file
TOTAL_LIMIT = 64 * MIB         # bytes for all files together
PACK_PREFIX = "pack-"
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")   # the only names that come back from the machine
TAR_MEMBER_OVERHEAD = 1024     # a member's header (+ a long-name record), compressed, at most
DEDUP_MIN_BYTES = 64 << 10     # smaller duplicates are stored twice: joining their units costs more
GZIP_SLACK = 4096              # gzip header/trailer, the tar end blocks and deflate's block overhead
_COMPRESS_LEVEL = 6


class PackError(MatekdError):
    """The outputs cannot be packed within the limits (a required file does not fit)."""


@dataclass(frozen=True)
class Entry:
    """One file to pack: `arcname` is its path inside the packs (posix, relative)."""

    arcname: str
    source: Path
    priority: int
    required: bool
    kind: str          # what it is, for the manifest ("reports", "student weights", ...)
    bundle: str = ""   # entries of one bundle are packed together or left out together


@dataclass
class Unit:
    """Entries packed together: each stored, or (links[arcname]) a hard link to an earlier one."""

    entries: list[Entry]
    links: dict[str, str]   # arcname -> the arcname it is a hard link to (same content)
    estimate: int           # bytes it adds to a pack: compressed, headers and links included

    @property
    def priority(self) -> int:
        return min(e.priority for e in self.entries)

    @property
    def arcname(self) -> str:
        return self.entries[0].arcname

    @property
    def label(self) -> str:
        bundles = sorted({e.bundle for e in self.entries if e.bundle})
        return bundles[0] if len(bundles) == 1 and len(self.entries) > 1 else self.arcname


@dataclass(frozen=True)
class LeftOut:
    arcname: str
    size: int
    reason: str


@dataclass
class Plan:
    bins: list[list[Unit]]
    left_out: list[LeftOut]


@dataclass
class PackResult:
    packs: list[Path]                                   # written, in order
    where: dict[str, str] = field(default_factory=dict)  # arcname -> pack file name (or "hard link ...")
    left_out: list[LeftOut] = field(default_factory=list)
    units: list[Unit] = field(default_factory=list)


def compressed_size(path: Path, level: int = _COMPRESS_LEVEL) -> int:
    """Bytes of `path` deflated at gzip's level (streamed; the file is never held whole)."""
    deflate = zlib.compressobj(level, zlib.DEFLATED, -15)
    total = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(MIB):
            total += len(deflate.compress(chunk))
    return total + len(deflate.flush())


def build_units(entries: Iterable[Entry], estimate: Callable[[Path], int] = compressed_size,
                dedup_min_bytes: int = DEDUP_MIN_BYTES) -> list[Unit]:
    """Entries joined into units: a bundle's entries, and entries whose content is identical
    (files of at least `dedup_min_bytes`), end in the same unit; within it the first copy of a
    content is stored and the later ones become hard links. Each unit carries its estimate."""
    from ..storage import sha256_file  # here: it loads torch, which building the CLI parser must not

    entries = list(entries)
    names = [e.arcname for e in entries]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise PackError(f"two files would have the same path in the packs: {', '.join(dup[:5])}")
    parent = list(range(len(entries)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        parent[root(i)] = root(j)

    sizes = [e.source.stat().st_size for e in entries]
    content = list(names)                      # a key per distinct content (default: its own path)
    by_size: dict[int, list[int]] = {}
    for i, size in enumerate(sizes):
        if size >= dedup_min_bytes:
            by_size.setdefault(size, []).append(i)
    for size, members in by_size.items():
        if len(members) < 2:
            continue
        first: dict[str, int] = {}
        for i in members:
            digest = f"{size}:{sha256_file(entries[i].source)}"
            content[i] = digest
            if digest in first:
                join(i, first[digest])
            else:
                first[digest] = i
    bundles: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.bundle:
            if entry.bundle in bundles:
                join(i, bundles[entry.bundle])
            else:
                bundles[entry.bundle] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(entries)):
        groups.setdefault(root(i), []).append(i)
    units = []
    for members in groups.values():
        members.sort(key=lambda i: (entries[i].priority, names[i]))
        stored: dict[str, str] = {}
        links: dict[str, str] = {}
        packed = 0
        for i in members:
            if content[i] in stored:
                links[names[i]] = stored[content[i]]
            else:
                stored[content[i]] = names[i]
                packed += estimate(entries[i].source)
            packed += TAR_MEMBER_OVERHEAD
        units.append(Unit([entries[i] for i in members], links, packed))
    return units


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.0f} KiB"


def plan_packs(units: Sequence[Unit], *, max_packs: int, file_limit: int = FILE_LIMIT,
               total_limit: int = TOTAL_LIMIT, capacity: int | None = None) -> Plan:
    """Assign units to at most `max_packs` bins of `capacity` (default: the file limit less the
    gzip slack), at most `total_limit` in all: first-fit, by priority, then size decreasing.
    Raises PackError when a required unit cannot be placed."""
    if max_packs < 1:
        raise PackError("no pack can be written: the other files already use up the file-count limit")
    capacity = capacity if capacity is not None else file_limit - GZIP_SLACK
    bins: list[list[Unit]] = []
    loads: list[int] = []
    left_out: list[LeftOut] = []
    used = 0
    impossible: list[str] = []
    for unit in sorted(units, key=lambda u: (u.priority, -u.estimate, u.arcname)):
        reason = None
        whole = f" (kept whole with {unit.label})" if len(unit.entries) > 1 else ""
        if unit.estimate > capacity:
            reason = (f"{_mib(unit.estimate)} compressed{whole}, more than one file may hold "
                      f"({_mib(file_limit)})")
        else:
            slot = next((k for k, load in enumerate(loads) if load + unit.estimate <= capacity), None)
            packs_after = len(bins) + (slot is None)     # a new pack brings its own gzip slack
            if used + unit.estimate > total_limit - GZIP_SLACK * packs_after:
                reason = (f"no room{whole}: the packs already hold {_mib(used)} of the {_mib(total_limit)} "
                          "allowed in all")
            elif slot is None and len(bins) >= max_packs:
                reason = (f"no room{whole}: all {max_packs} packs are full with files of higher priority "
                          "(or larger files of the same priority)")
            else:
                if slot is None:
                    bins.append([])
                    loads.append(0)
                    slot = len(bins) - 1
                bins[slot].append(unit)
                loads[slot] += unit.estimate
                used += unit.estimate
        if reason is not None:
            for entry in unit.entries:
                if entry.required:
                    impossible.append(f"{entry.arcname} ({entry.kind}, {reason})")
                left_out.append(LeftOut(entry.arcname, entry.source.stat().st_size, reason))
    if impossible:
        raise PackError(f"cannot pack the required outputs within {max_packs} file(s) of at most "
                        f"{_mib(file_limit)} ({_mib(total_limit)} in all): " + "; ".join(impossible[:5]) +
                        (f"; and {len(impossible) - 5} more" if len(impossible) > 5 else ""))
    return Plan(bins, left_out)


def _add_unit(tar: tarfile.TarFile, unit: Unit) -> None:
    """The unit's files, each stored or as a hard link to its stored copy (added before it)."""
    for entry in sorted(unit.entries, key=lambda e: (e.arcname in unit.links, e.arcname)):
        info = tar.gettarinfo(str(entry.source), arcname=entry.arcname)
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        if entry.arcname in unit.links:
            info.type, info.linkname, info.size = tarfile.LNKTYPE, unit.links[entry.arcname], 0
            tar.addfile(info)
            continue
        with open(entry.source, "rb") as handle:
            tar.addfile(info, handle)


def write_plan(plan: Plan, out_dir: Path) -> list[Path]:
    """Write one tar.gz per bin (members sorted by path); returns their paths."""
    paths = []
    for k, units in enumerate(plan.bins, start=1):
        path = out_dir / f"{PACK_PREFIX}{k}.tar.gz"
        tmp = path.with_name(f".{path.name}.tmp")
        with tarfile.open(tmp, "w:gz", compresslevel=_COMPRESS_LEVEL, format=tarfile.PAX_FORMAT) as tar:
            for unit in sorted(units, key=lambda u: u.arcname):
                _add_unit(tar, unit)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def pack_outputs(entries: Iterable[Entry], out_dir: Path, *, max_files: int = MAX_FILES,
                 file_limit: int = FILE_LIMIT, total_limit: int = TOTAL_LIMIT, loose: Sequence[Path] = (),
                 reserve_files: int = 0, estimate: Callable[[Path], int] = compressed_size,
                 attempts: int = 4) -> PackResult:
    """Pack `entries` into `out_dir/pack-<k>.tar.gz`. `loose` files already in (or bound for)
    `out_dir` count against the limits, as do `reserve_files` more still to be written (the
    manifest). A pack that comes out over the limit makes the plan shrink and start again."""
    out_dir.mkdir(parents=True, exist_ok=True)
    units = build_units(entries, estimate)
    loose_bytes = sum(p.stat().st_size for p in loose if p.exists())
    for path in loose:
        if path.exists() and path.stat().st_size > file_limit:
            raise PackError(f"{path.name} is {_mib(path.stat().st_size)}, over the {_mib(file_limit)} file limit")
    max_packs = max_files - len(loose) - reserve_files
    budget = total_limit - loose_bytes
    capacity = file_limit - GZIP_SLACK
    for attempt in range(attempts):
        try:
            plan = plan_packs(units, max_packs=max_packs, file_limit=file_limit, total_limit=budget,
                              capacity=capacity)
        except PackError as exc:
            if attempt == 0:
                raise
            _remove_packs(out_dir)
            raise PackError(f"the packs came out larger than their estimates, and with the room cut to match "
                            f"they no longer fit: {exc}") from None
        _remove_packs(out_dir)
        packs = write_plan(plan, out_dir)
        sizes = [p.stat().st_size for p in packs]
        worst = max((s / capacity for s in sizes), default=0.0)
        if max(sizes, default=0) <= file_limit and sum(sizes) <= budget:
            result = PackResult(packs, left_out=plan.left_out, units=units)
            for pack, bin_units in zip(packs, plan.bins, strict=True):
                for unit in bin_units:
                    for entry in unit.entries:
                        link = unit.links.get(entry.arcname)
                        result.where[entry.arcname] = pack.name + (f" (hard link to {link})" if link else "")
            return result
        # The estimate fell short (deflate across files differs a little): plan again with less room.
        capacity = int(capacity / max(worst, 1.0) * 0.97)
        budget = int(budget * 0.97) if sum(sizes) > budget else budget
    _remove_packs(out_dir)
    raise PackError(f"packs kept coming out over {_mib(file_limit)} per file / {_mib(total_limit)} in all after "
                    f"{attempts} attempts; nothing was left in {out_dir}")


def _remove_packs(out_dir: Path) -> None:
    for path in out_dir.glob(f"{PACK_PREFIX}*.tar.gz"):
        path.unlink()


def is_pack_file(name: str) -> bool:
    """A pack (pack-<k>.tar.gz) or one left half-written (.pack-<k>.tar.gz.tmp) by write_plan."""
    return (name.startswith(PACK_PREFIX) and name.endswith(".tar.gz")) or name.startswith(f".{PACK_PREFIX}")


def check_output_layout(out_dir: Path, *, max_files: int = MAX_FILES, file_limit: int = FILE_LIMIT,
                        total_limit: int = TOTAL_LIMIT, max_depth: int = 2) -> list[Path]:
    """Every file under `out_dir`, refused (PackError) when the layout breaks a limit: too many
    files, one too large, too large together, a name with other characters than letters,
    digits, '.', '_' and '-', or a file deeper than `max_depth` folders."""
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    problems = []
    if len(files) > max_files:
        problems.append(f"{len(files)} files (at most {max_files})")
    total = sum(p.stat().st_size for p in files)
    if total > total_limit:
        problems.append(f"{_mib(total)} in all (at most {_mib(total_limit)})")
    for path in files:
        rel = path.relative_to(out_dir)
        if path.stat().st_size > file_limit:
            problems.append(f"{rel} is {_mib(path.stat().st_size)} (at most {_mib(file_limit)})")
        if len(rel.parts) - 1 > max_depth:
            problems.append(f"{rel} is more than {max_depth} folders deep")
        bad = [part for part in rel.parts if not SAFE_NAME.match(part)]
        if bad:
            problems.append(f"{rel}: the name {bad[0]!r} has characters other than letters, digits, '.', '_', '-'")
    if problems:
        raise PackError(f"{out_dir} breaks the hand-back limits: " + "; ".join(problems))
    return files


def manifest_text(result: PackResult, header: Sequence[str], excluded: Sequence[LeftOut] = (),
                  loose: Sequence[Path] = ()) -> str:
    """The MANIFEST: every file, which pack holds it (or why it was left out)."""
    lines = list(header) + [""]
    lines.append("## Files beside the packs")
    for path in loose:
        lines.append(f"  {path.name}")
    lines.append("")
    lines.append("## Packs (extract with `tar -xzf pack-<k>.tar.gz` in one folder; hard links restore duplicates)")
    for pack in result.packs:
        members = sorted(a for a, w in result.where.items() if w.split(" ")[0] == pack.name)
        lines.append(f"  {pack.name}: {_mib(pack.stat().st_size)}, {len(members)} file(s)")
    lines.append("")
    lines.append("## Every packed file: size, pack, path")
    sizes = {e.arcname: e.source.stat().st_size for u in result.units for e in u.entries}
    for arcname in sorted(result.where):
        lines.append(f"  {sizes[arcname]:>12,}  {result.where[arcname]:<14}  {arcname}")
    left = list(result.left_out) + list(excluded)
    lines.append("")
    lines.append(f"## Left out ({len(left)} file(s)): size, path, why")
    for item in sorted(left, key=lambda x: x.arcname):
        lines.append(f"  {item.size:>12,}  {item.arcname}: {item.reason}")
    return "\n".join(lines) + "\n"
