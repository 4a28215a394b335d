"""Commands that are not pipeline stages: fetch, bench, sync-runs, gpu-run."""
