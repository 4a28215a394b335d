"""Stage prepare: decode data/ into seeded, stratified train/validation/test arrays (prepared/)."""

from __future__ import annotations

from ..data.prepare import prepare
from ..params import Params
from ..paths import PREPARED_DIR


def run_prepare(params: Params, data_dir: str = "data", out_dir: str = str(PREPARED_DIR)) -> dict:
    """Returns the manifest written to prepared/manifest.json; on any error nothing is left behind."""
    return prepare(params, data_dir=data_dir, out_dir=out_dir)
