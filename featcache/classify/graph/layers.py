"""Keras layers the end-to-end models are made of: preprocess_input modes (extract/bases/preprocessing.py), pooling, the
two-column step of binary heads, a logistic regression folded into Dense layers. Built-in
layers only (no Lambda), so plain ``keras.models.load_model`` loads every model in safe mode."""
from __future__ import annotations

import numpy as np

from ...extract.bases.preprocessing import fixed_dense, preprocessing  # noqa: F401  (the graph's layers)

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
