"""Models: the embedded default model, loading from folders or the hub, and (per architecture)
stage splitting and checkpoint key maps."""
