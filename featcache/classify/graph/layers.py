"""Keras layers the end-to-end models are made of: preprocess_input modes, pooling, the
two-column step of binary heads, a logistic regression folded into Dense layers. Built-in
layers only (no Lambda), so plain ``keras.models.load_model`` loads every model in safe mode."""
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


def pool(keras, x, pooling: str, name: str):
    if pooling == "none" or len(x.shape) != 4:
        return x
    layer = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    return layer(name=name)(x)


def two_class(keras, p, prefix: str = ""):
    """(N, 1) sigmoid -> (N, 2) [1 - p, p], as predict reports binary heads."""
    return fixed_dense(keras, p, np.array([[-1.0, 1.0]]), np.array([1.0, 0.0]), prefix + "two_class")


def logreg_layers(keras, x, head, prefix: str = ""):
    """StandardScaler + linear classifier folded into Dense layers (computed in float64). A
    fused head's inputs are pooled or flattened each, then concatenated in order."""
    from sklearn.linear_model import LogisticRegression

    parts = x if isinstance(x, (list, tuple)) else [x]
    vectors = []
    for i, (part, shape) in enumerate(zip(parts, head.parts)):
        suffix = f"_{i}" if head.fused else ""
        part = pool(keras, part, head.part_pool(shape), f"{prefix}head_pool{suffix}")
        if len(part.shape) > 2:
            part = keras.layers.Flatten(name=f"{prefix}head_flatten{suffix}")(part)
        vectors.append(part)
    x = vectors[0] if len(vectors) == 1 else keras.layers.Concatenate(name=f"{prefix}head_concat")(vectors)
    scaler, clf = head.pipeline[0], head.pipeline[-1]
    w = clf.coef_ / scaler.scale_  # (C, F): logits = (x - mean) / scale @ coef.T + b
    b = clf.intercept_ - w @ scaler.mean_
    if w.shape[0] == 1:  # binary: sigmoid of one logit
        return two_class(keras, fixed_dense(keras, x, w.T, b, f"{prefix}logreg", activation="sigmoid"), prefix)
    if isinstance(clf, LogisticRegression):  # multinomial: softmax
        return fixed_dense(keras, x, w.T, b, f"{prefix}logreg", activation="softmax")
    # SGDClassifier (streamed training) is one-vs-rest: p_k = sigmoid(z_k) / sum_j sigmoid(z_j)
    # = softmax(log sigmoid(z)), and log sigmoid(z) = -softplus(-z).
    z = fixed_dense(keras, x, -w.T, -b, f"{prefix}logreg_neg_logits", activation="softplus")
    k = w.shape[0]
    return fixed_dense(keras, z, -np.eye(k), np.zeros(k), f"{prefix}logreg_ovr", activation="softmax")
