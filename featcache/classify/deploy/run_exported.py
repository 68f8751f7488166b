"""Exported models run the way a deployment runs them: a .tflite file in the LiteRT
interpreter, a SavedModel through its ``serving_default`` signature, a .keras file in Keras,
an .onnx file in ONNX Runtime.

Each takes images decoded and resized as the model card says and returns (N, K) float64
probabilities; ``predict`` and the export's own test measurement both use these.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from ...errors import FeatcacheError
from ...quiet_tf import stderr_to_devnull
from . import card as model_card
from .onnx import OnnxModel
from .savedmodel import is_saved_model

SUFFIXES = {".tflite": "tflite", ".keras": "keras", ".onnx": "onnx"}


def format_of(path: str) -> str | None:
    """"tflite", "keras", "onnx" or "savedmodel" for an exported model's path; None for anything else
    (a run directory, a missing path)."""
    path = os.fspath(path)
    if is_saved_model(path):
        return "savedmodel"
    suffix = os.path.splitext(path)[1].lower()
    if suffix in SUFFIXES and os.path.isfile(path):
        return SUFFIXES[suffix]
    return None


def tflite_interpreter(path: str):
    """LiteRT's interpreter (ai-edge-litert); TensorFlow's deprecated tf.lite.Interpreter if
    that is not installed."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        try:
            import tensorflow as tf
        except ImportError:
            raise FeatcacheError(f"{path}: running a .tflite file needs the LiteRT interpreter "
                                 "(pip install ai-edge-litert) or TensorFlow") from None
        Interpreter = tf.lite.Interpreter
    try:
        with warnings.catch_warnings(), stderr_to_devnull():  # its deprecation and delegate notices
            warnings.simplefilter("ignore")
            return Interpreter(model_path=path, num_threads=threads or 1)
    except (ValueError, RuntimeError) as exc:
        raise FeatcacheError(f"{path}: not a TensorFlow Lite model ({str(exc).splitlines()[0]})") from None


class TFLiteModel:
    def __init__(self, path: str):
        self.interpreter = tflite_interpreter(path)
        detail = self.interpreter.get_input_details()[0]
        self.input_index, self.input_dtype = detail["index"], np.dtype(detail["dtype"])
        self.input_quantization = tuple(detail["quantization"])
        self.output_index = self.interpreter.get_output_details()[0]["index"]
        self._batch = None

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        if self._batch != images.shape:
            self.interpreter.resize_tensor_input(self.input_index, list(images.shape))
            with stderr_to_devnull():  # "Created TensorFlow Lite XNNPACK delegate for CPU."
                self.interpreter.allocate_tensors()
            self._batch = images.shape
        self.interpreter.set_tensor(self.input_index, images.astype(self.input_dtype))
        self.interpreter.invoke()
        out = self.interpreter.get_output_details()[0]
        p = self.interpreter.get_tensor(self.output_index).astype(np.float64)
        scale, zero = out["quantization"]
        return (p - zero) * scale if scale else p


class SavedModelModel:
    def __init__(self, path: str):
        import tensorflow as tf

        self.tf = tf
        try:
            self.loaded = tf.saved_model.load(path)
            self.serve = self.loaded.signatures["serving_default"]
        except (OSError, ValueError, KeyError) as exc:
            raise FeatcacheError(f"{path}: cannot load the SavedModel ({exc.__class__.__name__}: {exc})") from None

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        out = self.serve(images=self.tf.constant(images, self.tf.float32))
        return np.asarray(out["probabilities"], np.float64)


def keras_proba(model, images) -> np.ndarray:
    """``images``: one array, or a list of them for a model with one input per image size."""
    if isinstance(images, list):
        return np.asarray(model.predict_on_batch([x.astype(np.float32) for x in images]), np.float64)
    return np.asarray(model.predict_on_batch(images.astype(np.float32)), np.float64)


class KerasModel:
    def __init__(self, path: str):
        import keras

        try:
            self.model = keras.saving.load_model(path, safe_mode=True, compile=False)
        except Exception as exc:  # Keras raises many kinds for a bad file
            raise FeatcacheError(f"{path}: cannot load the Keras model ({exc.__class__.__name__}: {exc})") from None

    def predict_proba(self, images) -> np.ndarray:
        return keras_proba(self.model, images)


RUNNERS = {"tflite": TFLiteModel, "savedmodel": SavedModelModel, "keras": KerasModel, "onnx": OnnxModel}


def load_runner(path: str, fmt: str):
    return RUNNERS[fmt](path)


def load(path: str, fmt: str | None = None):
    """(card, runner) of an exported model; the card says its class names and input."""
    fmt = fmt or format_of(path)
    if fmt is None:
        raise FeatcacheError(f"{path}: not an exported model (.tflite, .keras, .onnx or a SavedModel folder)")
    card = model_card.read(path, fmt)
    return card, load_runner(path, fmt)


def _batched(predict, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    """predict over batches of ``images`` (one array per model input; a lone array passed as is)."""
    def batch(i):
        parts = [x[i : i + batch_size] for x in images]
        return parts[0] if len(parts) == 1 else parts

    return np.concatenate([predict(batch(i)) for i in range(0, len(images[0]), batch_size)])


def measure(runner, config: dict, inputs: list[tuple[int, str]], class_names: list[str], reference=None,
            batch_size: int = 32) -> dict:
    """The exported model's metrics on the run's test split, read from the recorded image root
    and decoded as extract did. With ``reference`` (the float Keras model): its accuracy on the
    same images, the top-1 agreement and the probability differences. ``measured`` False and a
    reason when the store or the images are gone. ``inputs``: (size, resize) of each model input."""
    from ..evaluation import metrics
    from ..runs.images import decode_paths, split_images

    try:
        paths, labels = split_images(config, "test")
    except FeatcacheError as exc:
        return {"measured": False, "reason": str(exc)}
    if not paths:
        return {"measured": False, "reason": "the run has no test split"}
    decoded = [decode_paths(paths, size, resize) for size, resize in inputs]
    images = [x for x, _, _ in decoded]
    _, good, failures = decoded[0]  # whether a file decodes does not depend on the size
    if not len(good):
        first = failures[0]
        return {"measured": False, "reason": f"none of the {len(paths)} test images could be read "
                                             f"(first: {first['path']}: {first['reason']})"}
    y = labels[good]
    p = _batched(runner.predict_proba, images, batch_size)
    result = {"measured": True, "split": "test", "images": len(paths), "unreadable": len(failures),
              **metrics(y, p, class_names)}
    if failures:
        result["unreadable_examples"] = failures[:5]
    if reference is not None:
        q = _batched(lambda x: keras_proba(reference, x), images, batch_size)
        diff = np.abs(p - q)
        result["float_model"] = {
            "accuracy": float(np.mean(q.argmax(1) == y)),
            "top1_agreement": float(np.mean(q.argmax(1) == p.argmax(1))),
            "max_abs_probability_difference": float(diff.max()),
            "mean_abs_probability_difference": float(diff.mean()),
        }
    return result
