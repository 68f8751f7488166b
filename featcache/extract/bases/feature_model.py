"""The frozen feature model: uint8 images in, features out, one compiled call per batch.

Speed and precision (issue 6, measured on a 2-core AMD Zen 4 with AVX512_BF16, TF 2.21):

* BatchNormalization layers fed only by a convolution are folded into that convolution's
  kernel and bias (exact in real arithmetic, ~1e-6 relative in float32). Keras runs an
  unfolded BN as separate float32 ops with casts around it under a mixed policy, which made
  MobileNetV2@160 slower in bf16 than in fp32; folded, both precisions get faster.
* ``precision="auto"`` (the default) resolves, before anything is built, to the fastest
  precision that kept the features within fidelity (mean cosine >= 0.999 to fp32) here:
  see :func:`resolve_precision`. The resolved value, never "auto", goes into the cache key.
"""
from __future__ import annotations

import os
import sys

import numpy as np

from ...errors import FeatcacheError
from .backbones import Backbone, build_keras_base
from .preprocessing import preprocess_function
from .placeholder_init import placeholder_weights
from .weights import WeightsSource, weights_load_error

PRECISION_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}
PRECISIONS = ("auto", *PRECISION_POLICIES)
POOLINGS = ("none", "avg", "max")

# Bases that run bf16 on a CPU with native bf16 dot products: dense 3x3 convolutions only.
# Measured: vgg16@150 model alone ~2x fp32, features cosine >= 0.9999 (random weights; no real
# VGG weights offline). Not here: depthwise bases (mobilenet*, efficientnet*, xception, ...),
# whose bf16 features missed cosine 0.999 on real weights (MobileNetV2@160: 0.998) and whose
# speed is bound by memory traffic, not by the dot products bf16 doubles.
CPU_BF16_BASES = frozenset({"vgg16", "vgg19"})
GPU_FP16_MIN_CAPABILITY = (7, 0)  # tensor cores; fp16 (10-bit mantissa) kept cosine >= 0.9999


