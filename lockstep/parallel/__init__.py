"""Parallelism and other model transformations, applied by pure ``apply_*`` functions in a fixed
order to a model built on the meta device: tensor parallel, activation checkpointing, compile,
data parallel. Each takes only its own config section; none knows the training loop."""
