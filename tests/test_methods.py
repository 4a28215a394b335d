"""The method registry: what it refuses, and that the params schema follows it."""

from __future__ import annotations

import pytest

from matekd import methods as method_table
from matekd.errors import ParamsError
from matekd.methods import Hyperparameter, Method
from matekd.methods.kd import KD_HYPERPARAMETERS, equal, kd_loss
from matekd.params import distill_model, load_params
from test_cli import PARAMS


def _method(**changes) -> Method:
    fields = {"name": "x_refused", "teachers": "all", "weighting": "equal", "weigh": equal, "loss": kd_loss,
              "terms": ("ce", "kd"), "hyperparameters": KD_HYPERPARAMETERS}
    return Method(**{**fields, **changes})


def test_the_built_in_methods_in_the_report_order():
    assert list(method_table.METHODS) == ["ce", "kd", "mtkd_equal", "mate_kd_noattr", "mate_kd", "ca_mkd"]
    assert method_table.tunable_names() == ("kd_temperature", "ce_weight", "similarity_temperature",
                                            "similarity_temperature_end", "attribution_weight", "lr", "weight_decay")


@pytest.mark.parametrize("changes, needle", [
    ({"name": "kd"}, "already registered"),
    ({"weigh": None}, "needs a `weigh` rule"),
    ({"teachers": "none"}, "cannot weight them"),
    ({"maps": True}, "student_target"),
    ({"hyperparameters": (Hyperparameter("kd_temperature", float, 5.0, {"gt": 0}),)}, "declared differently"),
])
def test_inconsistent_methods_are_refused(changes, needle):
    with pytest.raises(ValueError, match=needle):
        method_table.register(_method(**changes))
    assert "x_refused" not in method_table.METHODS


def test_a_hyperparameter_lives_exactly_as_long_as_a_method_declares_it():
    before = distill_model()
    extra = Hyperparameter("x_strength", int, 3, {"ge": 1, "le": 9}, label="s", tunable=True)
    method_table.register(_method(name="x_method", hyperparameters=(*KD_HYPERPARAMETERS, extra)))
    try:
        params = load_params(PARAMS, {"distill.x_strength": 7})
        assert params.distill.x_strength == 7 and "x_strength" in method_table.tunable_names()
        assert load_params(PARAMS).distill.x_strength == 3                          # its default
        with pytest.raises(ParamsError, match=r"distill\.x_strength = 10: Input should be less than or equal to 9"):
            load_params(PARAMS, {"distill.x_strength": 10})
    finally:
        method_table.unregister("x_method")
    assert set(distill_model().model_fields) == set(before.model_fields)            # the schema as it was
    with pytest.raises(ParamsError, match=r"distill\.x_strength = 7: unknown key"):
        load_params(PARAMS, {"distill.x_strength": 7})
