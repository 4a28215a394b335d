#!/usr/bin/env bash
# Main job: set up the environment, put CIFAR-10 into data/ and run the pipeline (dvc repro).
# Offline: MATEKD_CIFAR10=/path/to/cifar10 archive (and MATEKD_FROST=/path/to/frost) first.
source "$(dirname "${BASH_SOURCE[0]}")/setup-env.sh"
if [ -n "${MATEKD_CIFAR10:-}" ]; then
  matekd fetch "$MATEKD_CIFAR10"
elif [ -z "$(ls -A data 2>/dev/null | grep -v '^.gitignore$')" ]; then
  matekd fetch --download
fi
dvc repro "$@"
