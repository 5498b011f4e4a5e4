"""The pipeline stages, one module each: `run_stage(run, cfg, force)` and the views its notebook shows."""
