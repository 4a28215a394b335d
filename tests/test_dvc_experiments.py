"""DVC experiments reuse work: a clean status after `dvc repro`, an `-S` experiment that reruns
only the stages its change reaches, a new teacher that leaves the teacher-free students alone,
numbers-only metrics, params.yaml that survives `-S`, and plots that overlay the methods.

The slow tests share one reproduced copy of the project (helpers_repo.reproduced_repo, the
tiny profile); those that change it work on a clone.
"""

from __future__ import annotations

import difflib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import yaml

from helpers_repo import ROOT, clone_repo, reproduced_repo, run, stages_run
from matekd import methods as method_table
from matekd.stages.evaluate import summary_metrics

PLOT_CSVS = {   # the report stage's long-format CSVs: first column, value column
    "reports/plots/val_acc.csv": ("epoch", "val_acc"),
    "reports/plots/train_loss.csv": ("epoch", "train_loss"),
    "reports/plots/teacher_weights.csv": ("epoch", "weight"),
    "reports/plots/corruption_accuracy.csv": ("corruption", "accuracy"),
}


# --------------------------------------------------------------------------------------
# Fast: params rewriting, plots, the summary metrics


@pytest.mark.parametrize("params_file", [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))],
                         ids=lambda p: p.name)
def test_set_param_changes_only_its_own_line(tmp_path, params_file):
    """`dvc exp run -S` rewrites params.yaml with ruamel: a file in that writer's own layout
    (block lists indented under their key, flow mappings within 80 columns or block mappings,
    empty values for null) keeps every other line, comments included."""
    from dvc.utils.hydra import apply_overrides

    copy = tmp_path / "params.yaml"
    shutil.copyfile(params_file, copy)
    before = copy.read_text()
    value = yaml.safe_load(before)["distill"]["kd_temperature"] + 1.5
    apply_overrides(str(copy), [f"distill.kd_temperature={value}"])
    after = copy.read_text()
    changed = [line for line in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert [line[0] + line[1:].split("#")[0].strip() for line in changed] == [
        f"-kd_temperature: {yaml.safe_load(before)['distill']['kd_temperature']}",
        f"+kd_temperature: {value}"], (
        f"{params_file.name}: `dvc exp run -S` rewrites more than the changed key:\n" + "\n".join(changed))


def _plots_repo(root: Path) -> Path:
    """A git + DVC repo holding the project's top-level plots, templates and config, with
    sample CSVs of three methods (two teachers for the weights)."""
    root.mkdir()
    run(root, "git", "init", "-q")
    run(root, "dvc", "init", "-q")
    for name in ("config", "plots"):
        src = ROOT / ".dvc" / name
        if src.is_dir():
            shutil.copytree(src, root / ".dvc" / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, root / ".dvc" / name)
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (root / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False))
    folder = root / "reports" / "plots"
    folder.mkdir(parents=True)
    methods = ["ce", "kd", "mate_kd"]
    (folder / "val_acc.csv").write_text("epoch,series,val_acc\n" + "".join(
        f"{e},{m},{0.2 * e + 0.05 * i:.3f}\n" for i, m in enumerate(methods) for e in (1, 2, 3)))
    (folder / "train_loss.csv").write_text("epoch,series,train_loss\n" + "".join(
        f"{e},{m},{2.0 / e + 0.1 * i:.3f}\n" for i, m in enumerate(methods) for e in (1, 2, 3)))
    (folder / "teacher_weights.csv").write_text("epoch,series,weight\n" + "".join(
        f"{e},{m}/{t},{w}\n" for m in ("kd", "mate_kd") for e in (1, 2)
        for t, w in (("resnet56", 0.6), ("resnet20", 0.4))))
    (folder / "corruption_accuracy.csv").write_text("corruption,series,accuracy\n" + "".join(
        f"{c},{m},{0.5 - 0.1 * i:.2f}\n" for c in ("fog", "snow", "gaussian_noise") for i, m in enumerate(methods)))
    return root


