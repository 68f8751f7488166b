"""JPEG decoding on the GPU (``--decode gpu``): nvImageCodec decodes, the Keras backend resizes.

Why nvImageCodec: it decodes batches of JPEGs with nvJPEG (the GPU's hardware JPEG decoder
where there is one, CUDA otherwise), applies EXIF orientation, and hands each image over
through DLPack, which JAX, TensorFlow and torch all take without a copy through host memory.
(``torchvision.io.decode_jpeg`` serves the torch backend only; DALI is a large framework of
its own.) It has no resize, so the images are resized where they lie, by the backend, with the
``gpu-bilinear`` filter of :mod:`.resize` (two matmuls over all the batch's images of one size,
the weights cached on the device), into the batch the model takes: nothing goes back to the host.

Files that are not JPEG (by their first bytes), JPEGs that are not 1- or 3-channel (CMYK),
that are larger than ``--max-pixels``, or that nvImageCodec cannot decode go through the CPU
path (Pillow, with the same ``gpu-bilinear`` filter), which decodes them or reports why not,
as any run does. Their rows are uploaded and joined to the batch.

A compiled resize exists per distinct image size and count in a batch (JAX compiles one small
function for each), so a folder of a few camera sizes pays for a few compiles; one of many
thousand sizes pays for many.
"""
from __future__ import annotations

import functools
import hashlib
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...errors import FeatcacheError
from .decode import DecodeError, decode_image, read_bytes
from .batches import THREAD_PREFETCH_BATCHES, Chunks, collect, drain
from .resize import GPU_RESIZE, triangle_weights

NVIMGCODEC_MISSING = ("--decode gpu needs NVIDIA nvImageCodec: pip install 'featcache[gpu-decode]' "
                      "(nvidia-nvimgcodec-cu12[nvjpeg]; on CUDA 13 nvidia-nvimgcodec-cu13[nvjpeg])")
JPEG_MAGIC = b"\xff\xd8\xff"
BACKENDS = ("jax", "tensorflow")


def import_nvimgcodec():
    """The nvImageCodec module, or one clear line that says what to install."""
    try:
        from nvidia import nvimgcodec
    except (ImportError, OSError):  # OSError: the wheel is there but a CUDA library it needs is not
        raise FeatcacheError(NVIMGCODEC_MISSING) from None
    return nvimgcodec


def gpu_visible() -> bool:
    from ..bases.feature_model import gpu_compute_capability

    return gpu_compute_capability() is not None


def check_gpu_decoding(decode: str = "gpu") -> None:
    """nvImageCodec, a Keras backend that takes DLPack device arrays, and a GPU; or one clear line."""
    try:
        import_nvimgcodec()
    except FeatcacheError as exc:
        raise FeatcacheError(str(exc).replace("--decode gpu", f"--decode {decode}")) from None
    import keras

    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise FeatcacheError(f"--decode {decode} hands images to Keras on JAX or TensorFlow, not {backend}; "
                             "set KERAS_BACKEND=jax (or tensorflow), or use --decode processes")
    if not gpu_visible():
        raise FeatcacheError(f"--decode {decode}: no CUDA GPU is visible to Keras ({backend}); "
                             "use --decode processes (or threads)")


class _JaxOps:
    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jnp, self.jax = jnp, jax

        @jax.jit
        def resize(images, wy, wx):  # images: a list; stacked inside the compiled call, not one dispatch each
            x = jnp.einsum("sh,nhwc->nswc", wy, jnp.stack(images).astype(jnp.float32))
            x = jnp.einsum("tw,nswc->nstc", wx, x)
            x = jnp.broadcast_to(x, (*x.shape[:3], 3))  # grayscale: the same value in R, G and B
            return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)

        self._resize = resize

    def from_dlpack(self, image):
        return self.jax.dlpack.from_dlpack(image)

    def upload(self, array: np.ndarray):
        return self.jax.device_put(array)

    def weights(self, n_in: int, n_out: int):
        return self.jax.device_put(triangle_weights(n_in, n_out))

    def resize(self, images, wy, wx):
        """A list of n (h, w, c) uint8 images of one size -> (n, size, size, 3) uint8."""
        return self._resize(images, wy, wx)

    def concatenate(self, parts):
        return parts[0] if len(parts) == 1 else self.jnp.concatenate(parts)


