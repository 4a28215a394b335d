"""The suite's warning filters (pyproject.toml): a deprecation issued from matekd or one of its
tools fails the test that triggers it; others' deprecations are only reported."""

from __future__ import annotations

import warnings

import pytest

DRIFT = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
TOOLS = ("matekd.stages.evaluate", "mlflow.tracking.client", "optuna.storages._rdb.storage", "dvc.repo",
         "dvc_data.index", "dvc_studio_client.post_live_metrics", "torch.nn.modules.module", "torchvision.io.image")


def _warn(category: type[Warning], module: str, message: str = "this API is deprecated") -> None:
    # warn_explicit: the warning as if issued from `module` (what the filters' module field matches)
    warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module, registry={})


@pytest.mark.parametrize("module", TOOLS)
@pytest.mark.parametrize("category", DRIFT)
def test_a_deprecation_from_matekd_or_its_tools_is_an_error(module, category):
    with pytest.raises(category):
        _warn(category, module)


@pytest.mark.parametrize("module", ["numpy.core", "somepackage", "matekdx"])
def test_other_packages_deprecations_are_reported_not_raised(module):
    with warnings.catch_warnings(record=True) as caught:   # keeps the suite's filters, records what passes
        _warn(DeprecationWarning, module)
    assert [w.category for w in caught] == [DeprecationWarning]


def test_mlflows_sqlalchemy_noload_deprecation_is_ignored():
    """Third-party-internal (mlflow's ORM models on SQLAlchemy 2.1): nothing matekd can change."""
    with warnings.catch_warnings(record=True) as caught:
        _warn(DeprecationWarning, "mlflow.store.db.base_sql_model",
              "The ``noload`` loader strategy is deprecated and will be removed in a future release.")
    assert caught == []