@pytest.fixture(scope="module")
def plots_repo(tmp_path_factory) -> Path:
    return _plots_repo(tmp_path_factory.mktemp("plots") / "repo")


def test_each_comparison_is_one_chart_with_every_method(plots_repo):
    shown = json.loads(run(plots_repo, "dvc", "plots", "show", "--json").stdout)
    assert "errors" not in shown, shown.get("errors")
    data = shown["data"]
    assert sorted(data) == sorted(PLOT_CSVS)
    for path, (x, y) in PLOT_CSVS.items():
        assert len(data[path]) == 1, f"{path}: {len(data[path])} charts, want one"
        spec = data[path][0]["content"]
        rows = spec["data"]["values"]
        assert {r[x] for r in rows} and all(y in r for r in rows), path
        series = {r["series"] for r in rows}
        if path.endswith("teacher_weights.csv"):
            # one panel per method, one colour per teacher
            assert series == {"kd/resnet56", "kd/resnet20", "mate_kd/resnet56", "mate_kd/resnet20"}
            assert spec["facet"]["column"]["field"] == "method"
            assert spec["spec"]["encoding"]["color"]["field"] == "teacher"
            continue
        assert series == {"ce", "kd", "mate_kd"}, path
        encoding = spec.get("encoding") or spec["spec"]["encoding"]
        assert encoding["color"]["field"] == "series", path
        assert encoding["x"]["field"] == x and encoding["y"]["field"] == y, path
    bars = data["reports/plots/corruption_accuracy.csv"][0]["content"]["spec"]
    assert bars["mark"]["type"] == "bar" and bars["encoding"]["xOffset"]["field"] == "series"


def test_plots_page_opens_offline(plots_repo):
    run(plots_repo, "dvc", "plots", "show", "-o", "page")
    html = (plots_repo / "page" / "index.html").read_text()
    assert not re.search(r"<script[^>]+src=", html), "the page loads a script from elsewhere"
    assert "cdn.jsdelivr" not in html
    assert html.count("vegaEmbed('#") == len(PLOT_CSVS)
    for bundle in ("vega 5.", "vega-lite 5.", "vega-embed 6."):
        assert f"/*! {bundle}" in html, f"{bundle} is not inlined"


def test_summary_metrics_are_numbers_by_model():
    results = {
        "resnet56": {"test_acc": 0.9, "cifar10c": {"standard_mean": 0.7, "all_mean": 0.71}, "device": "cpu"},
        "student-ce-seed0": {"test_acc": 0.5, "cifar10c": {"standard_mean": None, "all_mean": math.nan}},
        "student-kd-seed0": {"test_acc": 1, "cifar10c": {}},
    }
    assert summary_metrics(results) == {
        "resnet56": {"test_acc": 0.9, "cifar10c_mean15": 0.7, "cifar10c_mean19": 0.71},
        "student-ce-seed0": {"test_acc": 0.5},
        "student-kd-seed0": {"test_acc": 1.0},
    }


# --------------------------------------------------------------------------------------
# Slow: one reproduced repository


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    return reproduced_repo(tmp_path_factory.getbasetemp() / "pipeline")


def _params(repo: Path) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


@pytest.mark.slow
def test_status_is_clean_after_repro(repo):
    assert json.loads(run(repo, "dvc", "status", "--json").stdout) == {}


@pytest.mark.slow
def test_no_checkpoint_is_left_behind(repo):
    left = [str(p.relative_to(repo)) for p in (repo / "checkpoints").rglob("*") if p.is_file()]
    assert not left, f"stages left checkpoints: {left}"


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _leaves(value, f"{prefix}{key}.")
    else:
        yield prefix.rstrip("."), tree


