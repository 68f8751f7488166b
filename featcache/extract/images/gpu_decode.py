"""JPEG decoding on the GPU (``--decode gpu``): nvImageCodec decodes, the Keras backend resizes.

Why nvImageCodec: it decodes batches of JPEGs with nvJPEG (the GPU's hardware JPEG decoder
where there is one, CUDA otherwise), applies EXIF orientation, decodes into memory it is given
(``Decoder.decode(streams, images=as_images(views))``, 0.7 and later) and exports DLPack, which
JAX and TensorFlow take without a copy through host memory. It has no resize, so the backend
resizes (``gpu-bilinear`` of :mod:`.resize`: two matmuls per image size, weights cached on the
device) into the batch the model takes: nothing goes back to the host.

Per batch: the files are read and hashed in a thread pool; one ``decode`` call writes every
JPEG into one device buffer (nvImageCodec's, from a ring of three), the images of each header
size end to end; each size's stretch goes to the backend in one DLPack hand-over and one
resize call (images EXIF-turned a quarter are picked out of it by a gather). Per-image hand-
overs and resize dispatches, which held ``--decode gpu`` at half the decoder's own rate, are gone.

Files that are not JPEG (by their first bytes), JPEGs that are not 1- or 3-channel (CMYK),
that are larger than ``--max-pixels``, or that nvImageCodec cannot decode go through the CPU
path (Pillow, with the same ``gpu-bilinear`` filter), which decodes them or reports why not,
as any run does. Their rows are uploaded and joined to the batch. A compiled resize exists per
image size and count in a batch, so a folder of many thousand sizes pays for many compiles.
"""
from __future__ import annotations

import functools
import hashlib
import queue
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...errors import FeatcacheError
from .decode import DecodeError, decode_image, read_bytes
from .batches import THREAD_PREFETCH_BATCHES, Chunks, collect, drain
from .device_ops import BACKEND_OPS, backend_ops
from .resize import GPU_RESIZE

NVIMGCODEC_MISSING = ("--decode gpu needs NVIDIA nvImageCodec: pip install 'featcache[gpu-decode]' "
                      "(nvidia-nvimgcodec-cu12[nvjpeg]; on CUDA 13 nvidia-nvimgcodec-cu13[nvjpeg])")
JPEG_MAGIC = b"\xff\xd8\xff"
# File reads and hashes of the read stage. Few: each read and hash lets go of the GIL and takes it
# back, and on the H200 machine 8 threads read + hashed 4,100 files/s, 2 threads 11,400, 16 threads
# 2,500 (34 KB JPEGs from page cache); with 2, the GPU path ran 1.5x faster than with 8.
READ_THREADS = 2
RING = 3  # device buffers the decode stage cycles through: one decoding, two read by resizes in flight
ALIGN = 256  # bytes: where each size's images start in a buffer (DLPack consumers want aligned data)
STREAM = 0  # the CUDA stream nvImageCodec decodes on; DLPack makes the backend's stream wait for it


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
    if backend not in BACKEND_OPS:
        raise FeatcacheError(f"--decode {decode} hands images to Keras on JAX or TensorFlow, not {backend}; "
                             "set KERAS_BACKEND=jax (or tensorflow), or use --decode processes")
    if not gpu_visible():
        raise FeatcacheError(f"--decode {decode}: no CUDA GPU is visible to Keras ({backend}); "
                             "use --decode processes (or threads)")


class _View:
    """A stretch of device memory as nvImageCodec takes it: an object with __cuda_array_interface__."""

    def __init__(self, shape: tuple, address: int):
        self.__cuda_array_interface__ = dict(shape=shape, typestr="|u1", data=(address, False), version=3, strides=None)


class _Slot:
    """A device buffer of the decode stage (an nvImageCodec Image of ``capacity`` bytes), and the
    backend arrays last computed from it: it is rewritten only once they are ready."""

    image, address, capacity, pending = None, 0, 0, None


