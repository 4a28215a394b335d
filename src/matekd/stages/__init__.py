"""The pipeline, one thin module per DVC stage: read params, call the libraries, write the
outputs, track the run. dvc.yaml calls them through the `matekd` command; each stage's DVC deps
are the source files it imports (tests/test_dvc_deps.py checks it)."""
