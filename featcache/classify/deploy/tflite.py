"""A Keras model (images in, probabilities out) to TensorFlow Lite: float, float16 or int8.

The path that works with TensorFlow 2.21 and Keras 3: ``keras.export.ExportArchive`` writes a
SavedModel with one endpoint, ``tf.lite.TFLiteConverter.from_saved_model`` converts it
(``from_keras_model`` does the same but prints the whole variable list on stdout).

* ``none``: float32 weights and compute; input float32 RGB 0..255.
* ``float16``: weights stored as float16 (half the size), computed in float32.
* ``int8``: full-integer quantization (weights and activations int8, builtin int8 kernels
  only), calibrated on images the caller decodes; the input is uint8 RGB 0..255 — the
  input's range is pinned to exactly 0..255 so its quantization is scale 1, zero point 0 and
  a pixel value is fed as it is — and the output stays float32 probabilities (one
  dequantize at the end, so a caller never handles a scale).

Converter failures become one line naming the op and the layer it came from.
"""
from __future__ import annotations

import re
import tempfile

import numpy as np

from ...errors import FeatcacheError
from ...quiet_tf import stderr_to_devnull

QUANTIZATIONS = ("none", "float16", "int8")


def _saved_model(model, folder: str) -> None:
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    shape = [None, *(int(d) for d in model.inputs[0].shape[1:])]
    archive.add_endpoint("serve", lambda images: model(images, training=False),
                         input_signature=[tf.TensorSpec(shape, tf.float32, name="images")])
    archive.write_out(folder, verbose=False)


def _representative(calibration: np.ndarray):
    """One image per step, as the converter wants. The first one gets a 0 and a 255 pixel value
    so that the input's calibrated range is exactly 0..255 (scale 1, zero point 0 for uint8)."""
    def steps():
        for i in range(len(calibration)):
            x = calibration[i : i + 1].astype(np.float32)
            if i == 0:
                x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 255.0
            yield [x]
    return steps


def convert(model, quantize: str = "none", calibration: np.ndarray | None = None, what: str = "the model") -> bytes:
    """The .tflite bytes of ``model``; ``calibration`` (N, size, size, 3) uint8 for int8."""
    import tensorflow as tf

    if quantize not in QUANTIZATIONS:
        raise FeatcacheError(f"--quantize {quantize!r}: choose from {', '.join(QUANTIZATIONS)}")
    if quantize == "int8" and (calibration is None or not len(calibration)):
        raise FeatcacheError("--quantize int8: needs calibration images")
    with tempfile.TemporaryDirectory(prefix="featcache-tflite-") as folder:
        _saved_model(model, folder)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder, signature_keys=["serve"])
        if quantize == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantize == "int8":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = _representative(calibration)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.uint8
        try:
            with stderr_to_devnull():  # the exception carries the diagnostics, parsed below
                content = converter.convert()
        except Exception as exc:  # ConverterError, or ValueError/RuntimeError from the quantizer
            raise FeatcacheError(f"{what}: cannot be converted to TensorFlow Lite: {describe_failure(str(exc), model)}") from exc
    return content


# -- converter messages -------------------------------------------------------------------------

# 'tf.Conv2D' op is neither a custom op nor a flex op / 'tfl.foo' op requires ...
_OP_ERROR = re.compile(r"'(?:tf|tfl|mhlo|stablehlo)\.(\w+)' op ([^\n]+)")
# the op's location: fused["Conv2D:", "mobilenet_0.25_32_1/conv1_1/convolution@__inference_call_3369"]
_LOCATION = re.compile(r'fused\["(\w+):", "([^"@]+)@')
# quantizer messages name the op as 'X' or op: X
_QUANT_OP = re.compile(r"(?:[Qq]uantization|[Qq]uantize)[^\n]*?op[:\s]+'?(?:tf\.|tfl\.)?(\w+)'?")
_TENSOR_TYPE = re.compile(r"tensor<[^>]*x(bf16|f16)>")


def _layer_path(model, scope: str) -> str:
    """'functional_1/mobilenet_0.25_32_1/conv1_1/convolution' -> 'mobilenet_0.25_32/conv1': the scope's
    parts matched to the model's (nested) layer names; TensorFlow appends _1 to scopes."""
    names, current = [], model
    for part in scope.split("/"):
        layers = {layer.name: layer for layer in getattr(current, "layers", [])}
        match = next((c for c in (part, re.sub(r"_\d+$", "", part)) if c in layers), None)
        if match is None:
            if names:
                break
            continue  # the outer model's own scope (functional_1/...)
        names.append(match)
        current = layers[match]
    return "/".join(names)


def describe_failure(text: str, model=None) -> str:
    """One line from a converter error: the op, the layer it belongs to, why."""
    found = _OP_ERROR.search(text)
    op = reason = layer = None
    if found:
        op, reason = found.group(1), found.group(2).strip()
        before = text[: found.start()]
        locations = _LOCATION.findall(before[before.rfind("error:"):] if "error:" in before else before)
        if locations and model is not None:
            layer = _layer_path(model, locations[0][1])
        elif locations:
            layer = locations[0][1]
    else:
        quant = _QUANT_OP.search(text)
        if quant:
            op, reason = quant.group(1), "has no int8 kernel in TensorFlow Lite"
    if op is None:
        first = next((line for line in text.splitlines() if line.strip()), text).strip()
        first = re.sub(r"loc\(.*?\)\)+:?\s*", "", first)
        return first[:300]
    if "neither a custom op nor a flex op" in reason:
        reason = "is not a TensorFlow Lite builtin op"
        dtype = _TENSOR_TYPE.search(text)
        if dtype:
            reason += f" for {'bfloat16' if dtype.group(1) == 'bf16' else 'float16'} tensors"
    line = f"op {op}" + (f" in layer {layer}" if layer else "") + f" {reason}"
    others = list(dict.fromkeys(name for name, _ in _OP_ERROR.findall(text)))
    if len(others) > 1:
        line += f" (all ops without a kernel: {', '.join(others)})"
    return line
