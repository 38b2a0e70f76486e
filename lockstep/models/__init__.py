"""Model families. Model code is single-device; it imports neither the trainer nor the parallel layer."""
