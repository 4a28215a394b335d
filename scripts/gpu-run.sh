#!/usr/bin/env bash
# Run a params profile end to end on a (bare) GPU machine from a checkout, with outputs packed
# into at most 8 files of 16 MiB in OUTPUT_DIR (see README: "GPU runner").
#
#   scripts/gpu-run.sh [PROFILE] [OUTPUT_DIR] [options of `matekd gpu-run`]
#
# PROFILE defaults to profiles/budget.yaml, OUTPUT_DIR to .gpu-run/out. Needs MATEKD_CIFAR10
# (the data archive) and, for CIFAR-10-C with frost, MATEKD_FROST (the textures folder).
# Where pydantic is missing (the GPU machine), the wheels carried in .whl/ (or $MATEKD_WHEELS)
# are installed into $MATEKD_SITE (default /tmp/matekd-site) with pip --no-index --no-deps:
# no `pip install -e .`, which would pull mlflow, dvc and optuna. Tracking runs offline.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
PROFILE="profiles/budget.yaml"
OUTPUT=".gpu-run/out"
if [[ $# -gt 0 && "$1" != -* ]]; then PROFILE="$1"; shift; fi
if [[ $# -gt 0 && "$1" != -* ]]; then OUTPUT="$1"; shift; fi

SITE="${MATEKD_SITE:-/tmp/matekd-site}"
WHEELS="${MATEKD_WHEELS:-$ROOT/.whl}"
if ! "$PYTHON" -c "import pydantic" 2>/dev/null; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "error: $PYTHON lacks pydantic and $WHEELS holds no wheels to install it from;" \
         "fetch them with the pip download command in README (GPU runner) and carry .whl" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" "${wheels[@]}"
fi

export PYTHONPATH="$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export MATEKD_TRACKING=offline
export PYTHONUNBUFFERED=1
exec "$PYTHON" -m matekd.commands.gpu_run "$PROFILE" "$OUTPUT" "$@"
