"""Frozen conv bases: the backbone registry, the compiled feature model, weights and their identity."""
