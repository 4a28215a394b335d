"""`matekd bench` times the student step variants and prints each as a ratio to CE."""

from __future__ import annotations

import json
from pathlib import Path

from matekd.commands.bench import run_bench
from matekd.params import load_params

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prints_and_writes_ratios_to_the_ce_step(tmp_path, capsys):
    params = load_params(ROOT / "profiles" / "tiny.yaml", {"device": "cpu"})
    report = run_bench(params, batch_size=8, repeats=2, warmup=1, together=2, output=tmp_path / "bench.json")
    out = capsys.readouterr().out
    assert set(report["steps"]) == {"ce", "kd_online", "mate_kd_online", "mate_kd_cached", "mate_kd_cached_x2"}
    assert report["steps"]["ce"]["ratio_to_ce"] == 1.0
    for name, entry in report["steps"].items():
        assert entry["median_s"] > 0 and entry["images_per_second"] > 0
        assert name in out and f"{entry['ratio_to_ce']:.2f}" in out
    # each ratio is its median step over CE's, per student (no timing is asserted: the machine
    # may be busy; the figures themselves are benchmark output, not test conditions)
    ce = report["steps"]["ce"]["median_s"]
    for entry in report["steps"].values():
        assert entry["ratio_to_ce"] == entry["median_s"] / ce / entry["students"]
    assert json.loads((tmp_path / "bench.json").read_text())["steps"] == report["steps"]
    # two students together: one network, 2 x 8 images per step, compared with one at a time
    together = report["steps"]["mate_kd_cached_x2"]
    assert together["students"] == 2 and together["images_per_second"] == 2 * together["images_per_second_per_student"]
    alone = report["steps"]["mate_kd_cached"]["images_per_second"]
    assert report["together_speedup"] == together["images_per_second"] / alone
    assert "2 students together" in out


def test_bench_times_with_the_cudnn_settings_of_training(tmp_path, monkeypatch):
    import torch

    from matekd.commands import bench

    seen = []
    monkeypatch.setattr(bench, "_bench_steps", lambda *a: seen.append(torch.backends.cudnn.benchmark) or {
        "mate_kd_cached": {"images_per_second": 1.0, "median_s": 1.0, "ratio_to_ce": 1.0},
        "mate_kd_cached_x2": {"images_per_second": 2.0, "images_per_second_per_student": 1.0, "median_s": 1.0,
                              "ratio_to_ce": 1.0}})
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)     # set by deterministic; undone after
    for deterministic in (False, True):
        params = load_params(ROOT / "profiles" / "tiny.yaml", {"device": "cpu", "deterministic": deterministic})
        run_bench(params, batch_size=8, repeats=1, warmup=1, together=2, output=tmp_path / "bench.json")
        assert seen[-1] is (not deterministic)      # what train.configure_determinism sets for training
    torch.use_deterministic_algorithms(False)


def test_bench_times_fp32_beside_bf16_on_a_bf16_cpu_and_reports_the_configured_one(tmp_path, monkeypatch, capsys):
    import torch

    from matekd import precision
    from matekd.commands import bench

    seen = []

    def fake_steps(*args):
        seen.append(precision.active_precision(torch.device("cpu")))
        speed = 2.0 if seen[-1] == "bf16" else 1.0
        entry = {"images_per_second": speed, "images_per_second_per_student": speed, "median_s": 1 / speed,
                 "ratio_to_ce": 1.0}
        return {"ce": entry, "mate_kd_cached": entry, "mate_kd_cached_x2": entry}

    monkeypatch.setattr(bench, "_bench_steps", fake_steps)
    for native, expected in ((True, ["fp32", "bf16"]), (False, ["fp32"])):
        monkeypatch.setattr(bench, "cpu_supports_bf16", lambda native=native: native)
        monkeypatch.setattr(precision, "cpu_supports_bf16", lambda native=native: native)
        seen.clear()
        report = run_bench(load_params(ROOT / "profiles" / "tiny.yaml", {"device": "cpu"}), batch_size=8,
                           repeats=1, warmup=1, together=2, output=tmp_path / "bench.json")
        assert seen == expected and list(report["by_precision"]) == expected
        configured = "bf16" if native else "fp32"
        assert report["precision"] == configured and report["steps"] == report["by_precision"][configured]
        assert precision.active_precision(torch.device("cpu")) == configured   # left as training would use it
    monkeypatch.setattr(bench, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    run_bench(load_params(ROOT / "profiles" / "tiny.yaml", {"device": "cpu"}), batch_size=8, repeats=1, warmup=1,
              together=2, output=tmp_path / "bench.json")
    assert "bf16 gain" in capsys.readouterr().out.splitlines()[1]
