# Create or reuse .venv and install matekd into it (sourced by pipeline.sh and test.sh).
# MATEKD_TORCH overrides the torch pin, e.g. MATEKD_TORCH="torch torchvision" for the newest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MATEKD_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch, torchvision" 2>/dev/null; then
  # A tested pair; pip takes it from a local wheel cache when the machine has one.
  "$VENV/bin/python" -m pip install --quiet ${MATEKD_TORCH:-torch==2.14.1 torchvision==0.29.1}
fi
stamp="$VENV/.matekd-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install --quiet -e "$ROOT[test]"
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
