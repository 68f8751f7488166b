"""ONNX exports: a run's end-to-end (or head-only) Keras model written as one ``.onnx`` file
for ONNX Runtime (servers, C#, Java, JavaScript, edge boxes), and run back through it.

Keras 3 writes ONNX itself (``Model.export(format="onnx")``: tf2onnx on TensorFlow, given the
model's own input signature, which is what tf2onnx's ``from_keras`` lacks on TensorFlow >= 2.16). The packages are
an optional extra (``pip install "featcache[onnx]"``); without them export and predict say so
in one line.
"""
from __future__ import annotations

import os

import numpy as np

from ...errors import FeatcacheError
from ...quiet_tf import stderr_to_devnull

INSTALL = 'pip install "featcache[onnx]"  (onnx, onnxruntime and tf2onnx)'


def _require(*modules: str, what: str) -> None:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise FeatcacheError(f"{what} needs {', '.join(missing)}: {INSTALL}")


def write(model, path: str) -> None:
    """Write ``model`` (Keras, TensorFlow backend) as ONNX at ``path``."""
    _require("onnx", "tf2onnx", "onnxruntime", what="an ONNX export")
    # Keras exports the signature of a model that has been called: call it once on one zero row.
    zeros = [np.zeros((1, *tuple(i.shape)[1:]), np.float32) for i in model.inputs]
    model(zeros[0] if len(zeros) == 1 else zeros, training=False)
    tmp = path + ".onnx"  # Keras wants the extension
    try:
        with stderr_to_devnull():  # tf2onnx's conversion log
            model.export(tmp, format="onnx", verbose=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class OnnxModel:
    """An exported .onnx file in ONNX Runtime (CPU): inputs by name, probabilities out."""

    def __init__(self, path: str):
        _require("onnxruntime", what=f"running {path}")
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own kinds for a bad file
            raise FeatcacheError(f"{path}: not an ONNX model ONNX Runtime can load ({str(exc).splitlines()[0]})") from None
        self.inputs = [i.name for i in self.session.get_inputs()]

    def predict_proba(self, x) -> np.ndarray:
        arrays = x if isinstance(x, list) else [x]
        feed = {name: np.asarray(a, np.float32) for name, a in zip(self.inputs, arrays)}
        return np.asarray(self.session.run(None, feed)[0], np.float64)
