"""`python -m matekd.commands.gpu_run` (what scripts/gpu-run.sh runs): `matekd gpu-run` without
the rest of the matekd CLI."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
