#!/usr/bin/env bash
# Tests: set up the environment and run pytest (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
exec python -m pytest -q "$@"
