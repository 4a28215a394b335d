"""params.yaml schema: the shipped profiles validate, and bad values fail with clear messages."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from matekd.errors import MatekdError, ParamsError
from matekd.params import MODEL_NAMES, Params, load_params

ROOT = Path(__file__).resolve().parents[1]
PROFILES = [ROOT / "params.yaml", ROOT / "profiles" / "paper.yaml", ROOT / "profiles" / "tiny.yaml"]


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def load_modified(tmp_path: Path, base: dict[str, Any], edit: Callable[[dict], None]) -> Params:
    raw = copy.deepcopy(base)
    edit(raw)
    return load_params(write(tmp_path, raw))


def error_of(tmp_path: Path, base: dict[str, Any], edit: Callable[[dict], None]) -> str:
    with pytest.raises(ParamsError) as info:
        load_modified(tmp_path, base, edit)
    assert isinstance(info.value, MatekdError)
    return str(info.value)


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_every_profile_validates(path: Path) -> None:
    params = load_params(path)
    assert isinstance(params, Params)
    assert params.distill.kd_teacher in params.teachers


def test_quick_profile_is_the_default() -> None:
    assert load_params(ROOT / "params.yaml").profile == "quick"
    assert load_params(ROOT / "profiles" / "tiny.yaml").profile == "tiny"


def test_paper_profile_has_the_paper_recipe() -> None:
    params = load_params(ROOT / "profiles" / "paper.yaml")
    assert params.profile == "paper"
    assert params.data.train_per_class is None
    assert params.data.val_per_class == 500
    assert params.data.test_per_class is None
    assert set(params.teachers) == {"resnet110", "densenet121", "vgg19_bn"}
    assert params.distill.student == "resnet20"
    for name, recipe in [*params.teachers.items(), ("student", params.distill.recipe)]:
        assert recipe.epochs == 200, name
        assert recipe.batch_size == 128, name
        assert recipe.lr == pytest.approx(0.1), name
        assert recipe.momentum == pytest.approx(0.9), name
        assert recipe.nesterov is True, name
        assert recipe.weight_decay == pytest.approx(5e-4), name
        assert recipe.schedule == "cosine", name


def _set(*path: str, value: Any) -> Callable[[dict], None]:
    def edit(raw: dict) -> None:
        node = raw
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return edit


def test_unknown_top_level_key(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("lerning_rate", value=0.1))
    assert "lerning_rate" in msg and "0.1" in msg and "unknown key" in msg


def test_unknown_nested_key(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("distill", "kd_temprature", value=4.0))
    assert "distill.kd_temprature" in msg and "4.0" in msg and "unknown key" in msg


def test_wrong_type(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("teachers", "resnet110", "epochs", value="ten"))
    assert "teachers.resnet110.epochs" in msg and "'ten'" in msg and "integer" in msg


def test_epochs_below_one(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("distill", "recipe", "epochs", value=0))
    assert "distill.recipe.epochs = 0" in msg and "greater than or equal to 1" in msg


def test_negative_lr(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("teachers", "vgg19_bn", "lr", value=-0.1))
    assert "teachers.vgg19_bn.lr = -0.1" in msg and "greater than 0" in msg


def test_unknown_teacher_architecture(tmp_path: Path, base: dict) -> None:
    def edit(raw: dict) -> None:
        raw["teachers"]["resnet111"] = raw["teachers"].pop("densenet121")
    msg = error_of(tmp_path, base, edit)
    assert "teachers" in msg and "'resnet111'" in msg
    assert all(name in msg for name in MODEL_NAMES)
    assert "eval_batch_size" not in msg  # the section's value is not dumped


def test_empty_teacher_list(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("teachers", value={}))
    assert "teachers = {}" in msg and "at least one teacher" in msg


def test_kd_teacher_must_be_a_teacher(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("distill", "kd_teacher", value="resnet56"))
    assert "distill.kd_teacher" in msg and "'resnet56'" in msg
    assert "resnet110" in msg and "densenet121" in msg and "vgg19_bn" in msg
    assert "<root>" not in msg and len(msg) < 300  # no dump of the whole file


@pytest.mark.parametrize("value", [0, -0.5])
def test_similarity_temperature_positive(tmp_path: Path, base: dict, value: float) -> None:
    msg = error_of(tmp_path, base, _set("distill", "similarity_temperature", value=value))
    assert f"distill.similarity_temperature = {value}" in msg and "greater than 0" in msg


@pytest.mark.parametrize("value, bound", [(1.5, "less than or equal to 1"), (-0.1, "greater than or equal to 0")])
def test_ce_weight_in_unit_interval(tmp_path: Path, base: dict, value: float, bound: str) -> None:
    msg = error_of(tmp_path, base, _set("distill", "ce_weight", value=value))
    assert f"distill.ce_weight = {value}" in msg and bound in msg


def test_negative_attribution_weight(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("distill", "attribution_weight", value=-1.0))
    assert "distill.attribution_weight = -1.0" in msg and "greater than or equal to 0" in msg


def test_train_plus_val_exceeds_cifar(tmp_path: Path, base: dict) -> None:
    def edit(raw: dict) -> None:
        raw["data"].update(train_per_class=4600, val_per_class=500)
    msg = error_of(tmp_path, base, edit)
    assert "data.train_per_class" in msg and "data.val_per_class" in msg
    assert "5100" in msg and "5000" in msg


def test_similarity_schedule_needs_both_keys(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("distill", "similarity_temperature_end", value=0.1))
    assert "distill.similarity_temperature_end" in msg and "distill.similarity_schedule_epochs" in msg
    assert "recipe" not in msg


def test_train_plus_val_at_the_limit_is_fine(tmp_path: Path, base: dict) -> None:
    def edit(raw: dict) -> None:
        raw["data"].update(train_per_class=4500, val_per_class=500)
    assert load_modified(tmp_path, base, edit).data.train_per_class == 4500


def test_tune_space_low_above_high(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("tune", "space", "ce_weight", value={"low": 0.9, "high": 0.1}))
    assert "tune.space.ce_weight" in msg and "0.9" in msg and "0.1" in msg and "must not exceed" in msg


def test_tune_space_log_range_from_zero(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base,
                   _set("tune", "space", "kd_temperature", value={"low": 0.0, "high": 8.0, "log": True}))
    assert "tune.space.kd_temperature" in msg and "low > 0" in msg and "0.0" in msg


def test_tune_space_unknown_parameter(tmp_path: Path, base: dict) -> None:
    msg = error_of(tmp_path, base, _set("tune", "space", "momentum", value={"low": 0.5, "high": 0.99}))
    assert "tune.space" in msg and "'momentum'" in msg
    assert "kd_temperature" in msg and "ce_weight" in msg  # lists what is tunable


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("profile: quick\ndistill: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML") as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ParamsError, match="not found") as info:
        load_params(path)
    assert str(path) in str(info.value)


def test_override_is_validated(tmp_path: Path, base: dict) -> None:
    path = write(tmp_path, base)
    with pytest.raises(ParamsError) as info:
        load_params(path, overrides={"distill.ce_weight": 2})
    assert "distill.ce_weight = 2" in str(info.value)
    assert load_params(path, overrides={"distill.ce_weight": 0.5}).distill.ce_weight == 0.5


def test_override_with_unknown_key(tmp_path: Path, base: dict) -> None:
    with pytest.raises(ParamsError, match=r"distill\.kd_temprature = 5.*unknown key"):
        load_params(write(tmp_path, base), overrides={"distill.kd_temprature": 5})


def test_flat_uses_dotted_keys(tmp_path: Path, base: dict) -> None:
    params = load_params(write(tmp_path, base))
    flat = params.flat()
    assert flat["distill.ce_weight"] == base["distill"]["ce_weight"]
    assert flat["teachers.resnet110.lr"] == base["teachers"]["resnet110"]["lr"]
    assert flat["tune.space.kd_temperature.log"] is True
    assert flat["data.train_per_class"] == base["data"]["train_per_class"]
    assert not any(isinstance(v, dict) for v in flat.values())


def test_digest_tracks_values(tmp_path: Path, base: dict) -> None:
    path = write(tmp_path, base)
    first = load_params(path).digest()
    assert load_params(path).digest() == first  # deterministic
    assert load_params(path, overrides={"distill.ce_weight": 0.31}).digest() != first
    assert load_params(path, overrides={"teachers.resnet110.epochs": 4}).digest() != first


def test_override_below_a_plain_value(tmp_path: Path, base: dict) -> None:
    with pytest.raises(ParamsError, match=r"distill\.ce_weight = 0\.3 is a value, not a section"):
        load_params(write(tmp_path, base), overrides={"distill.ce_weight.x": 1})


def test_override_with_empty_key_part(tmp_path: Path, base: dict) -> None:
    with pytest.raises(ParamsError, match="empty part"):
        load_params(write(tmp_path, base), overrides={"distill..ce_weight": 0.5})


def test_override_creates_nothing_it_should_not(tmp_path: Path, base: dict) -> None:
    """A new teacher through an override still needs a full recipe."""
    with pytest.raises(ParamsError, match=r"teachers\.resnet56\.batch_size: required key is missing"):
        load_params(write(tmp_path, base), overrides={"teachers.resnet56.epochs": 1})
