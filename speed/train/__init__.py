"""Training loop pieces: EMA, optimisation, checkpointing."""
