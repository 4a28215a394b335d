"""Shared test set-up: one thread per test process (the machine has two cores), no MLflow
runs from in-process tests unless a test opts in, and the project root on the path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from matekd.precision import reset_precision

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _library_precision():
    """A stage run in-process sets the process's precision; the next test starts from the
    library default again (CPU fp32, CUDA bf16)."""
    yield
    reset_precision()


@pytest.fixture(autouse=True)
def _no_tracking_by_default(monkeypatch):
    """In-process tests never write into the developer's mlruns/; tests that check tracking
    set their own MLFLOW_TRACKING_URI and clear this switch."""
    if "MATEKD_TRACKING" not in os.environ:
        monkeypatch.setenv("MATEKD_TRACKING", "off")
