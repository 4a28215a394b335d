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
    # running two teachers online every step costs more than a CE step
    assert report["steps"]["kd_online"]["ratio_to_ce"] > 1.0
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