class _TensorflowOps:
    def __init__(self):
        import tensorflow as tf

        self.tf = tf

        @tf.function(reduce_retracing=True)
        def resize(images, wy, wx):
            x = tf.einsum("sh,nhwc->nswc", wy, tf.cast(images, tf.float32))
            x = tf.einsum("tw,nswc->nstc", wx, x)
            x = tf.broadcast_to(x, tf.concat([tf.shape(x)[:3], [3]], 0))  # grayscale to RGB
            return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)

        self._resize = resize

    def from_dlpack(self, image):
        return self.tf.experimental.dlpack.from_dlpack(image.__dlpack__())

    def upload(self, array: np.ndarray):
        return self.tf.constant(array)

    def weights(self, n_in: int, n_out: int):
        return self.tf.constant(triangle_weights(n_in, n_out))

    def resize(self, images, wy, wx):
        """A list of n (h, w, c) uint8 images of one size -> (n, size, size, 3) uint8."""
        return self._resize(self.tf.stack(images), wy, wx)  # one op for the list (a list argument would retrace)

    def concatenate(self, parts):
        return parts[0] if len(parts) == 1 else self.tf.concat(parts, 0)


def backend_ops():
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        return _JaxOps()
    if backend == "tensorflow":
        return _TensorflowOps()
    raise FeatcacheError(f"--decode gpu hands images to Keras on JAX or TensorFlow, not {backend}")


class GpuDecoder:
    """Decodes a batch of files into one (n, size, size, 3) uint8 device array, in the backend's type."""

    def __init__(self, size: int, max_pixels: int, workers: int):
        nv = import_nvimgcodec()
        self.nv, self.size, self.max_pixels = nv, size, max_pixels
        # Fancy (smooth) chroma upsampling, as libjpeg does it: closer to the CPU path's pixels.
        self.decoder = nv.Decoder(options=":fancy_upsampling=1")
        self.params = nv.DecodeParams(apply_exif_orientation=True, color_spec=nv.ColorSpec.SRGB)
        self.ops = backend_ops()
        self.cpu = ThreadPoolExecutor(workers)  # files left to the CPU path
        self.on_gpu = self.on_cpu = 0  # images decoded on each side (reported by the run)
        # Host seconds spent in each step (benchmarks/gpu_extract.py prints them): where a batch waits.
        self.seconds = dict.fromkeys(("read", "parse", "decode", "resize", "cpu"), 0.0)

    @functools.lru_cache(maxsize=256)
    def _weights(self, n_in: int):
        return self.ops.weights(n_in, self.size)

    def _gpu_candidate(self, data: bytes):
        """A CodeStream for a JPEG the GPU should decode, or None (the CPU path takes it)."""
        if not data.startswith(JPEG_MAGIC):
            return None
        try:
            stream = self.nv.CodeStream(data)
            if stream.num_channels not in (1, 3) or stream.width * stream.height > self.max_pixels:
                return None  # CMYK/YCCK; or too large: the CPU path reports the refusal from the header
        except Exception:  # noqa: BLE001 (a header nvImageCodec cannot parse: Pillow says why)
            return None
        return stream

    def _cpu_decode(self, data):
        if isinstance(data, DecodeError):
            return None, str(data)
        try:
            return decode_image(data, self.size, GPU_RESIZE, self.max_pixels), None
        except DecodeError as exc:
            return None, str(exc)

    def read(self, paths: list[str]):
        """Stage one: each file's bytes (or why not), a CodeStream for each JPEG the GPU takes,
        and each file's sha256 (None: unreadable), hashed here so a file is read once."""
        started = time.perf_counter()
        datas = []
        for path in paths:
            try:
                datas.append(read_bytes(path))
            except DecodeError as exc:
                datas.append(exc)
        digests = [hashlib.sha256(d).hexdigest() if isinstance(d, bytes) else None for d in datas]
        parsed = time.perf_counter()
        streams = {i: s for i, d in enumerate(datas) if isinstance(d, bytes) and (s := self._gpu_candidate(d)) is not None}
        self.seconds["read"] += parsed - started
        self.seconds["parse"] += time.perf_counter() - parsed
        return datas, streams, digests

    def decode_streams(self, streams: dict) -> list:
        """Stage two: nvImageCodec decodes the streams (it lets go of the GIL meanwhile); None
        for each image it rejects."""
        if not streams:
            return []
        started = time.perf_counter()
        try:
            decoded = self.decoder.decode(list(streams.values()), params=self.params)
        except Exception:  # noqa: BLE001 (a batch the library fails as a whole: the CPU path takes it)
            decoded = [None] * len(streams)
        self.seconds["decode"] += time.perf_counter() - started
        return decoded

    def assemble(self, datas: list, streams: dict, decoded: list):
        """Stage three: the decoded images resized into one batch, with the rows the CPU path
        decodes. Returns ([index into the files, in the order of the batch's rows], device
        images, {index: reason})."""
        clock = time.perf_counter()
        order, rows = [], []
        # One resize per distinct image shape (a folder of one camera: one call a batch), not
        # one per image: per-image dispatches held the GPU path at a fifth of the model's rate.
        shapes: dict[tuple, list] = {}
        for i, image in zip(list(streams), decoded):
            if image is not None:  # None: rejected by nvImageCodec; the CPU path decodes it or says why
                shapes.setdefault(tuple(image.shape), []).append((i, image))
        for shape, members in shapes.items():
            rows.append(self.ops.resize([self.ops.from_dlpack(image) for _, image in members],
                                        self._weights(shape[0]), self._weights(shape[1])))
            order += [i for i, _ in members]
        now = time.perf_counter()
        self.seconds["resize"] += now - clock
        on_gpu = set(order)
        left = [i for i in range(len(datas)) if i not in on_gpu]
        reasons, host = {}, []
        for i, (image, reason) in zip(left, self.cpu.map(self._cpu_decode, [datas[i] for i in left])):
            if image is None:
                reasons[i] = reason
            else:
                host.append(image)
                order.append(i)
        self.on_gpu += len(on_gpu)
        self.on_cpu += len(host)
        parts = rows + ([self.ops.upload(np.stack(host))] if host else [])
        images = self.ops.concatenate(parts) if parts else np.zeros((0, self.size, self.size, 3), np.uint8)
        self.seconds["cpu"] += time.perf_counter() - now
        return order, images, reasons

    def decode(self, paths: list[str]):
        """The three stages one after the other (a run overlaps them: :func:`gpu_batches`)."""
        datas, streams, _ = self.read(paths)
        return self.assemble(datas, streams, self.decode_streams(streams))

    def close(self) -> None:
        self.cpu.shutdown(wait=True, cancel_futures=True)