@pytest.mark.slow
def test_declared_metrics_hold_numbers_only(repo):
    declared = [p.relative_to(repo) for pattern in ("metrics/teachers/*.json", "metrics/cache/*.json",
                                                    "metrics/student/*.json", "metrics/summary.json")
                for p in sorted(repo.glob(pattern))]
    params = _params(repo)
    assert len(declared) == 2 * len(params["teachers"]) + 1 + len(params["ablation"]["methods"]) * len(
        params["ablation"]["seeds"]) + 1
    for path in declared:
        content = json.loads((repo / path).read_text())
        odd = [(k, v) for k, v in _leaves(content)
               if isinstance(v, bool) or not isinstance(v, (int, float))]
        assert not odd, f"{path}: not numbers: {odd[:8]}"


@pytest.mark.slow
def test_summary_compares_every_model(repo):
    params = _params(repo)
    summary = json.loads((repo / "metrics" / "summary.json").read_text())
    students = [f"student-{m}-seed{s}" for m in params["ablation"]["methods"] for s in params["ablation"]["seeds"]]
    assert sorted(summary) == sorted([*params["teachers"], *students, "student-distill"])
    for model, row in summary.items():
        assert 0 <= row["test_acc"] <= 1 and 0 <= row["cifar10c_mean19"] <= 1, model


@pytest.mark.slow
def test_temp_experiment_reruns_only_what_kd_temperature_reaches(repo, tmp_path):
    clone = clone_repo(repo, tmp_path / "repo")
    params = _params(clone)
    new = params["distill"]["kd_temperature"] + 1
    proc = run(clone, "dvc", "exp", "run", "--temp", "-S", f"distill.kd_temperature={new}")
    ran = set(stages_run(proc.stdout))
    reached = {f"ablation@{m}-{s}" for m in params["ablation"]["methods"] for s in params["ablation"]["seeds"]
               if "kd_temperature" in method_table.get(m).hyperparameter_names}
    assert reached, "no method of ablation.methods uses kd_temperature"
    expected = ({f"method_inputs@{m}" for m in params["ablation"]["methods"]} | reached
                | {"distill", "evaluate", "report"})
    assert ran == expected, f"ran {sorted(ran)}\nexpected {sorted(expected)}\n{proc.stdout[-3000:]}"
    assert "Stage 'ablation@ce-0' didn't change, skipping" in proc.stdout
    shown = json.loads(run(clone, "dvc", "exp", "show", "--json").stdout)
    experiments = [e for rev in shown for e in (rev.get("experiments") or [])]
    assert len(experiments) == 1
    data = experiments[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["distill"]["kd_temperature"] == new
    summary = data["metrics"]["metrics/summary.json"]["data"]   # in the experiment commit, not '!'
    assert set(summary) >= {"student-ce-seed0", "student-distill"}


@pytest.mark.slow
def test_new_teacher_leaves_teacher_free_and_single_teacher_students_alone(repo, tmp_path):
    from ruamel.yaml import YAML

    clone = clone_repo(repo, tmp_path / "repo")
    rt = YAML()
    params = rt.load((clone / "params.yaml").read_text())
    assert {"ce", "kd", "mtkd_equal"} <= set(params["ablation"]["methods"]), "the test needs these methods"
    assert "resnet110" not in params["teachers"]
    params["teachers"]["resnet110"] = dict(params["teachers"][params["distill"]["kd_teacher"]])
    with (clone / "params.yaml").open("w") as fh:
        rt.dump(params, fh)
    proc = run(clone, "dvc", "repro", "ablation@ce-0", "ablation@kd-0", "ablation@mtkd_equal-0")
    ran = stages_run(proc.stdout)
    assert "train_teacher@resnet110" in ran and "cache@resnet110" in ran
    assert not [s for s in ran if s.startswith(("train_teacher@resnet20", "train_teacher@resnet56"))], ran
    assert "ablation@mtkd_equal-0" in ran
    assert "ablation@ce-0" not in ran and "ablation@kd-0" not in ran, ran
