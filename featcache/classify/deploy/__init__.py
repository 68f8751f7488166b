"""Shipping a run: export (.keras, TensorFlow Lite, SavedModel), model cards, predict, running exported files."""
