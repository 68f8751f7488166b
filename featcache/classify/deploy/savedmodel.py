"""A Keras model (images in, probabilities out) as a TensorFlow SavedModel for serving.

Two signatures, both returning ``probabilities`` (N, K) float32 and ``classes`` (N,) string
(the most probable class name):

* ``serving_default``: ``images`` (N, size, size, 3) float32 RGB 0..255, already decoded and
  resized (what ``featcache predict`` decodes with Pillow);
* ``serving_bytes``: ``image_bytes`` (N,) string, each a whole JPEG/PNG/GIF/BMP/WebP file,
  decoded and resized inside the graph (TensorFlow Serving's REST API base64-decodes inputs
  whose name ends in ``_bytes``).

The in-graph decoding follows extract's Pillow decoding as closely as TensorFlow allows: JPEG
with libjpeg's accurate integer DCT (Pillow's default; TensorFlow's is the fast one), the first
frame of animations, alpha composited on white, DCT-domain downscaling chosen like Pillow's
``draft`` for ``+jpeg-draft``, then ``tf.image.resize`` with antialiasing (Pillow's filters
widen with the scale factor the same way), rounded to uint8 as Pillow does. TensorFlow does
not apply EXIF orientation: photos that rely on it arrive rotated. CMYK JPEGs decode with
TensorFlow's colour conversion, not Pillow's.
"""
from __future__ import annotations

import os

from ...errors import FeatcacheError

SIGNATURES = ("serving_default", "serving_bytes")
# Pillow resampling filter -> tf.image.resize method
TF_RESIZE = {"nearest": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "lanczos3", "box": "box"}
DRAFT_SUFFIX = "+jpeg-draft"


def decode_in_graph(data, size: int, resize: str):
    """One encoded image (scalar string tensor) -> (size, size, 3) uint8, inside a graph."""
    import tensorflow as tf

    method = TF_RESIZE[resize.removesuffix(DRAFT_SUFFIX)]
    draft = resize.endswith(DRAFT_SUFFIX)

    def jpeg():
        if not draft:
            return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")
        # Pillow's draft: the largest of 8, 4, 2, 1 with min(width // size, height // size) >= it.
        shape = tf.io.extract_jpeg_shape(data)
        scale = tf.minimum(shape[0] // size, shape[1] // size)
        branch = tf.where(scale >= 8, 3, tf.where(scale >= 4, 2, tf.where(scale >= 2, 1, 0)))
        return tf.switch_case(branch, [
            lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE")
            for r in (1, 2, 4, 8)])

    def gif():  # the first frame; GIF decoding has no alpha channel in TensorFlow
        return tf.io.decode_image(data, channels=3, expand_animations=False)

    def other():  # PNG, BMP, WebP: RGBA, alpha composited on white like extract
        rgba = tf.cast(tf.io.decode_image(data, channels=4, expand_animations=False), tf.float32)
        alpha = rgba[..., 3:] / 255.0
        rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
        return tf.cast(tf.round(rgb), tf.uint8)

    is_gif = tf.strings.substr(data, 0, 3) == "GIF"
    image = tf.cond(tf.io.is_jpeg(data), jpeg, lambda: tf.cond(is_gif, gif, other))
    image.set_shape([None, None, 3])
    pixels = tf.cast(image, tf.float32)
    if method == "box":  # Pillow's box filter: the antialiased box kernel tf.image.resize does not offer
        scale = tf.constant([size, size], tf.float32) / tf.cast(tf.shape(image)[:2], tf.float32)
        resized = tf.raw_ops.ScaleAndTranslate(images=pixels[None], size=[size, size], scale=scale,
                                               translation=tf.zeros([2]), kernel_type="box", antialias=True)[0]
    else:
        resized = tf.image.resize(pixels, [size, size], method=method, antialias=method != "nearest")
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def write(model, out: str, class_names: list[str], size: int, resize: str) -> None:
    """Write the SavedModel folder ``out`` (which must not exist).

    A tf.Module holding the model's variables once, saved with tf.saved_model.save: Keras'
    ExportArchive (Keras 3.15) stores every variable twice, doubling the folder."""
    import tensorflow as tf

    module = tf.Module()
    module.model_variables = list(model.variables)
    module.class_names = tf.constant(class_names)

    def outputs(probabilities):
        return {"probabilities": probabilities,
                "classes": tf.gather(module.class_names, tf.argmax(probabilities, axis=1))}

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="images")])
    def from_images(images):
        return outputs(model(images, training=False))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def from_bytes(image_bytes):
        images = tf.map_fn(lambda data: decode_in_graph(data, size, resize), image_bytes,
                           fn_output_signature=tf.TensorSpec([size, size, 3], tf.uint8))
        return outputs(model(tf.cast(images, tf.float32), training=False))

    module.serving_default, module.serving_bytes = from_images, from_bytes
    try:
        tf.saved_model.save(module, out, signatures={"serving_default": from_images, "serving_bytes": from_bytes})
    except Exception as exc:
        raise FeatcacheError(f"{out}: cannot write the SavedModel ({exc.__class__.__name__}: {exc})") from exc


BYTES_DECODING = (
    "inside the graph: JPEG with the accurate integer DCT (as Pillow), the first frame of animations, alpha "
    "composited on white, DCT-domain downscaling like Pillow's draft for +jpeg-draft, tf.image.resize with "
    "antialiasing, rounded to uint8; EXIF orientation is NOT applied (TensorFlow has no EXIF support) and CMYK "
    "JPEGs use TensorFlow's colour conversion; measured against featcache's Pillow decoding in docs/deploy.md")


def signatures_record() -> dict:
    """The signatures as the model card describes them."""
    outputs = {"probabilities": "float32 (N, K), column i is class_names[i]",
               "classes": "string (N,): the most probable class name"}
    return {
        "serving_default": {"inputs": {"images": "float32 (N, size, size, 3), RGB 0..255, decoded and resized"},
                            "outputs": outputs},
        "serving_bytes": {"inputs": {"image_bytes": "string (N,): whole JPEG/PNG/GIF/BMP/WebP files"},
                          "outputs": outputs, "decoding": BYTES_DECODING},
    }


def is_saved_model(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "saved_model.pb"))
