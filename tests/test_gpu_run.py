"""`matekd gpu-run` (commands/gpu_run/, commands/pack.py), the budget profile and parallel
CIFAR-10-C generation.

The end-to-end runner test runs the budget profile on the CPU with tiny overrides and the real
offline data (MATEKD_CIFAR10, MATEKD_FROST); it is marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from matekd import methods as method_table
from matekd.commands import gpu_run
from matekd.commands.pack import (
    FILE_LIMIT,
    GZIP_SLACK,
    MAX_FILES,
    MIB,
    TOTAL_LIMIT,
    Entry,
    PackError,
    Unit,
    build_units,
    check_output_layout,
    manifest_text,
    pack_outputs,
    plan_packs,
)
from matekd.errors import MatekdError
from matekd.params import load_params
from matekd.training.groups import plan_groups
from matekd.training.students import ablation_specs

ROOT = Path(__file__).resolve().parents[1]
BUDGET = ROOT / "profiles" / "budget.yaml"
SCRIPT = ROOT / "scripts" / "gpu-run.sh"
ARCHIVE = Path(os.environ.get("MATEKD_CIFAR10", "/work/shared/data/cifar10-jpeg.tar.gz"))
FROST = Path(os.environ.get("MATEKD_FROST", "/work/shared/data/frost"))
KIB = 1024


# --------------------------------------------------------------------------------------
# The budget profile


def test_budget_profile_is_the_full_study():
    params = load_params(BUDGET)
    assert params.profile == "budget"
    # 45k train / 5k validation / 10k test: everything left after 500 validation images per class
    assert params.data.train_per_class is None and params.data.val_per_class == 500
    assert params.data.test_per_class is None
    assert set(params.teachers) == {"resnet110", "densenet121", "vgg19_bn"}
    assert params.ablation.methods == list(method_table.METHODS) and len(params.ablation.methods) == 6
    assert len(params.ablation.seeds) == 3
    groups = plan_groups(ablation_specs(params), params.ablation.group_size)
    assert len(groups) == 1 and len(groups[0]) == 18          # every student in one fused network
    c = params.corrupt
    assert (c.source, c.images_per_class, c.corruptions) == ("", None, None) and c.workers > 1
    assert params.distill.teacher_signals == "cached" and params.cache.logit_variants == "used"
    assert params.tracking.mode == "offline"
    # Large batches come with the linearly scaled learning rate and a warm-up.
    # Batches that divide the 45,000 training images: every step has one shape (cuDNN autotunes
    # once, not again for a smaller last batch).
    train_images = 50_000 - 10 * params.data.val_per_class
    for recipe in [*params.teachers.values(), params.distill.recipe]:
        assert recipe.batch_size > 128 and recipe.lr == pytest.approx(0.1 * recipe.batch_size / 128)
        assert recipe.warmup_epochs > 0 and train_images % recipe.batch_size == 0


def test_smoke_overrides_keep_the_profile_but_shrink_it(tmp_path):
    raw = yaml.safe_load(BUDGET.read_text())
    smoke = gpu_run.write_params(tmp_path, raw, gpu_run.smoke_overrides(raw))
    full = load_params(BUDGET)
    assert load_params(tmp_path / "params.yaml") == smoke
    assert smoke.data.train_per_class * 10 <= 100 and smoke.corrupt.images_per_class == 1
    assert all(r.epochs == 1 for r in smoke.teachers.values()) and smoke.distill.recipe.epochs == 1
    assert smoke.corrupt.workers == 2   # the parallel path, on few images
    # the same models, batch sizes, students and group as the run
    assert {n: r.batch_size for n, r in smoke.teachers.items()} == {n: r.batch_size for n, r in full.teachers.items()}
    assert (smoke.ablation, smoke.cache, smoke.distill.data_seed) == (full.ablation, full.cache, full.distill.data_seed)


# --------------------------------------------------------------------------------------
# The packer


def _file(path: Path, size: int, seed: int = 0) -> Path:
    """Incompressible bytes: the packed size is the file size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def _members(pack: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(pack) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_packer_fills_bins_by_priority_and_lists_what_it_left_out(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    entries = [Entry("reports/results.md", _file(src / "a", 30 * KIB, 1), 0, True, "reports"),
               Entry("metrics/m.json", _file(src / "b", 50 * KIB, 2), 1, True, "metrics"),
               Entry("models/student/s.safetensors", _file(src / "c", 60 * KIB, 3), 3, True, "student weights"),
               Entry("models/teachers/small.safetensors", _file(src / "d", 40 * KIB, 4), 5, False, "teacher"),
               Entry("models/teachers/late.safetensors", _file(src / "e", 70 * KIB, 5), 5, False, "teacher"),
               Entry("models/teachers/huge.safetensors", _file(src / "f", 200 * KIB, 6), 5, False, "teacher")]
    result = pack_outputs(entries, out, max_files=2, file_limit=128 * KIB, total_limit=512 * KIB)
    assert [p.name for p in result.packs] == ["pack-1.tar.gz", "pack-2.tar.gz"]
    assert all(p.stat().st_size <= 128 * KIB for p in result.packs)
    # first-fit by priority: reports + metrics open pack 1 (82 KiB), the student weights do not
    # fit beside them and open pack 2, the small teacher fills pack 1's gap, the 70 KiB one
    # finds no room in either, the huge one is over the limit on its own.
    assert set(_members(out / "pack-1.tar.gz")) == {"reports/results.md", "metrics/m.json",
                                                    "models/teachers/small.safetensors"}
    assert set(_members(out / "pack-2.tar.gz")) == {"models/student/s.safetensors"}
    reasons = {item.arcname: item.reason for item in result.left_out}
    assert set(reasons) == {"models/teachers/late.safetensors", "models/teachers/huge.safetensors"}
    assert reasons["models/teachers/late.safetensors"].startswith("no room")
    assert "more than one file may hold" in reasons["models/teachers/huge.safetensors"]
    text = manifest_text(result, ["# test"])
    for entry in entries:
        assert entry.arcname in text
    assert "pack-2.tar.gz   models/student/s.safetensors" in text
    assert "models/teachers/huge.safetensors: " in text.split("## Left out")[1]


def test_packer_stores_duplicates_once_and_keeps_bundles_whole(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    weights = _file(src / "w", 100 * KIB, 7)
    copy = src / "copy"
    copy.write_bytes(weights.read_bytes())
    entries = [Entry("models/student/x.safetensors", weights, 3, True, "student weights"),
               Entry("mlruns-offline/run1/artifacts/x.safetensors", copy, 4, False, "tracking", "mlruns-offline/run1"),
               Entry("mlruns-offline/run1/run.json", _file(src / "r1", 2 * KIB, 8), 4, False, "tracking",
                     "mlruns-offline/run1"),
               Entry("mlruns-offline/run2/run.json", _file(src / "r2", 2 * KIB, 9), 4, False, "tracking",
                     "mlruns-offline/run2"),
               Entry("mlruns-offline/run2/big.npy", _file(src / "r3", 150 * KIB, 10), 4, False, "tracking",
                     "mlruns-offline/run2")]
    units = build_units(entries)
    assert sorted(len(u.entries) for u in units) == [2, 3]    # weights joined with their run's bundle
    result = pack_outputs(entries, out, max_files=3, file_limit=128 * KIB, total_limit=512 * KIB)
    # run2 (152 KiB) cannot fit whole, so none of it is packed; the weights are stored once.
    assert {i.arcname for i in result.left_out} == {"mlruns-offline/run2/run.json", "mlruns-offline/run2/big.npy"}
    assert all("kept whole with mlruns-offline/run2" in i.reason for i in result.left_out)
    assert len(result.packs) == 1 and result.packs[0].stat().st_size < 110 * KIB
    members = _members(result.packs[0])
    assert members["mlruns-offline/run1/artifacts/x.safetensors"].islnk()
    target = tmp_path / "unpacked"
    with tarfile.open(result.packs[0]) as tar:
        tar.extractall(target, filter="data")
    for entry in entries[:3]:
        assert (target / entry.arcname).read_bytes() == entry.source.read_bytes()


def test_packer_refuses_an_impossible_layout(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    too_big = [Entry("models/student/a.safetensors", _file(src / "a", 200 * KIB, 1), 3, True, "student weights")]
    with pytest.raises(PackError, match="models/student/a.safetensors"):
        pack_outputs(too_big, out, max_files=8, file_limit=128 * KIB, total_limit=1024 * KIB)
    too_many = [Entry(f"metrics/{k}.json", _file(src / f"m{k}", 100 * KIB, k), 1, True, "metrics") for k in range(3)]
    with pytest.raises(PackError, match="cannot pack the required outputs within 2 file"):
        plan_packs(build_units(too_many), max_packs=2, file_limit=128 * KIB, total_limit=1024 * KIB)
    assert not list(out.glob("pack-*"))


def test_packer_never_leaves_a_pack_over_the_limit(tmp_path):
    """An estimate that is far too low makes the packs come out too large: refused, nothing kept."""
    src, out = tmp_path / "src", tmp_path / "out"
    entries = [Entry(f"plots/{k}.bin", _file(src / f"p{k}", 60 * KIB, k), 2, True, "plots") for k in range(4)]
    with pytest.raises(PackError, match="larger than their estimates"):
        pack_outputs(entries, out, max_files=8, file_limit=128 * KIB, total_limit=1024 * KIB, estimate=lambda p: 1)
    assert not list(out.iterdir())


def test_output_layout_check(tmp_path):
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "ok.txt").write_text("x")
    check_output_layout(tmp_path)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    with pytest.raises(PackError) as err:
        check_output_layout(tmp_path)
    assert "more than 2 folders deep" in str(err.value) and "'bad name.txt'" in str(err.value)
    for k in range(8):
        (tmp_path / f"f{k}").write_bytes(b"x")
    with pytest.raises(PackError, match="files \\(at most 8\\)"):
        check_output_layout(tmp_path)


def _sized(path: Path, size: int) -> Path:
    """A sparse file of `size` bytes: the limits are about bytes on the list, not disk blocks."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def test_pack_limits_are_the_device_limits():
    """The device hands back at most 8 files of 16 MiB, 64 MiB together; every caller's default
    is those numbers (a looser default would only show on the GPU machine, losing the run)."""
    import inspect

    assert (MAX_FILES, FILE_LIMIT, TOTAL_LIMIT) == (8, 16 * MIB, 64 * MIB)
    for function in (pack_outputs, check_output_layout, gpu_run.run_gpu):
        defaults = {k: p.default for k, p in inspect.signature(function).parameters.items()}
        assert (defaults["max_files"], defaults["file_limit"], defaults["total_limit"]) == (8, 16 * MIB, 64 * MIB)
    assert inspect.signature(check_output_layout).parameters["max_depth"].default == 2


def test_output_layout_refuses_one_byte_over_the_default_limits(tmp_path):
    ok = _sized(tmp_path / "ok" / "pack-1.tar.gz", FILE_LIMIT)
    assert check_output_layout(ok.parent) == [ok]                       # exactly at the limit: fine
    over = _sized(tmp_path / "over" / "pack-1.tar.gz", FILE_LIMIT + 1)
    with pytest.raises(PackError, match="pack-1.tar.gz is 16.0 MiB \\(at most 16.0 MiB\\)"):
        check_output_layout(over.parent)
    # 64 MiB together is fine, one byte more is not (each file within its own limit)
    total = tmp_path / "total"
    files = [_sized(total / f"pack-{k}.tar.gz", FILE_LIMIT) for k in range(1, 5)]
    assert check_output_layout(total) == files
    _sized(total / "MANIFEST.txt", 1)
    with pytest.raises(PackError, match="in all \\(at most 64.0 MiB\\)"):
        check_output_layout(total)


@pytest.mark.parametrize("limit", ["file", "total", "files", "depth"])
def test_output_layout_refuses_one_over_each_small_limit(tmp_path, limit):
    limits = {"max_files": 3, "file_limit": 100, "total_limit": 250, "max_depth": 1}
    ok = tmp_path / "ok"
    _sized(ok / "a", 100)
    _sized(ok / "sub" / "b", 100)
    _sized(ok / "c", 50)
    check_output_layout(ok, **limits)                                   # every limit met exactly
    over = tmp_path / "over"
    if limit == "file":
        _sized(over / "a", 101)
        expected = "a is 0 KiB \\(at most 0 KiB\\)"
    elif limit == "total":
        _sized(over / "a", 100)
        _sized(over / "b", 100)
        _sized(over / "c", 51)
        expected = "in all"
    elif limit == "files":
        for name in "abcd":
            _sized(over / name, 1)
        expected = "4 files \\(at most 3\\)"
    else:
        _sized(over / "sub" / "deeper" / "a", 1)
        expected = "more than 1 folders deep"
    with pytest.raises(PackError, match=expected) as err:
        check_output_layout(over, **limits)
    assert str(err.value).count(";") == 0                               # that limit alone was broken


def test_packer_refuses_a_loose_file_one_byte_over_the_limit(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    entries = [Entry("reports/r.md", _file(src / "r", 1 * KIB, 1), 0, True, "reports")]
    loose = _sized(out / "timings.json", 64 * KIB)
    pack_outputs(entries, out, loose=[loose], max_files=3, file_limit=64 * KIB, total_limit=512 * KIB)
    _sized(loose, 64 * KIB + 1)
    with pytest.raises(PackError, match="timings.json is 64 KiB, over the 64 KiB file limit"):
        pack_outputs(entries, out, loose=[loose], max_files=3, file_limit=64 * KIB, total_limit=512 * KIB)


def test_plan_places_a_unit_of_exactly_the_capacity_and_refuses_one_byte_more(tmp_path):
    source = _file(tmp_path / "w", 10, 1)

    def unit(name: str, estimate: int, required: bool = True) -> Unit:
        return Unit([Entry(name, source, 3, required, "student weights")], {}, estimate)

    capacity = 64 * KIB - GZIP_SLACK                                    # the default room of a pack
    plan = plan_packs([unit("a", capacity)], max_packs=1, file_limit=64 * KIB, total_limit=1024 * KIB)
    assert [[u.arcname for u in b] for b in plan.bins] == [["a"]] and not plan.left_out
    with pytest.raises(PackError, match="a \\(student weights, .*more than one file may hold"):
        plan_packs([unit("a", capacity + 1)], max_packs=1, file_limit=64 * KIB, total_limit=1024 * KIB)
    # the total counts every pack's gzip slack, also that of the pack a unit would open
    total = 100 * KIB
    fits = total - 2 * GZIP_SLACK - capacity
    two = [unit("a", capacity), unit("b", fits)]
    assert len(plan_packs(two, max_packs=2, file_limit=64 * KIB, total_limit=total).bins) == 2
    one_more = [unit("a", capacity), unit("b", fits + 1, required=False)]
    plan = plan_packs(one_more, max_packs=2, file_limit=64 * KIB, total_limit=total)
    assert [i.arcname for i in plan.left_out] == ["b"] and plan.left_out[0].reason.startswith("no room")
    assert "allowed in all" in plan.left_out[0].reason
    with pytest.raises(PackError, match="cannot pack the required outputs within 1 file"):
        plan_packs([unit("a", 10), unit("b", 10)], max_packs=1, file_limit=64 * KIB, total_limit=10 + GZIP_SLACK)


# --------------------------------------------------------------------------------------
# Parallel CIFAR-10-C


def test_parallel_corruption_is_byte_identical_to_serial(tmp_path):
    from matekd.stages.corrupt import run_corrupt

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 2)
    prepared = SimpleNamespace(test_images=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8),
                               test_labels=labels, test_index=np.arange(20), manifest={"source": {"kind": "test"}},
                               manifest_hash="0" * 64)
    written = {}
    for workers in (1, 2):
        params = load_params(BUDGET, {"corrupt.workers": workers, "corrupt.images_per_class": 1,
                                      "corrupt.frost_dir": str(FROST) if FROST.is_dir() else "", "device": "cpu"})
        out = tmp_path / f"w{workers}"
        manifest = run_corrupt(params, out_dir=out, prepared=prepared, progress=False)
        assert manifest.get("workers", 1) == workers
        written[workers] = {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}
    assert len(written[1]) == (20 if FROST.is_dir() else 19)   # 19 corruptions (frost if found) + labels
    assert written[1] == written[2]


# --------------------------------------------------------------------------------------
# The runner


def _script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", **extra)
    return env


def test_runner_fails_before_running_anything_without_the_archive(tmp_path):
    env = {**os.environ, "MATEKD_CIFAR10": str(tmp_path / "missing.tar.gz")}
    with pytest.raises(MatekdError, match="MATEKD_CIFAR10=.*missing.tar.gz: no such file"):
        gpu_run.run_gpu(BUDGET, tmp_path / "out", work_dir=tmp_path / "work", environ=env)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()
    env.pop("MATEKD_CIFAR10")
    with pytest.raises(MatekdError, match="MATEKD_CIFAR10 is not set"):
        gpu_run.run_gpu(BUDGET, tmp_path / "out", work_dir=tmp_path / "work", environ=env)


def test_runner_stops_at_a_failing_smoke_pass(tmp_path):
    broken = tmp_path / "cifar10-jpeg.tar.gz"
    broken.write_text("not an archive")
    tic = time.monotonic()
    proc = subprocess.run([str(SCRIPT), str(BUDGET), str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                           "-S", "device=cpu"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=_script_env(MATEKD_CIFAR10=str(broken), MATEKD_FROST=str(FROST)))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "smoke pass failed, the run was not started" in proc.stderr
    assert "truncated or corrupt" in proc.stderr            # the stage's own message, from its log
    assert time.monotonic() - tic < 120
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timings["status"] == "smoke failed"
    assert not {"teachers", "caches", "ablation"} & set(timings["phases"])
    assert (tmp_path / "out" / "MANIFEST.txt").is_file()    # the logs still come back


@pytest.mark.skipif(not ARCHIVE.is_file(), reason="needs the offline CIFAR-10 mirror")
def test_runner_stops_at_the_time_limit_and_still_hands_back(tmp_path):
    # 32 s less the 30 s kept for packing: the stages are stopped 2 s in (during fetch/prepare).
    blocker, blocked = import_blocker(tmp_path / "blocker")
    proc = subprocess.run([str(SCRIPT), str(BUDGET), str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"),
                           "--no-smoke", "--time-limit", "32", "-S", "device=cpu"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300,
                          env=_script_env(MATEKD_CIFAR10=str(ARCHIVE), MATEKD_FROST=str(FROST), PYTHONPATH=blocker))
    _no_blocked_imports(blocked)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "the time limit ran out while running" in proc.stderr
    timings = json.loads((tmp_path / "out" / "timings.json").read_text())
    assert timings["status"] == "time limit"
    assert any(s["status"] == "stopped: time limit" for s in timings["stages"])
    manifest = (tmp_path / "out" / "MANIFEST.txt").read_text()
    assert "status: time limit" in manifest and "gpu-run/runner.log" in manifest


# --------------------------------------------------------------------------------------
# The results table of a run cut short


def _json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def test_results_table_of_a_cut_run_shows_every_finished_number(tmp_path):
    """Evaluated models from metrics/eval-partial/ (evaluate was stopped), the others with their
    training-time test accuracy (marked *), the untrained left blank; the lines below say so."""
    from matekd.commands.gpu_run.outputs import results_table

    recipe = {"epochs": 1, "batch_size": 16, "lr": 0.05}
    params = load_params(BUDGET, {"teachers": {"resnet20": recipe, "resnet56": recipe},
                                  "distill.kd_teacher": "resnet20", "ablation.methods": ["ce", "kd"],
                                  "ablation.seeds": [0, 1]})
    label = {"dataset": "CIFAR-10 (JPEG q75 mirror)", "corruption_dataset": "CIFAR-10-C (regenerated, seed 0)"}
    for seed, (acc, c) in enumerate([(0.80, 0.60), (0.84, 0.64)]):
        _json(tmp_path / "metrics" / "eval-partial" / f"student-ce-seed{seed}.json",
              {"model": f"student-ce-seed{seed}", "test_acc": acc, "cifar10c": {"standard_mean": c}, **label})
        _json(tmp_path / "metrics" / "student" / f"ce-seed{seed}.json", {"test_acc": 0.5})   # evaluate's wins
    _json(tmp_path / "metrics" / "student" / "kd-seed0.json", {"test_acc": 0.70})          # kd-seed1: not trained
    _json(tmp_path / "metrics" / "teachers" / "resnet20.json", {"test_acc": 0.90})
    _json(tmp_path / "metrics" / "teachers" / "resnet56.json", {"test_acc": 0.92})
    _json(tmp_path / "metrics" / "eval-partial" / "resnet56.json",
          {"model": "resnet56", "test_acc": 0.93, "cifar10c": {"standard_mean": 0.70}, **label})
    table = results_table(tmp_path, params, stopped="the time limit ran out while running evaluate: evaluate")
    rows = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()[3:] if "  " in line}
    assert rows["resnet20 (teacher)"][-2:] == ["90.00*", "-"]
    assert rows["resnet56 (teacher)"][-2:] == ["93.00", "70.00"]
    assert " ".join(rows["ce"][1:]) == "2/2 82.00 ± 2.83 62.00 ± 2.83"
    assert " ".join(rows["kd"][1:]) == "1/2 70.00* -"
    assert table.splitlines()[0].startswith("Results (budget; CIFAR-10 (JPEG q75 mirror); CIFAR-10-C (regenerated")
    cut = [line for line in table.splitlines() if line.startswith("Cut:")]
    assert cut == ["Cut: the run stopped early (the time limit ran out while running evaluate: evaluate)",
                   "Cut: not evaluated (2 of 6 models; no CIFAR-10-C, CIFAR-10 * = test accuracy at the end of "
                   "training): resnet20, student-kd-seed0",
                   "Cut: not trained (1 of 6 models; no number): student-kd-seed1"]
    # metrics/eval (a finished evaluate) is read before eval-partial; a whole run says nothing was cut
    for name, acc in (("resnet20", 0.91), ("resnet56", 0.93), ("student-kd-seed0", 0.7), ("student-kd-seed1", 0.72)):
        _json(tmp_path / "metrics" / "eval" / f"{name}.json",
              {"model": name, "test_acc": acc, "cifar10c": {"standard_mean": 0.5}, **label})
    table = results_table(tmp_path, params)
    assert "Cut" not in table and "*" not in table and "91.00" in table


# --------------------------------------------------------------------------------------
# The GPUs' compute mode and free memory (pre-flight)

NVIDIA_SMI = """0, NVIDIA H200, Default, 140123, 143771
1, NVIDIA H200, Exclusive_Process, 2000, 143771
2, NVIDIA H200, Default, [N/A], [N/A]
"""


def test_gpu_states_are_read_from_nvidia_smi():
    from matekd.commands.gpu_run.measure import GpuState, parse_gpu_states

    states = parse_gpu_states(NVIDIA_SMI + "\nWARNING: infoROM is corrupted at gpu 0000:00:00.0\n")
    assert states == [GpuState("0", "NVIDIA H200", "Default", 140123, 143771),
                      GpuState("1", "NVIDIA H200", "Exclusive_Process", 2000, 143771),
                      GpuState("2", "NVIDIA H200", "Default", None, None)]
    assert states[0].line() == "GPU 0 (NVIDIA H200): compute mode Default, 140,123 MiB free of 143,771 MiB"
    assert states[2].line().endswith("free memory unknown")


def test_preflight_checks_compute_mode_and_free_memory():
    from matekd.commands.gpu_run.command import check_gpus
    from matekd.commands.gpu_run.measure import parse_gpu_states

    states = parse_gpu_states(NVIDIA_SMI)
    assert check_gpus("cpu", states) == ([], False)           # the CPU: nothing asked, nothing said
    lines, one_at_a_time = check_gpus("auto", states[:1])
    assert lines == [states[0].line()] and not one_at_a_time
    lines, one_at_a_time = check_gpus("cuda", states)
    assert one_at_a_time and any("run one at a time" in line for line in lines)
    assert any(line.startswith("warning: GPU 1: 141,771 MiB already in use") for line in lines)
    assert not any("GPU 0:" in line and "warning" in line for line in lines)
    assert check_gpus("cuda", states, visible="0,2")[1] is False   # the exclusive GPU is hidden
    assert check_gpus("cuda", None) == (["GPUs: nvidia-smi not available; compute mode and free memory unknown"],
                                        False)
    assert "on the CPU" in check_gpus("auto", [])[0][0]
    with pytest.raises(MatekdError, match="lists no GPU"):
        check_gpus("cuda", [])
    prohibited = parse_gpu_states("0, NVIDIA H200, Prohibited, 140000, 143771\n")
    with pytest.raises(MatekdError, match="GPU 0 is in compute mode Prohibited"):
        check_gpus("auto", prohibited)


class _RecordingRunner:
    """Stands in for StageRunner: records which stages were started together."""

    def __init__(self):
        self.batches: list[tuple[str, list[str]]] = []

    def run_all(self, phase, commands, cwd, envs):
        self.batches.append((phase, [name for name, _ in commands]))

    def start(self, phase, name, args, cwd, env):
        self.batches.append((phase, [name]))

    def wait(self, *jobs):
        pass


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_an_exclusive_gpu_runs_the_teachers_and_caches_one_at_a_time(tmp_path, one_at_a_time):
    from matekd.commands.gpu_run.plan import PIPELINE, Project, run_pipeline

    params = SimpleNamespace(device="cuda", teachers={"a": None, "b": None}, ablation=SimpleNamespace(methods=["ce"]))
    project = Project(tmp_path, params, {"CUDA_VISIBLE_DEVICES": "0"}, one_at_a_time)
    runner = _RecordingRunner()
    run_pipeline(runner, project, [], corrupt=None)
    teachers = [names for phase, names in runner.batches if phase == "teachers"]
    caches = [names for phase, names in runner.batches if phase == "caches"]
    if one_at_a_time:
        assert teachers == [["train-teacher a"], ["train-teacher b"]] and caches == [["cache a"], ["cache b"]]
    else:
        assert teachers == [["train-teacher a", "train-teacher b"]] and caches == [["cache a", "cache b"]]
    assert [p for p, _ in runner.batches][-4:] == ["ablation", "evaluate", "report", "bench"]
    # in PIPELINE's order (prepare and corrupt are started before, by run_plan)
    assert list(dict.fromkeys(p for p, _ in runner.batches)) == [
        p for p, _, _ in PIPELINE if p not in ("prepare", "corrupt")]


def _dvc_paths(entries) -> list[str]:
    """The paths of a dvc.yaml deps, outs, metrics or plots list (a path, or {path: options})."""
    return [e if isinstance(e, str) else next(iter(e)) for e in entries or ()]


def _overlap(a: str, b: str) -> bool:
    """One path is the other or inside it (a ${...} part stands for any name)."""
    return all(x == y or "${" in x + y for x, y in zip(a.split("/"), b.split("/")))


def test_the_runners_stage_order_is_one_dvc_yaml_allows():
    """PIPELINE, the runner's one list of stages, against dvc.yaml: every DVC stage but distill
    (the one configured student; ablation trains every method's) and bench (not a DVC stage),
    each after the stages whose outputs it reads; and nothing the background corrupt writes is
    read before evaluate, which waits for it."""
    from matekd.commands.gpu_run.plan import PIPELINE

    stages = {name: stage.get("do", stage) for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())[
        "stages"].items()}
    order = [command.replace("-", "_") for _, command, _ in PIPELINE]
    assert set(stages) - set(order) == {"distill"} and set(order) - set(stages) == {"bench"}
    outs = {name: [p for key in ("outs", "metrics", "plots") for p in _dvc_paths(stage.get(key))]
            for name, stage in stages.items()}

    def makers(stage: str) -> set[str]:
        """The DVC stages whose outputs `stage` reads."""
        return {other for other, paths in outs.items() if other != stage
                for dep in _dvc_paths(stages[stage]["deps"]) if any(_overlap(dep, p) for p in paths)}

    for k, stage in enumerate(order):
        if stage in stages:
            assert makers(stage) - {"distill"} <= set(order[:k]), (stage, makers(stage))
    assert makers("evaluate") >= {"corrupt", "train_teacher", "ablation"}         # the check sees deps
    background = order[order.index("corrupt") + 1:order.index("evaluate")]
    assert background and not any("corrupt" in makers(stage) for stage in background)


# --------------------------------------------------------------------------------------
# The plan: the smoke pass beside the run, fail fast

FAKE_PYTHON = """#!/usr/bin/env bash
# Stands in for `python -m matekd.cli <stage> ...`: sleeps FAKE_DELAY; fails the stage FAKE_FAIL.
stage="$3"
if [[ "$stage" == "$FAKE_FAIL" ]]; then echo "fake failure of $stage"; exit 1; fi
if [[ "$stage" == fetch ]]; then exec sleep "${FAKE_FETCH_DELAY:-$FAKE_DELAY}"; fi
exec sleep "$FAKE_DELAY"   # exec: stopping the stage stops the sleep
"""


def _fake_plan(tmp_path, one_at_a_time=False, smoke_fail="", main_delay="0.6"):
    from matekd.commands.gpu_run.plan import Project
    from matekd.commands.gpu_run.runner import StageRunner

    python = tmp_path / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    record = tmp_path / "record"
    record.mkdir()
    params = SimpleNamespace(device="cpu", teachers={"a": None, "b": None}, ablation=SimpleNamespace(methods=["ce"]))
    projects = []
    main_env = {"FAKE_DELAY": main_delay, "FAKE_FETCH_DELAY": "0.6"}
    for name, env in (("main", main_env), ("smoke", {"FAKE_DELAY": "0.2", "FAKE_FAIL": smoke_fail})):
        (tmp_path / name).mkdir()
        projects.append(Project(tmp_path / name, params, {**os.environ, **env}, one_at_a_time))
    return StageRunner(record, projects[0].env, python=str(python)), *projects


def _intervals(runner, phase):
    return [(t["start_s"], t["end_s"], t["stage"]) for t in runner.timings if t["phase"] == phase]


def test_the_smoke_pass_runs_beside_the_run(tmp_path, capsys):
    from matekd.commands.gpu_run.plan import run_plan, smoke_steps

    runner, main, smoke = _fake_plan(tmp_path)
    run_plan(runner, main, smoke, gpu_run.BenchOptions())
    smoke_runs = _intervals(runner, "smoke")
    assert [stage for _, _, stage in smoke_runs].count("ablation") == 1 and len(smoke_runs) == 1 + sum(
        len(step) for step in smoke_steps(smoke))                                  # fetch + every stage
    # each smoke step starts after the one before it has ended
    steps = [{name for name, _ in step} for step in smoke_steps(smoke)]
    ends = {stage: end for _, end, stage in smoke_runs}
    starts = {stage: start for start, _, stage in smoke_runs}
    for before, after in zip(steps, steps[1:]):
        assert min(starts[n] for n in after) >= max(ends[n] for n in before)
    # ... while the run's teachers train: the smoke pass no longer comes first
    teachers = _intervals(runner, "teachers")
    assert min(s for s, _, _ in teachers) < max(e for _, e, _ in smoke_runs)
    assert "smoke pass ok" in capsys.readouterr().out
    assert all(t["status"] == "ok" for t in runner.timings)
    (report,), (bench,) = _intervals(runner, "report"), _intervals(runner, "bench")
    assert bench[0] < report[1] and report[0] < bench[1]                 # together, after evaluate
    assert min(report[0], bench[0]) >= max(e for _, e, _ in _intervals(runner, "evaluate"))


@pytest.mark.parametrize(("stage", "name"), [("prepare", "prepare"), ("method-inputs", "method-inputs ce")])
def test_a_smoke_stage_failing_beside_the_run_stops_everything(tmp_path, stage, name):
    from matekd.commands.gpu_run.plan import SmokeFailed, run_plan

    # The run's stages last long enough that one is surely in flight when the smoke stage fails,
    # however loaded the machine (at 0.6 s a busy CI box could finish them all first).
    runner, main, smoke = _fake_plan(tmp_path, smoke_fail=stage, main_delay="30")
    with pytest.raises(SmokeFailed, match=f"smoke pass failed, the run was stopped: smoke stage `{name}`"):
        run_plan(runner, main, smoke, gpu_run.BenchOptions())
    assert not runner.running
    statuses = {(t["phase"], t["stage"]): t["status"] for t in runner.timings}
    assert statuses[("smoke", name)].startswith("failed")
    assert "stopped: another stage failed" in statuses.values()                  # the run's stages too
    assert not any(phase in ("ablation", "evaluate") for phase, _ in statuses)


def test_an_exclusive_gpu_runs_the_smoke_pass_first(tmp_path):
    from matekd.commands.gpu_run.plan import run_plan

    runner, main, smoke = _fake_plan(tmp_path, one_at_a_time=True)
    run_plan(runner, main, smoke, gpu_run.BenchOptions())
    assert max(e for _, e, _ in _intervals(runner, "smoke")) <= min(s for s, _, _ in _intervals(runner, "teachers"))
    (report,), (bench,) = _intervals(runner, "report"), _intervals(runner, "bench")
    assert bench[0] >= report[1]                                 # one process on the GPU at a time


# --------------------------------------------------------------------------------------
# The runner on the device image: no mlflow, dvc or optuna

BLOCKED_PACKAGES = ("mlflow", "dvc", "optuna")
IMPORT_BLOCKER = """
# Test-only: every Python process started with this folder on PYTHONPATH runs this first. An
# import of mlflow, dvc or optuna fails as on the GPU machine, and is logged with the code that
# tried it, so that an import that a try/except swallows is still seen.
import os
import sys

BLOCKED = {blocked!r}


def _caller():
    frame = sys._getframe(2)
    while frame is not None and "importlib" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "?"
    code = frame.f_code   # with optional_module's argument: the module it was asked for
    return f"{{code.co_name}} {{frame.f_locals.get('name', '')}} ({{code.co_filename}}:{{frame.f_lineno}})"


class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            with open({log!r}, "a") as handle:
                handle.write(f"{{os.getpid()}} {{name}} from {{_caller()}} in {{' '.join(sys.argv)}}\\n")
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU machine has none)", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""


def import_blocker(folder: Path, extra: str = "") -> tuple[str, Path]:
    """(a PYTHONPATH entry whose sitecustomize blocks mlflow, dvc and optuna, the log of tries);
    `extra` is more code for that sitecustomize (a process reads only one)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "blocked-imports.log"
    (folder / "sitecustomize.py").write_text(IMPORT_BLOCKER.format(blocked=BLOCKED_PACKAGES, log=str(log)) + extra)
    return str(folder), log


def test_the_import_blocker_blocks(tmp_path):
    """The blocker itself: without this check a broken blocker would let every runner test pass."""
    path, log = import_blocker(tmp_path / "blocker")
    for name in [*BLOCKED_PACKAGES, "dvc.repo"]:
        proc = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": path})
        assert proc.returncode == 1 and "blocked: the GPU machine has none" in proc.stderr, name
    assert [line.split(" ")[1] for line in log.read_text().splitlines()] == ["mlflow", "dvc", "optuna", "dvc"]
    with pytest.raises(AssertionError, match="imports what the GPU machine lacks"):
        _no_blocked_imports(log)                   # and the check of the log sees them
    ok = subprocess.run([sys.executable, "-c", "import yaml"], env={**os.environ, "PYTHONPATH": path})
    assert ok.returncode == 0


def test_offline_tracking_tries_mlflow_once_per_module_without_it(tmp_path):
    path, log = import_blocker(tmp_path / "blocker")
    code = ("from matekd.tracking.interface import name_problem\n"
            "assert [name_problem('metric', k) for k in ('a', 'b', 'c')] == [None] * 3\n"
            "assert 'letters' not in (name_problem('metric', 'bad|key') or 'letters')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), path])})
    assert proc.returncode == 0, proc.stderr
    (line,) = log.read_text().splitlines()          # four keys checked, one try
    assert " from optional_module mlflow.utils.validation " in line
    _no_blocked_imports(log)


def _no_blocked_imports(log: Path) -> None:
    """No process tried dvc or optuna, nor mlflow other than through tracking's optional_module
    (its fallback where mlflow is missing), and that only once per module and process (Python
    does not remember a failed import; a retry per logged key would cost every step)."""
    lines = log.read_text().splitlines() if log.exists() else []
    stray = [line for line in lines if line.split(" ")[1] != "mlflow" or line.split(" ")[3] != "optional_module"]
    assert not stray, "the GPU path imports what the GPU machine lacks:\n" + "\n".join(stray[:20])
    tries = [(line.split(" ")[0], line.split(" ")[4]) for line in lines]     # (pid, module asked for)
    assert len(tries) == len(set(tries)), "\n".join(lines[:20])


CPU_OVERRIDES = [
    "device=cpu", "data.train_per_class=6", "data.val_per_class=2", "data.test_per_class=3",
    "teachers={resnet20: {epochs: 1, batch_size: 16, lr: 0.05}, resnet56: {epochs: 1, batch_size: 16, lr: 0.05}}",
    "distill.kd_teacher=resnet20", "distill.recipe.epochs=1", "distill.recipe.batch_size=16",
    "distill.recipe.eval_batch_size=64", "ablation.seeds=[0]", "cache.batch_size=64", "corrupt.images_per_class=1",
    "corrupt.workers=2", "evaluate.batch_size=64", "evaluate.gradcam_images=4", "evaluate.grid_images=2",
]


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file() or not FROST.is_dir(), reason="needs the offline CIFAR-10 mirror and frost")
def test_runner_on_cpu_packs_everything_within_the_limits(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    blocker, blocked = import_blocker(tmp_path / "blocker")       # the device image: no mlflow, dvc, optuna
    command = [str(SCRIPT), str(BUDGET), str(out), "--work-dir", str(work), "--no-smoke",
               "--bench-batch-size", "8", "--bench-repeats", "1", "--bench-warmup", "1", "--bench-together", "2"]
    for pair in CPU_OVERRIDES:
        command += ["-S", pair]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=_script_env(MATEKD_CIFAR10=str(ARCHIVE), MATEKD_FROST=str(FROST), PYTHONPATH=blocker))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    _no_blocked_imports(blocked)
    files = check_output_layout(out)                    # <= 8 files, <= 16 MiB, <= 64 MiB, <= 2 deep
    names = sorted(p.name for p in files)
    packs = [p for p in files if p.name.startswith("pack-")]
    assert {"MANIFEST.txt", "timings.json", "results.txt"} <= set(names) and packs
    assert all(p.stat().st_size <= 16 * MIB for p in files) and len(files) <= 8

    # The results table comes last: both teachers and every method, mean over seeds.
    tail = proc.stdout.rstrip().splitlines()[-10:]
    assert any("CIFAR-10-C-15 (%)" in line for line in tail)
    for name in ["resnet20 (teacher)", "resnet56 (teacher)", *method_table.METHODS]:
        assert any(line.startswith(name) for line in tail), name

    timings = json.loads((out / "timings.json").read_text())
    assert timings["status"] == "ok"
    assert {"prepare", "corrupt", "teachers", "caches", "method-inputs", "ablation", "evaluate", "report",
            "bench"} <= set(timings["phases"])
    assert timings["epochs"]["student_groups"]["group1"]["students"] and timings["paper_extrapolation"]["total_seconds"]
    clock = timings["clock"]["phases"]           # the plan's prediction beside what each phase took
    assert set(clock) == {"teachers", "caches", "method-inputs", "ablation", "evaluate", "report", "bench"}
    assert all(c["predicted_s"] > 0 and c["measured_s"] == timings["phases"][p]["seconds"] for p, c in clock.items())
    assert "Predicted vs measured seconds per phase:" in proc.stdout and "plan (H100 rates" in proc.stdout

    # Every packed file is in the MANIFEST with its pack; unpacked, the outputs are the run's own.
    manifest = (out / "MANIFEST.txt").read_text()
    unpacked = tmp_path / "unpacked"
    for pack in packs:
        for name in _members(pack):
            assert f"{pack.name}" in manifest and name in manifest
        with tarfile.open(pack) as tar:
            tar.extractall(unpacked, filter="data")
    main = work / "main"
    for rel in ["reports/results.md", "metrics/summary.json", "plots/student/ce-seed0.csv",
                "models/student/mate_kd-seed0.safetensors", "models/teachers/resnet56.safetensors"]:
        assert (unpacked / rel).read_bytes() == (main / rel).read_bytes(), rel
    assert (unpacked / "gpu-run" / "logs" / "ablation" / "ablation.log").is_file()
    assert "cifar10c/frost.npy" in manifest and "rebuilds it bit for bit" in manifest   # left out, with why
    from matekd.tracking import read_folder

    runs = read_folder(unpacked / "mlruns-offline")          # complete runs: sync-runs can import them
    assert {r.meta["run_name"].split(" ")[0] for r in runs.values()} >= {"teacher", "ablation", "evaluate"}


# Test-only, appended to the blocker's sitecustomize: the time limit falls inside evaluate, after
# the students were evaluated and while the first teacher is. The evaluate process waits there
# (its second corruption_table call), and the runner process, once all CUT_STUDENTS students'
# results are in metrics/eval-partial/, finds its deadline passed: the runner's own time-limit path, at a
# moment a wall-clock limit on a shared CPU could not pick.
CUT_INSIDE_EVALUATE = """

import importlib.util
import time


def _after_import(name, patch):
    class _Finder:
        def find_spec(self, fullname, path=None, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())


def _wait_at_the_first_teacher(module):
    table, calls = module.corruption_table, []

    def corruption_table(models, *args, **kwargs):
        calls.append(list(models))
        if len(calls) == 2:
            time.sleep(3600)      # stopped by the runner
        return table(models, *args, **kwargs)

    module.corruption_table = corruption_table


def _deadline_once_students_are_evaluated(module):
    poll = module.StageRunner.poll

    def patched(self):
        poll(self)
        partial = os.path.join(os.environ["CUT_PROJECT"], "metrics", "eval-partial")
        evaluate = [job for job in self.running if job.name == "evaluate"]
        done = os.path.isdir(partial) and sum(name.startswith("student-") for name in os.listdir(partial)) == int(
            os.environ["CUT_STUDENTS"])
        # (or after 5 minutes of evaluate: without per-model results the test fails, not hangs)
        if evaluate and (done or self.elapsed() - evaluate[0].started > 300):
            self.deadline = time.monotonic() - 1

    module.StageRunner.poll = patched


_after_import("matekd.stages.evaluate", _wait_at_the_first_teacher)
_after_import("matekd.commands.gpu_run.runner", _deadline_once_students_are_evaluated)
"""


@pytest.mark.slow
@pytest.mark.skipif(not ARCHIVE.is_file() or not FROST.is_dir(), reason="needs the offline CIFAR-10 mirror and frost")
def test_runner_stopped_inside_evaluate_packs_every_finished_number(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    blocker, blocked = import_blocker(tmp_path / "blocker", CUT_INSIDE_EVALUATE)
    command = [str(SCRIPT), str(BUDGET), str(out), "--work-dir", str(work), "--no-smoke", "--time-limit", "3600"]
    for pair in CPU_OVERRIDES:
        command += ["-S", pair]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                          env=_script_env(MATEKD_CIFAR10=str(ARCHIVE), MATEKD_FROST=str(FROST), PYTHONPATH=blocker,
                                          CUT_PROJECT=str(work / "main"), CUT_STUDENTS=str(len(method_table.METHODS))))
    assert proc.returncode == 2, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "the time limit ran out while running evaluate" in proc.stderr
    _no_blocked_imports(blocked)
    check_output_layout(out)
    timings = json.loads((out / "timings.json").read_text())
    assert timings["status"] == "time limit"
    assert [s["status"] for s in timings["stages"] if s["phase"] == "evaluate"] == ["stopped: time limit"]
    assert not {"report", "bench"} & set(timings["phases"])
    assert timings["clock"]["phases"]["report"]["measured_s"] is None

    # The table: the students' CIFAR-10 and CIFAR-10-C (evaluated before the cut), the teachers'
    # training-time test accuracy (marked *), and what was cut.
    table = (out / "results.txt").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip())          # printed last, as results.txt
    rows = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()[3:] if "  " in line}
    for teacher in ("resnet20", "resnet56"):
        test_acc, c_acc = rows[f"{teacher} (teacher)"][-2:]
        assert test_acc.endswith("*") and 0 <= float(test_acc[:-1]) <= 100 and c_acc == "-"
    for method in method_table.METHODS:
        seeds, test_acc, c_acc = rows[method][1:]
        assert seeds == "1/1" and 0 <= float(test_acc) <= 100 and 0 <= float(c_acc) <= 100, rows[method]
    assert "Cut: the run stopped early (the time limit ran out while running evaluate" in table
    assert "Cut: not evaluated (2 of 8 models; no CIFAR-10-C, CIFAR-10 * = test accuracy at the end of " \
           "training): resnet20, resnet56" in table

    # The per-model results that table was made of came back in the packs.
    unpacked = tmp_path / "unpacked"
    for pack in out.glob("pack-*.tar.gz"):
        with tarfile.open(pack) as tar:
            tar.extractall(unpacked, filter="data")
    partial = sorted(p.name for p in (unpacked / "metrics" / "eval-partial").iterdir())
    assert partial == sorted(f"student-{m}-seed0.json" for m in method_table.METHODS)
    assert not (unpacked / "metrics" / "eval").exists()


def test_the_plans_clock_predicts_each_phase_from_the_h100_rates():
    from matekd.commands.gpu_run.measure import (
        CACHED_STEP_RATE,
        FUSED_SPEEDUP,
        H100_RATES,
        STAGE_START_S,
        clock_lines,
        clock_record,
        predicted_phases,
    )

    params = load_params(BUDGET)
    predicted, notes = predicted_phases(params)
    assert list(predicted) == ["teachers", "caches", "method-inputs", "ablation", "evaluate", "report", "bench"]
    # by hand: 18 students x 15 epochs x 45,000 images at 4 x the cached step rate, and their
    # validation (15 x 5,000) and test (10,000) images at 4 x ResNet20's inference rate
    ablation = STAGE_START_S + 18 * 15 * 45_000 / (CACHED_STEP_RATE * FUSED_SPEEDUP) + 18 * (
        15 * 5_000 + 10_000) / (H100_RATES["resnet20"][1] * FUSED_SPEEDUP)
    assert predicted["ablation"] == pytest.approx(ablation, abs=0.05)
    resnet110 = 12 * 45_000 / 11_534 + (12 * 5_000 + 10_000) / 44_831
    assert predicted["teachers"] > STAGE_START_S + resnet110
    # every teacher: 19 x 5 x 10,000 CIFAR-10-C images and the 10,000 clean ones
    assert predicted["evaluate"] > 8 + (950_000 + 10_000) / H100_RATES["densenet121"][1]
    assert 300 < sum(predicted.values()) < 540                 # the window the profile was cut for
    phases = {"teachers": {"seconds": 2 * predicted["teachers"]}, "ablation": {"seconds": predicted["ablation"]}}
    record = clock_record(predicted, notes, phases)
    assert record["phases"]["teachers"] == {"predicted_s": predicted["teachers"], "measured_s": phases["teachers"][
        "seconds"]}
    assert record["phases"]["evaluate"]["measured_s"] is None
    lines = clock_lines(predicted, phases)
    assert any(line.split()[0] == "teachers" and line.endswith("( 2.00x)") for line in lines)
    assert any(line.split()[0] == "evaluate" and line.endswith("not run") for line in lines)


def test_paper_extrapolation_is_measured_seconds_per_epoch_times_paper_epochs(tmp_path):
    (tmp_path / "metrics" / "teachers").mkdir(parents=True)
    (tmp_path / "metrics" / "student").mkdir(parents=True)
    (tmp_path / "metrics" / "teachers" / "resnet110.json").write_text(json.dumps(
        {"seconds": 24.0, "epochs": 12, "train_images": 45000, "images_per_second": 22500}))
    for seed in (0, 1):   # no weights file: each student counts as its own group
        (tmp_path / "metrics" / "student" / f"ce-seed{seed}.json").write_text(
            json.dumps({"seconds": 30.0, "epochs": 15}))
    budget, paper = load_params(BUDGET), load_params(ROOT / "profiles" / "paper.yaml")
    bench = {"batch_size": 512, "steps": {"mate_kd_cached": {"images_per_second": 45000.0}}}
    out = gpu_run.paper_extrapolation(tmp_path, budget, paper, {"evaluate": {"seconds": 100.0}}, bench)
    assert out["teachers"]["resnet110"]["seconds"] == pytest.approx(2.0 * paper.teachers["resnet110"].epochs)
    assert "densenet121 was not trained" in " ".join(out["notes"])
    students = out["students"]
    n = len(paper.ablation.methods) * len(paper.ablation.seeds)
    assert students["fused_seconds"] == pytest.approx(2.0 * paper.distill.recipe.epochs * n)
    # the paper profile trains one student at a time: each 45,000-image epoch at the bench's rate = 1 s
    assert students["seconds"] == students["one_at_a_time_seconds"] == pytest.approx(n * paper.distill.recipe.epochs)
    assert out["total_seconds"] == pytest.approx(out["teachers"]["resnet110"]["seconds"] + students["seconds"] + 100.0)