class GpuDecoder:
    """Decodes a batch of files into one (n, size, size, 3) uint8 device array, in the backend's type.

    A batch's JPEGs are decoded in one ``Decoder.decode`` call straight into one device buffer,
    the images of each size end to end; the backend takes each size's stretch of it through one
    DLPack hand-over and resizes it in one call. Per image there is a CodeStream and a view
    (a dict), nothing that crosses into the backend."""

    def __init__(self, size: int, max_pixels: int, workers: int):
        nv = import_nvimgcodec()
        self.nv, self.size, self.max_pixels = nv, size, max_pixels
        # Fancy (smooth) chroma upsampling, as libjpeg does it: closer to the CPU path's pixels.
        self.decoder = nv.Decoder(options=":fancy_upsampling=1")
        self.params = nv.DecodeParams(apply_exif_orientation=True, color_spec=nv.ColorSpec.SRGB)
        # Decoding into our buffer (Images over external memory): nvImageCodec 0.7 and later.
        self.into_buffer = tuple(map(int, re.findall(r"\d+", getattr(nv, "__version__", "0"))[:2])) >= (0, 7)
        self.ops = backend_ops()
        self.io = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="featcache-gpu-io")  # reads and hashes
        self.cpu = ThreadPoolExecutor(workers)  # files left to the CPU path
        self.ring = [_Slot() for _ in range(RING)]
        self.turn = 0
        self.on_gpu = self.on_cpu = 0  # images decoded on each side (reported by the run)
        # batches nvImageCodec failed as a whole (the CPU path took them), and the last reason why
        self.failed_batches, self.last_failure = 0, None
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

    @staticmethod
    def _load(path: str):
        """A file's bytes and sha256 (in the read pool: both let go of the GIL), or why not."""
        try:
            data = read_bytes(path)
        except DecodeError as exc:
            return exc, None
        return data, hashlib.sha256(data).hexdigest()

    def read(self, paths: list[str]):
        """Stage one: each file's bytes (or why not), a CodeStream for each JPEG the GPU takes,
        and each file's sha256 (None: unreadable), hashed here so a file is read once."""
        started = time.perf_counter()
        datas, digests = zip(*self.io.map(self._load, paths)) if paths else ((), ())
        parsed = time.perf_counter()
        streams = {i: s for i, d in enumerate(datas) if isinstance(d, bytes) and (s := self._gpu_candidate(d)) is not None}
        self.seconds["read"] += parsed - started
        self.seconds["parse"] += time.perf_counter() - parsed
        return list(datas), streams, list(digests)

    def _slot(self, nbytes: int) -> _Slot:
        """The next device buffer of the ring, at least ``nbytes``, once the backend is done with it."""
        slot = self.ring[self.turn % RING]
        self.turn += 1
        if slot.pending is not None:
            self.ops.ready(slot.pending)  # the resizes that read it have run: it may be rewritten
            slot.pending = None
        if slot.capacity < nbytes:  # nvImageCodec allocates it (a copy from the host, once per growth)
            slot.capacity = nbytes + nbytes // 4
            slot.image = self.nv.as_image(np.empty((slot.capacity, 1, 1), np.uint8)).cuda()
            slot.address = slot.image.__cuda_array_interface__["data"][0]
        return slot

    def _failed_whole(self, exc: Exception, n: int) -> list:
        """A batch nvImageCodec failed as a whole: counted, its reason kept, and ``n`` Nones (the
        CPU path decodes its files or says why)."""
        self.failed_batches, self.last_failure = self.failed_batches + 1, f"{exc.__class__.__name__}: {exc}"
        return [None] * n

    def decode_streams(self, streams: dict):
        """Stage two: nvImageCodec decodes the batch (one call; it lets go of the GIL meanwhile)
        into one device buffer, and the backend resizes it, a DLPack hand-over and a call per
        image size. Returns ([index into the files, per row], [device arrays of rows]); an image
        nvImageCodec rejects is in neither (the CPU path decodes it or says why)."""
        if not streams:
            return [], []
        if not self.into_buffer:
            return self._decode_images(streams)
        started = time.perf_counter()
        groups: dict[tuple, list] = {}  # header (height, width) -> file indices, laid end to end
        for i, stream in streams.items():
            groups.setdefault((stream.height, stream.width), []).append(i)
        offsets, total = {}, 0
        for (h, w), members in groups.items():
            offsets[h, w], total = total, total + -(-len(members) * h * w * 3 // ALIGN) * ALIGN
        slot = self._slot(total)
        views = [_View((h, w, 3), slot.address + offsets[h, w] + k * h * w * 3)
                 for (h, w), members in groups.items() for k in range(len(members))]
        try:
            decoded = self.decoder.decode([streams[i] for members in groups.values() for i in members],
                                          images=self.nv.as_images(views, STREAM), params=self.params,
                                          cuda_stream=STREAM)
        except Exception as exc:  # noqa: BLE001 (a batch the library fails as a whole: the CPU path takes it)
            decoded = self._failed_whole(exc, len(views))
        clock = time.perf_counter()
        self.seconds["decode"] += clock - started
        order, parts, at = [], [], 0
        for (h, w), members in groups.items():
            got, at = decoded[at : at + len(members)], at + len(members)
            shapes = [None if image is None else tuple(image.shape) for image in got]
            upright = [k for k, shape in enumerate(shapes) if shape == (h, w, 3)]
            # EXIF-rotated by a quarter turn: (w, h) in a slot of the same bytes
            turned = [k for k, shape in enumerate(shapes) if shape == (w, h, 3) and h != w]
            if not upright and not turned:
                continue
            group = self.ops.from_dlpack(self.nv.as_image(_View((len(members) * h, w, 3), slot.address + offsets[h, w]),
                                                          STREAM))
            for take, (rows, cols) in ((upright, (h, w)), (turned, (w, h))):
                if take:
                    index = None if len(take) == len(members) else np.asarray(take, np.int32)
                    parts.append(self.ops.resize(group, index, self._weights(rows), self._weights(cols)))
                    order += [members[k] for k in take]
        slot.pending = parts
        self.seconds["resize"] += time.perf_counter() - clock
        return order, parts

    def _decode_images(self, streams: dict):
        """nvImageCodec before 0.7 (no decoding into given memory): an Image per file, handed
        over one by one and joined per size in the backend."""
        started = time.perf_counter()
        try:
            decoded = self.decoder.decode(list(streams.values()), params=self.params)
        except Exception as exc:  # noqa: BLE001 (as above)
            decoded = self._failed_whole(exc, len(streams))
        clock = time.perf_counter()
        self.seconds["decode"] += clock - started
        shapes: dict[tuple, list] = {}
        for i, image in zip(list(streams), decoded):
            if image is not None:
                shapes.setdefault(tuple(image.shape), []).append((i, image))
        order, parts = [], []
        for (h, w, _), members in shapes.items():
            group = self.ops.concatenate([self.ops.from_dlpack(image) for _, image in members])  # (n * h, w, c)
            parts.append(self.ops.resize(group, None, self._weights(h), self._weights(w)))
            order += [i for i, _ in members]
        self.seconds["resize"] += time.perf_counter() - clock
        return order, parts

    def assemble(self, datas: list, streams: dict, decoded):
        """Stage three: the GPU's rows joined with the rows the CPU path decodes. Returns
        ([index into the files, in the order of the batch's rows], device images, {index: reason})."""
        clock = time.perf_counter()
        order, parts = list(decoded[0]), list(decoded[1])
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
        parts += [self.ops.upload(np.stack(host))] if host else []
        images = self.ops.concatenate(parts) if parts else np.zeros((0, self.size, self.size, 3), np.uint8)
        self.seconds["cpu"] += time.perf_counter() - clock
        return order, images, reasons

    def decode(self, paths: list[str]):
        """The three stages one after the other (a run overlaps them: :func:`gpu_batches`)."""
        datas, streams, _ = self.read(paths)
        return self.assemble(datas, streams, self.decode_streams(streams))

    def close(self) -> None:
        self.io.shutdown(wait=True, cancel_futures=True)
        self.cpu.shutdown(wait=True, cancel_futures=True)
        pending = [slot.pending for slot in self.ring if slot.pending is not None]
        if pending:
            self.ops.ready(pending)  # no resize may still read a buffer when it is freed
        self.ring = [_Slot() for _ in range(RING)]


def gpu_batches(listing, todo, size: int, max_pixels: int, rows: int, workers: int, decoder: GpuDecoder | None = None,
                chunks: Chunks | None = None):
    """Yield :class:`~.batches.Batch` es decoded on the GPU, THREAD_PREFETCH_BATCHES ahead.

    The decoder's three stages run in three threads, a batch apart: while batch k is being
    assembled (the CPU path's rows joined), k+1 is in nvImageCodec and the backend's resize,
    and k+2's files are being read (by a pool). ``chunks``: where the batches come from (shared
    with the decoding processes in a hybrid run; the read stage takes the next one when free)."""
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
                ok.failed_digests = {digests[i]: reason for i, reason in reasons.items() if digests[i] is not None}
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
