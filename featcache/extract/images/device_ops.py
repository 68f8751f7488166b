"""The Keras backend's side of GPU decoding: decoded images taken over through DLPack (no copy
through the host) and resized on the device with ``gpu-bilinear`` (two matmuls per image size,
the triangle weights of :mod:`.resize`), in one compiled call per image size and count."""
from __future__ import annotations

import numpy as np

from ...errors import FeatcacheError
from .resize import triangle_weights


class JaxOps:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jnp, self.jax = jnp, jax

        @jax.jit
        def resize(group, take, wy, wx):
            h, w, c = wy.shape[1], wx.shape[1], group.shape[-1]
            x = group.reshape(-1, h * w * c)  # one row per image of the group
            x = (x if take is None else x[take]).reshape(-1, h, w, c).astype(jnp.float32)
            x = jnp.einsum("sh,nhwc->nswc", wy, x)
            x = jnp.einsum("tw,nswc->nstc", wx, x)
            x = jnp.broadcast_to(x, (*x.shape[:3], 3))  # grayscale: the same value in R, G and B
            return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)

        self.resize = resize

    def from_dlpack(self, image):
        return self.jax.dlpack.from_dlpack(image)

    def upload(self, array: np.ndarray):
        return self.jax.device_put(array)

    def weights(self, n_in: int, n_out: int):
        return self.jax.device_put(triangle_weights(n_in, n_out))

    def concatenate(self, parts):
        return parts[0] if len(parts) == 1 else self.jnp.concatenate(parts)

    def ready(self, arrays) -> None:
        self.jax.block_until_ready(arrays)


class TensorflowOps:
    def __init__(self):
        import tensorflow as tf

        self.tf = tf

        @tf.function(reduce_retracing=True)
        def resize(group, take, wy, wx):
            h, w, c = tf.shape(wy)[1], tf.shape(wx)[1], tf.shape(group)[2]
            x = tf.reshape(group, [-1, h * w * c])
            x = tf.reshape(x if take is None else tf.gather(x, take), [-1, h, w, c])
            x = tf.einsum("sh,nhwc->nswc", wy, tf.cast(x, tf.float32))
            x = tf.einsum("tw,nswc->nstc", wx, x)
            x = tf.broadcast_to(x, tf.concat([tf.shape(x)[:3], [3]], 0))  # grayscale to RGB
            return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)

        self.resize = resize

    def from_dlpack(self, image):
        return self.tf.experimental.dlpack.from_dlpack(image.__dlpack__())

    def upload(self, array: np.ndarray):
        return self.tf.constant(array)

    def weights(self, n_in: int, n_out: int):
        return self.tf.constant(triangle_weights(n_in, n_out))

    def concatenate(self, parts):
        return parts[0] if len(parts) == 1 else self.tf.concat(parts, 0)

    def ready(self, arrays) -> None:
        self.tf.test.experimental.sync_devices()  # TF has no wait on one tensor short of a copy to the host


BACKEND_OPS = {"jax": JaxOps, "tensorflow": TensorflowOps}


def backend_ops():
    import keras

    backend = keras.backend.backend()
    if backend not in BACKEND_OPS:
        raise FeatcacheError(f"--decode gpu hands images to Keras on JAX or TensorFlow, not {backend}")
    return BACKEND_OPS[backend]()
