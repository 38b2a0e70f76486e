"""Building blocks shared by every model family (attention, RoPE, seeded initialisation)."""
