#!/usr/bin/env bash
# Tests: set up the environment, lint, and run pytest (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
ruff check src tests
exec python -m pytest -q "$@"