def cpu_has_bf16() -> bool:
    """True if the CPU has native bfloat16 dot products (AVX512_BF16 or AMX-BF16); Linux only."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first GPU the Keras backend sees, or None without one.

    Without an NVIDIA driver this imports nothing, so CPU runs that build no model (an
    unchanged re-run) stay free of the multi-second TensorFlow import."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return None
    driver = os.path.exists("/proc/driver/nvidia") or os.path.exists("/dev/nvidiactl")
    if not driver and "tensorflow" not in sys.modules and "jax" not in sys.modules:
        return None
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        capability = tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")
        return tuple(capability) if capability else (0, 0)
    if backend == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        if not gpus:
            return None
        text = str(getattr(gpus[0], "compute_capability", "0.0"))
        return tuple(int(part) for part in text.split(".")[:2])
    if backend == "torch":
        import torch

        return tuple(torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else None
    return None


def resolve_precision(precision: str, backbone: Backbone) -> str:
    """The compute precision a run uses: ``precision`` itself, or for "auto":

    * the pixels pseudo-base: fp32 (no network);
    * a GPU of compute capability >= 7.0: fp16 (mixed; tensor cores);
    * a CPU with AVX512_BF16 or AMX and a base in CPU_BF16_BASES (vgg16, vgg19): bf16;
    * anything else: fp32.
    """
    if precision not in PRECISIONS:
        raise FeatcacheError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if not backbone.is_network:
        return "fp32"
    if precision != "auto":
        return precision
    capability = gpu_compute_capability()
    if capability is not None:
        return "fp16" if capability >= GPU_FP16_MIN_CAPABILITY else "fp32"
    return "bf16" if backbone.name in CPU_BF16_BASES and cpu_has_bf16() else "fp32"


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


def batchnorm_folds(model, keep=()) -> dict[str, str]:
    """{BatchNormalization layer name: name of the convolution it can be folded into}.

    A BN folds when its only input is a Conv2D / DepthwiseConv2D / SeparableConv2D without an
    activation whose output feeds nothing else (channels-last, as keras.applications builds),
    and that convolution is not in ``keep`` (layers whose own output is wanted)."""
    import keras

    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
    folds = {}
    for layer in model.layers:
        if not isinstance(layer, keras.layers.BatchNormalization) or len(layer._inbound_nodes) != 1:
            continue
        rank = len(layer.input.shape)
        if rank != 4 or layer.axis not in (-1, rank - 1):
            continue
        producer = layer.input._keras_history[0]
        if type(producer) not in convs or len(producer._inbound_nodes) != 1 or len(producer._outbound_nodes) != 1:
            continue
        if producer.name in keep:
            continue
        if producer.get_config().get("activation") not in (None, "linear"):
            continue
        folds[layer.name] = producer.name
    return folds


def folded_weights(conv, bn) -> list[np.ndarray]:
    """The weights of ``conv`` with ``bn`` (inference mode) folded in, bias always present."""
    scale = 1.0 / np.sqrt(np.asarray(bn.moving_variance, np.float64) + bn.epsilon)
    if bn.scale:
        scale = scale * np.asarray(bn.gamma, np.float64)
    shift = -np.asarray(bn.moving_mean, np.float64) * scale
    if bn.center:
        shift = shift + np.asarray(bn.beta, np.float64)
    weights = [np.asarray(w, np.float64) for w in conv.get_weights()]
    kernels = weights[: 2 if type(conv).__name__ == "SeparableConv2D" else 1]
    bias = weights[len(kernels)] if conv.use_bias else 0.0
    kernel = kernels[-1]  # the kernel whose last axes index the output channels
    if type(conv).__name__ == "DepthwiseConv2D":  # output channel c * multiplier + m
        kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    else:
        kernel = kernel * scale
    return [w.astype(np.float32) for w in (*kernels[:-1], kernel, bias * scale + shift)]


def fold_and_cast(model, policy: str, keep=()):
    """A copy of ``model`` with foldable BNs folded and every layer under the dtype ``policy``."""
    import keras

    folds = batchnorm_folds(model, keep)
    folded_convs = {conv: bn for bn, conv in folds.items()}

    def clone(layer):
        config = layer.get_config()
        if not isinstance(layer, keras.layers.Layer):  # functional ops (x + 3): no dtype policy
            return layer.__class__.from_config(config)
        if layer.name in folds:
            return keras.layers.Identity(name=layer.name, dtype=policy)
        config["dtype"] = policy
        if layer.name in folded_convs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        if layer.name in folds:
            return layer(args[0])  # the Identity takes none of BN's arguments (training, mask)
        return layer(*args, **kwargs)

    with placeholder_weights():  # every weight is set below: initializers would be wasted work
        copy = keras.models.clone_model(model, clone_function=clone, call_function=call)
    set_layers = set()
    for layer in model.layers:
        if layer.name in folds or not layer.weights:
            continue
        target = copy.get_layer(layer.name)
        if layer.name in folded_convs:
            target.set_weights(folded_weights(layer, model.get_layer(folded_convs[layer.name])))
        else:
            target.set_weights(layer.get_weights())  # all of the layer's weights, or it raises
        set_layers.add(layer.name)
    missed = [layer.name for layer in copy.layers if layer.weights and layer.name not in set_layers]
    if missed:  # placeholders left in: a bug here, not a bad file
        raise RuntimeError(f"fold_and_cast left the weights of {missed} unset")
    return copy


def build_frozen_base(backbone: Backbone, size: int, weights: WeightsSource, layer, precision: str,
                      seed: int, fold: bool = True):
    """The Keras base cut at ``layer`` (default: its output), BN folded, under the precision policy.
    ``layer`` may be a list of layer names ("output" or None: the base's output): then the
    model has one output per name, in that order (one base serving several feature sets).

    The base is always built and loaded in float32 (so random init gives the same weights in
    every precision), then cut, then folded/cast by :func:`fold_and_cast`."""
    import keras

    if precision not in PRECISION_POLICIES:
        raise FeatcacheError(f"unknown precision {precision!r}; choose from {', '.join(PRECISION_POLICIES)}")
    keras.utils.set_random_seed(seed)  # random-init bases must give the same numbers every run
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float32")
    try:
        base = build_keras_base(backbone, size, weights.keras_arg)
    except FeatcacheError:
        raise
    except Exception as exc:  # Keras raises many kinds for a bad or missing file
        raise weights_load_error(backbone, weights, exc) from None
    finally:
        keras.config.set_dtype_policy(previous)
    keep = ()
    if isinstance(layer, (list, tuple)):
        outputs = [base.output if name in (None, "output") else check_layer(base, name).output for name in layer]
        base = keras.Model(base.inputs, outputs, name=base.name)
        keep = {name for name in layer if name not in (None, "output")}  # their outputs stay unfolded
    elif layer and layer != "output":
        base = keras.Model(base.inputs, check_layer(base, layer).output, name=f"{base.name}_{layer}")
    if precision != "fp32" or (fold and batchnorm_folds(base, keep)):
        base = fold_and_cast(base, PRECISION_POLICIES[precision] if precision != "fp32" else "float32", keep)
    base.trainable = False
    return base


class FeatureModel:
    """Callable: (B, size, size, 3) uint8 -> (B, ...) float32 features.

    With the TensorFlow backend the whole step (cast, preprocess_input, base, pooling) is one
    tf.function with a uint8 signature (``jit_compile`` turns on XLA); with JAX it is one
    jax.jit; other backends use ``predict_on_batch``. Nothing here assumes a CPU: the backend
    places the work on its default device, and the images may already be there (a JAX or
    TensorFlow array from GPU decoding).

    :meth:`dispatch` starts a batch and :meth:`fetch` brings its features to the host, so a
    caller can start the next batch before fetching the last (on a GPU the device never waits
    for the host). ``pad_rows``: short batches are padded to this many rows, so a compiled
    step (JAX, XLA) sees one shape per run; without it, the largest batch seen so far."""

    def __init__(self, backbone: Backbone, size: int, weights: WeightsSource, layer: str | None = None,
                 pooling: str = "none", precision: str = "fp32", seed: int = 0, jit_compile: bool = False,
                 pad_rows: int | None = None):
        if pooling not in POOLINGS:
            raise FeatcacheError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")
        self.backbone, self.size, self.pooling = backbone, size, pooling
        self.pad_rows = pad_rows
        self.precision = resolve_precision(precision, backbone)
        self._pad = False  # pad short batches (a compiled step: one shape per run)
        if backbone.constructor is None:  # pixels: the resized image is the feature, no TF needed
            if layer not in (None, "output"):
                raise FeatcacheError("the pixels base has no layers (leave --layer out)")
            shape = (size, size, 3)
            self.output_shape = (3,) if pooling != "none" else shape
            self._dispatch = lambda x: _pool(np.asarray(x).astype(np.float32) / 255.0, pooling, np)
            self._fetch = np.asarray
            return
        import keras

        self.model = build_frozen_base(backbone, size, weights, layer, self.precision, seed)
        out = tuple(int(d) for d in self.model.output.shape[1:])
        self.output_shape = out if pooling == "none" or len(out) != 3 else (out[-1],)
        backend = keras.backend.backend()
        if backend == "tensorflow":
            self._dispatch = self._tensorflow_step(preprocess_function(backbone), jit_compile)
            self._fetch = lambda y: y.numpy()
            self._pad = jit_compile  # XLA compiles per shape; plain TF runs any batch size as is
        elif backend == "jax":
            self._dispatch = self._jax_step(preprocess_function(backbone))
            self._fetch = np.asarray
            self._pad = True
        else:
            preprocess = preprocess_function(backbone)
            self._dispatch = lambda x: _pool(np.asarray(
                self.model.predict_on_batch(preprocess(np.asarray(x).astype(np.float32))), np.float32), pooling, np)
            self._fetch = np.asarray

    def _tensorflow_step(self, preprocess, jit_compile: bool):
        import tensorflow as tf

        model, size, pooling = self.model, self.size, self.pooling

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)], jit_compile=jit_compile)
        def run(images):
            x = preprocess(tf.cast(images, tf.float32))
            y = tf.cast(model(x, training=False), tf.float32)
            return _pool(y, pooling, _TfPool)

        self._run = run
        return run

    def _jax_step(self, preprocess):
        import jax
        import jax.numpy as jnp

        model, pooling = self.model, self.pooling
        state = ([v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables])

        @jax.jit
        def run(state, images):
            y, _ = model.stateless_call(*state, preprocess(images.astype(jnp.float32)), training=False)
            return _pool(y.astype(jnp.float32), pooling, jnp)

        return lambda x: run(state, x)

    def _padded(self, images):
        n = len(images)
        rows = self.pad_rows = max(self.pad_rows or 0, n)
        if not self._pad or n == rows:
            return images
        if isinstance(images, np.ndarray):
            return np.concatenate([images, np.zeros((rows - n, *images.shape[1:]), images.dtype)])
        import keras  # a device array (GPU decoding): pad where it lies

        return keras.ops.pad(images, [(0, rows - n), (0, 0), (0, 0), (0, 0)])

    def dispatch(self, images):
        """Start the model on a batch; returns a handle for :meth:`fetch`."""
        return self._dispatch(self._padded(images)), len(images)

    def fetch(self, handle) -> np.ndarray:
        """The float32 features of a dispatched batch, on the host."""
        out, n = handle
        out = self._fetch(out)[:n]
        if self.precision != "fp32" and not np.isfinite(out).all():
            # fp16 overflows above 65504; say so rather than store inf/nan features.
            raise FeatcacheError(
                f"{self.backbone.name} features overflowed to inf/nan under --precision {self.precision}; "
                "use --precision fp32 (or bf16)")
        return out

    def __call__(self, images) -> np.ndarray:
        return self.fetch(self.dispatch(images))


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
