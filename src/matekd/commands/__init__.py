"""Commands that are not pipeline stages: bench and gpu-run (with pack, its packer); fetch and
sync-runs live beside their libraries (data/fetch.py, tracking/sync.py)."""