def gpu_batches(listing, todo, size: int, max_pixels: int, rows: int, workers: int, decoder: GpuDecoder | None = None,
                chunks: Chunks | None = None):
    """Yield :class:`~.batches.Batch` es decoded on the GPU, THREAD_PREFETCH_BATCHES ahead.

    The decoder's three stages run in three threads, a batch apart: while batch k is being
    assembled (DLPack hand-over and resize, which hold the GIL), k+1 is in nvImageCodec (which
    does not) and k+2's files are being read. One thread did all three before, and its host
    time, not the GPU, set the rate. ``chunks``: where the batches come from (shared with the
    decoding processes in a hybrid run; the read stage takes the next one when it is free)."""
    decoder = decoder or GpuDecoder(size, max_pixels, workers)
    chunks = chunks if chunks is not None else Chunks(todo, rows)
    out: queue.Queue = queue.Queue(maxsize=THREAD_PREFETCH_BATCHES)
    stop = threading.Event()

    def produce():
        read = decoded = None
        try:
            read = _ahead(((pairs, decoder.read([listing.path(e) for e, _ in pairs])) for pairs in chunks),
                          "featcache-gpu-read")
            decoded = _ahead(((pairs, files, decoder.decode_streams(files[1])) for pairs, files in read),
                             "featcache-gpu-decode")
            for pairs, (datas, streams, digests), images in decoded:
                if stop.is_set():
                    return
                order, images, reasons = decoder.assemble(datas, streams, images)
                ok = collect([pairs[i] for i in order], [None] * len(order), lambda good: images,
                             [digests[i] for i in order])
                ok.failed = [(pairs[i][0].relpath, reason) for i, reason in sorted(reasons.items())]
                out.put(ok)
        except BaseException as exc:  # surface decoder crashes in the main thread
            out.put(exc)
        finally:
            # Downstream first: once the decoding thread has ended, nothing is inside ``read``.
            for stage in (decoded, read):
                if stage is not None:
                    stage.close()
            decoder.close()
            out.put(None)

    return drain(out, stop, threading.Thread(target=produce, name="featcache-gpu-assemble", daemon=True))


def _ahead(items, name: str):
    """Yield ``items`` as a thread of their own computes them, one ahead (a stage of gpu_batches)."""
    handoff: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def run():
        try:
            for item in items:
                if stop.is_set():  # the consumer left: drain() takes what is put meanwhile
                    return
                handoff.put(item)
        except BaseException as exc:  # noqa: BLE001 (drain raises it where the items are taken)
            handoff.put(exc)
        finally:
            handoff.put(None)

    return drain(handoff, stop, threading.Thread(target=run, name=name, daemon=True))
