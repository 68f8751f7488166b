"""Shipping a run: export (.keras, TensorFlow Lite, ONNX, SavedModel), model cards, predict, running exported files."""

# Export formats (export.py writes them, run_exported.py runs them); here so that the command
# line's choices come from the same tuple without importing the exporters.
FORMATS = ("keras", "tflite", "onnx", "savedmodel")
