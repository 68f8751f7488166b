"""Building a model whose every weight is set right after: skip the initializers.

keras.applications builds a base with its layers' random initializers and then loads the
weights file over them; :func:`~.model.fold_and_cast` builds a copy and sets every weight.
The initial values are thrown away, yet on JAX each random initializer of a new shape is
first compiled by XLA: MobileNetV2's construction took 14 s on 2 cores, 12.6 s of it
compiling initializers (TensorFlow runs them eagerly, about 0.1 s in all).

Inside :func:`placeholder_weights`, weights that layers built by this thread add are NaN
(integer ones 0), made on the host. :func:`unset_weights` then names the float weights still
NaN, so a load that leaves a weight unset is an error, not a layer running on made-up values.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

_state = threading.local()  # .depth: placeholder_weights() blocks this thread is in
_lock = threading.Lock()
_patch = {"users": 0, "original": None}  # Layer.add_weight is wrapped while any thread needs it


def _placeholder(shape, dtype=None):
    kind = np.dtype(dtype or "float32")
    return np.full(shape, np.nan, kind) if kind.kind == "f" else np.zeros(shape, kind)


def _add_weight(self, *args, **kwargs):
    original = _patch["original"]
    if not getattr(_state, "depth", 0):  # another thread: its layers initialize as usual
        return original(self, *args, **kwargs)
    dtype = kwargs.get("dtype", args[2] if len(args) > 2 else None) or self.variable_dtype
    try:
        np.dtype(dtype)
    except TypeError:  # a dtype numpy lacks (bfloat16): leave it to its initializer
        return original(self, *args, **kwargs)
    if len(args) > 1:  # Keras' legacy positional form: add_weight(shape, initializer, dtype)
        args = (args[0], _placeholder, *args[2:])
    else:
        kwargs["initializer"] = _placeholder
    return original(self, *args, **kwargs)


@contextlib.contextmanager
def placeholder_weights():
    """Layers this thread builds inside get NaN placeholders instead of initialized weights."""
    import keras

    with _lock:
        if _patch["users"] == 0:
            _patch["original"] = keras.layers.Layer.add_weight
            keras.layers.Layer.add_weight = _add_weight
        _patch["users"] += 1
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
        with _lock:
            _patch["users"] -= 1
            if _patch["users"] == 0:
                keras.layers.Layer.add_weight = _patch["original"]


def unset_weights(model) -> list[str]:
    """Paths of ``model``'s float weights that still hold a placeholder (any NaN)."""
    import keras

    unset = []
    for variable in model.weights:
        value = keras.ops.convert_to_numpy(variable.value)
        if value.dtype.kind == "f" and np.isnan(value).any():
            unset.append(variable.path)
    return unset
