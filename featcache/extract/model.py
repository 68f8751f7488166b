"""The frozen feature model: uint8 images in, features out, one compiled call per batch."""
from __future__ import annotations

import numpy as np

from ..errors import FeatcacheError
from .backbones import Backbone, build_keras_base, preprocess_function
from .weights import WeightsSource, weights_load_error

PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
POOLINGS = ("none", "avg", "max")


def _pool(x, pooling: str, xp):
    if pooling == "none" or x.ndim != 4:
        return x
    return xp.mean(x, axis=(1, 2)) if pooling == "avg" else xp.max(x, axis=(1, 2))


def check_layer(model, layer: str):
    try:
        return model.get_layer(layer)
    except ValueError:
        import difflib

        names = [lyr.name for lyr in model.layers]
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise FeatcacheError(f"layer {layer!r} is not in {model.name}{hint}") from None


def build_frozen_base(backbone: Backbone, size: int, weights: WeightsSource, layer: str | None, precision: str, seed: int):
    """The Keras base cut at ``layer`` (default: its output), under the precision policy."""
    import keras

    if precision not in PRECISION_POLICIES:
        raise FeatcacheError(f"unknown precision {precision!r}; choose from {', '.join(PRECISION_POLICIES)}")
    keras.utils.set_random_seed(seed)  # random-init bases must give the same numbers every run
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISION_POLICIES[precision])
    try:
        base = build_keras_base(backbone, size, weights.keras_arg)
    except FeatcacheError:
        raise
    except Exception as exc:  # Keras raises many kinds for a bad or missing file
        raise weights_load_error(backbone, weights, exc) from None
    finally:
        keras.config.set_dtype_policy(previous)
    if layer and layer != "output":
        base = keras.Model(base.inputs, check_layer(base, layer).output, name=f"{base.name}_{layer}")
    base.trainable = False
    return base


class FeatureModel:
    """Callable: (B, size, size, 3) uint8 -> (B, ...) float32 features."""

    def __init__(self, backbone: Backbone, size: int, weights: WeightsSource, layer: str | None = None,
                 pooling: str = "none", precision: str = "fp32", seed: int = 0):
        if pooling not in POOLINGS:
            raise FeatcacheError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        self.backbone, self.size, self.pooling = backbone, size, pooling
        if backbone.constructor is None:  # pixels: the resized image is the feature, no TF needed
            if layer not in (None, "output"):
                raise FeatcacheError("the pixels base has no layers (leave --layer out)")
            shape = (size, size, 3)
            self.output_shape = (3,) if pooling != "none" else shape
            self._call = lambda x: _pool(x.astype(np.float32) / 255.0, pooling, np)
            return
        import tensorflow as tf

        self.model = build_frozen_base(backbone, size, weights, layer, precision, seed)
        preprocess = preprocess_function(backbone)
        model = self.model

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def run(images):
            x = preprocess(tf.cast(images, tf.float32))
            y = tf.cast(model(x, training=False), tf.float32)
            return _pool(y, pooling, _TfPool)

        self._run = run
        out = tuple(int(d) for d in model.output.shape[1:])
        self.output_shape = out if pooling == "none" or len(out) != 3 else (out[-1],)
        self._call = lambda x: self._run(x).numpy()

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._call(images)


class _TfPool:
    """The tiny part of the numpy API that _pool needs, for TF tensors."""

    @staticmethod
    def mean(x, axis):
        import tensorflow as tf

        return tf.reduce_mean(x, axis=axis)

    @staticmethod
    def max(x, axis):
        import tensorflow as tf

        return tf.reduce_max(x, axis=axis)
