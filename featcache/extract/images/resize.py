"""Resize methods: the names a run may choose, how ``auto`` resolves, and the device resize.

The resize method changes the numbers of the features, so the resolved name (never ``auto``)
is a cache key field. The Pillow methods (``bilinear``, ``bilinear+jpeg-draft`` ...) are
applied by :mod:`.decode`. ``GPU_RESIZE`` is the GPU decoding path's own method: an
antialiased bilinear (triangle) filter, the filter Pillow's bilinear uses, computed in float as
two matrix products, so that it runs as two batched matmuls on the device; its numbers differ
from Pillow's (which rounds to 8 bits between its two passes, and decodes with libjpeg rather
than nvJPEG), so it has its own name. :func:`resize_array` is the same arithmetic on the CPU (Pillow in float): the
CPU side of a GPU run (files the GPU decoder rejects) and ``predict`` on a GPU-decoded store
use it.
"""
from __future__ import annotations

import functools

import numpy as np

PIL_METHODS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
DRAFT_SUFFIX = "+jpeg-draft"  # resize names ending in this let libjpeg downscale by DCT first
GPU_RESIZE = "gpu-bilinear"
GPU_DECODERS = ("gpu", "hybrid")  # the decoders that resize with GPU_RESIZE (hybrid: on both sides)
AUTO = "auto"
FAST_CPU_RESIZE = "bilinear" + DRAFT_SUFFIX


def resize_choices() -> list[str]:
    return [AUTO, *PIL_METHODS, FAST_CPU_RESIZE, GPU_RESIZE]


def check_resize(resize: str) -> None:
    from ...errors import FeatcacheError

    if resize in (AUTO, GPU_RESIZE) or resize.removesuffix(DRAFT_SUFFIX) in PIL_METHODS:
        return
    raise FeatcacheError(f"unknown resize method {resize!r}; choose from {', '.join(resize_choices())}")


def resolve_resize(resize: str, decode: str, fast_machine: bool) -> str:
    """The resize method a run uses: ``resize`` itself, or for ``auto``:

    * GPU or hybrid decoding: ``gpu-bilinear`` (the only method they have);
    * a machine where decoding is the limit (many cores, or a GPU running the model):
      ``bilinear+jpeg-draft`` (libjpeg downscales in the DCT first: about 2x the decode rate);
    * anything else (a few cores: the model is the limit): ``bilinear``.

    It depends on the machine, not on threads versus processes, so that how a run decodes
    on the CPU never changes its key."""
    check_resize(resize)
    if resize != AUTO:
        return resize
    if decode in GPU_DECODERS:
        return GPU_RESIZE
    return FAST_CPU_RESIZE if fast_machine else "bilinear"


@functools.lru_cache(maxsize=256)
def triangle_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 rows of an antialiased bilinear resize from n_in to n_out samples.

    Pillow's coefficients for its bilinear filter: output sample i is centred on
    (i + 0.5) * n_in / n_out; the triangle's support widens with the downscale factor (that is
    the antialiasing), taps outside the image are dropped and each row sums to 1."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out, dtype=np.float64) + 0.5) * scale
    taps = np.arange(n_in, dtype=np.float64) + 0.5
    w = np.clip(1.0 - np.abs(taps[None, :] - centers[:, None]) / support, 0.0, None)
    w /= w.sum(axis=1, keepdims=True)
    return w.astype(np.float32)


def resize_array(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, C) uint8 -> (size, size, C) uint8 with :func:`triangle_weights` (``gpu-bilinear``).

    Pillow computes it, one float32 ("F") image per channel: its bilinear filter on float
    images is the same triangle in float with no 8-bit rounding between the passes, and it
    skips the zero taps. The dense numpy products took 110 ms an image (500x375 -> 150),
    Pillow takes 2 ms; the two agree to a rounding step (1 in 255) on 0.006% of the pixels."""
    from PIL import Image

    def one(channel: np.ndarray) -> np.ndarray:
        plane = Image.fromarray(np.ascontiguousarray(channel, dtype=np.float32), "F")
        return np.asarray(plane.resize((size, size), Image.Resampling.BILINEAR))

    planes = [one(image[..., c]) for c in range(image.shape[2])] if image.ndim == 3 else [one(image)]
    x = np.stack(planes, axis=-1) if image.ndim == 3 else planes[0]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
