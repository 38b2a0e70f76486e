"""The trainer: composes model, parallelism, data and (later) checkpoints into the training loop."""
