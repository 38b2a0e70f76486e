"""Text generation from a trained or imported model: one device, a KV cache, seeded sampling.

``loading`` turns a run folder, a checkpoint step folder or a Hugging Face folder into a model and
its tokenizer; ``sampling`` chooses each next token; ``loop`` runs the decoding steps over a
left-padded batch. ``lockstep generate`` (lockstep.cli.generate) is the command over them.
"""
