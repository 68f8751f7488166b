"""One Keras model from a run: preprocessing, frozen base, pooling and head.

Built from built-in layers only (no Lambda), so plain ``keras.models.load_model`` loads it in
its default safe mode. Input: (size, size, 3) float RGB images already decoded and resized,
values 0..255 (what ``predict`` gets from Pillow). Output: (N, K) class probabilities, the
same as ``featcache predict``.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import FeatcacheError
from . import rundir
from .predict import base_recipe

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications imagenet_utils, caffe mode
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torch mode


def _fixed_dense(keras, x, kernel, bias, name, activation=None):
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
        return _fixed_dense(keras, x, np.eye(3)[::-1], -np.array(CAFFE_MEAN_BGR), "preprocess_caffe")
    if flavour == "torch":  # x / 255, then (x - mean) / std
        x = keras.layers.Rescaling(1 / 255.0, name="preprocess_scale")(x)
        return keras.layers.Normalization(mean=TORCH_MEAN, variance=np.square(TORCH_STD).tolist(),
                                          name="preprocess_torch")(x)
    if flavour == "scale01":  # the pixels base
        return keras.layers.Rescaling(1 / 255.0, name="preprocess_scale01")(x)
    if flavour == "none":  # the rescaling layers are inside the base
        return x
    raise FeatcacheError(f"preprocessing {flavour!r}: cannot be exported")


def _pool(keras, x, pooling: str, name: str):
    if pooling == "none" or len(x.shape) != 4:
        return x
    layer = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    return layer(name=name)(x)


def _two_class(keras, p):
    """(N, 1) sigmoid -> (N, 2) [1 - p, p], as predict reports binary heads."""
    return _fixed_dense(keras, p, np.array([[-1.0, 1.0]]), np.array([1.0, 0.0]), "two_class")


def _logreg_layers(keras, x, head):
    """StandardScaler + linear classifier folded into Dense layers (computed in float64)."""
    from sklearn.linear_model import LogisticRegression

    x = _pool(keras, x, head.effective_pool(), "head_pool")
    if len(x.shape) > 2:
        x = keras.layers.Flatten(name="head_flatten")(x)
    scaler, clf = head.pipeline[0], head.pipeline[-1]
    w = clf.coef_ / scaler.scale_  # (C, F): logits = (x - mean) / scale @ coef.T + b
    b = clf.intercept_ - w @ scaler.mean_
    if w.shape[0] == 1:  # binary: sigmoid of one logit
        return _two_class(keras, _fixed_dense(keras, x, w.T, b, "logreg", activation="sigmoid"))
    if isinstance(clf, LogisticRegression):  # multinomial: softmax
        return _fixed_dense(keras, x, w.T, b, "logreg", activation="softmax")
    # SGDClassifier (streamed training) is one-vs-rest: p_k = sigmoid(z_k) / sum_j sigmoid(z_j)
    # = softmax(log sigmoid(z)), and log sigmoid(z) = -softplus(-z).
    z = _fixed_dense(keras, x, -w.T, -b, "logreg_neg_logits", activation="softplus")
    k = w.shape[0]
    return _fixed_dense(keras, z, -np.eye(k), np.zeros(k), "logreg_ovr", activation="softmax")


def build(run_dir: str, weights: str | None = None):
    """The end-to-end keras.Model of a run (not saved)."""
    import keras

    from ..extract.model import build_frozen_base

    config, head = rundir.load_head(run_dir)
    recipe = base_recipe(run_dir, config, weights)
    spec = recipe.spec
    inputs = keras.Input((spec.input_size, spec.input_size, 3), name="image")
    x = preprocessing(keras, inputs, spec.preprocessing)
    if recipe.backbone.is_network:
        base = build_frozen_base(recipe.backbone, spec.input_size, recipe.weights, recipe.layer,
                                 spec.precision, recipe.seed)
        x = base(x)
    x = _pool(keras, x, spec.pooling, "feature_pool")
    if config["head"] == "dense":
        x = head.model(x)
        if head.binary:
            x = _two_class(keras, x)
    else:
        x = _logreg_layers(keras, x, head)
    model = keras.Model(inputs, x, name="featcache_" + config["head"])
    model.trainable = False
    return config, model


def export(run_dir: str, out: str, weights: str | None = None) -> dict:
    out = os.fspath(out)
    if not out.endswith(".keras"):
        raise FeatcacheError(f"{out}: the exported file name must end in .keras")
    if os.path.exists(out):
        raise FeatcacheError(f"{out}: exists; choose another file name (exports are never overwritten)")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise FeatcacheError(f"{out}: folder {parent} does not exist")
    config, model = build(run_dir, weights)
    model.save(out)
    spec = config["feature_set"]["key"]
    return {
        "run_dir": run_dir, "out": out, "input_shape": [spec["input_size"], spec["input_size"], 3],
        "input": "RGB float 0..255, decoded and resized (Pillow, " + spec["resize"] + ")",
        "class_names": config["feature_set"]["class_names"], "parameters": int(model.count_params()),
        "sha256": rundir.sha256_file(out),
    }
