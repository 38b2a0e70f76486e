"""Determinism below everything that computes: one root seed and the streams derived from it, the
backends' deterministic flags. A leaf: it imports only the config."""
