"""Tools above the trainer: compare runs, bisect a divergence, audit determinism."""
