"""Each base's preprocess_input, in one place: as the function extraction runs before the base
(keras.applications' own ``preprocess_input``), and as Keras layers for the end-to-end models
that export writes (built-in layers only, so exported files load in Keras' safe mode). The key's
``preprocessing`` flavour (caffe, tf, torch, scale01, none) names which."""
from __future__ import annotations

import numpy as np

from ...errors import FeatcacheError

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications imagenet_utils, caffe mode
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torch mode


def fixed_dense(keras, x, kernel, bias, name, activation=None):
    """A frozen Dense layer with given weights: how fixed linear maps are written without Lambda."""
    layer = keras.layers.Dense(kernel.shape[1], activation=activation, name=name, trainable=False)
    y = layer(x)
    layer.set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])
    return y


def preprocessing(keras, x, flavour: str):
    """keras.applications preprocess_input modes as layers (inputs: RGB 0..255)."""
    if flavour == "tf":  # x / 127.5 - 1
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_tf")(x)
    if flavour == "caffe":  # RGB -> BGR, minus the ImageNet mean: one fixed 3x3 map on the channel axis
        return fixed_dense(keras, x, np.eye(3)[::-1], -np.array(CAFFE_MEAN_BGR), "preprocess_caffe")
    if flavour == "torch":  # x / 255, then (x - mean) / std
        x = keras.layers.Rescaling(1 / 255.0, name="preprocess_scale")(x)
        return keras.layers.Normalization(mean=TORCH_MEAN, variance=np.square(TORCH_STD).tolist(),
                                          name="preprocess_torch")(x)
    if flavour == "scale01":  # the pixels base
        return keras.layers.Rescaling(1 / 255.0, name="preprocess_scale01")(x)
    if flavour == "none":  # the rescaling layers are inside the base
        return x
    raise FeatcacheError(f"preprocessing {flavour!r}: cannot be exported")


def _scale01(x):
    """The "pixels" preprocessing: the (resized) uint8 image as float32 in [0, 1]."""
    return np.asarray(x, dtype=np.float32) / np.float32(255.0)


def preprocess_function(backbone):
    """The function mapping a batch of RGB images (0..255) to the base's input.

    For networks: ``keras.applications.<module>.preprocess_input`` itself (note: Keras
    modifies a float numpy batch in place for the caffe/tf/torch modes; a uint8 batch is
    copied).  For "pixels": x -> x / 255 as float32.
    """
    if not backbone.is_network:
        return _scale01
    import importlib

    return importlib.import_module(f"keras.applications.{backbone.module}").preprocess_input
