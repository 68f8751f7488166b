"""Decoding ahead of the model: whole batches of uint8 images, decoded in threads or processes.

Threads (a few cores: the model is the limit) decode file by file through a thread pool, a
couple of batches ahead. Processes (many cores feeding a fast model: decoding is the limit,
and threads stop scaling at about 4.5 busy cores because of the GIL) decode chunks of a batch
straight into a ring of batch buffers in shared memory, so a batch reaches the model as one
uint8 array without being pickled, copied or stacked. The ring holds the batches the model is
working on plus enough decoded-ahead batches to keep every process busy.

A decoding process that dies (killed, out of memory) ends the run with
:class:`DecoderDied`; what was committed stays.
"""
from __future__ import annotations

import functools
import math
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from ...errors import FeatcacheError
from .batches import THREAD_PREFETCH_BATCHES, Chunks, collect, drain
from .claims import LocalClaims, SharedClaims
from .decode import decode_file_hashed

MODEL_HELD_SLOTS = 2  # ring slots the model may hold: the batch being dispatched and the one being fetched
# Cores a hybrid run leaves to its main process and the GPU decoder's host threads (file reads,
# nvImageCodec's calls, the hand-over and resize dispatch); the rest run decoding processes.
HYBRID_HOST_CORES = 4
MAX_CHUNK = 64  # images per process task: large enough that messages are rare, small enough to balance
THREAD_CHUNK = 64  # images per thread task at most (a batch split among the threads): a task per file cost ~50 us under the GIL


class DecoderDied(FeatcacheError):
    """A decoding process ended abruptly; the batches it was decoding are lost, nothing else."""

    def __init__(self):
        super().__init__("a decoding process was terminated abruptly (killed, or out of memory)")
        self.reason = str(self)


def default_workers(decode: str) -> int:
    cores = os.cpu_count() or 1
    if decode == "processes":
        return max(1, cores - 1)  # one core for the main process (model dispatch, store writes)
    if decode == "hybrid":
        return max(1, cores - HYBRID_HOST_CORES)
    return min(4, cores)


def decoded_batches(listing, todo, config, size: int, decode: str, resize: str, rows: int):
    """Yield :class:`~.batches.Batch` es of ``rows`` images over ``todo`` ((entry, digest) pairs)."""
    workers = config.decode_workers or default_workers(decode)
    if decode == "processes":
        return process_batches(listing, todo, size, resize, config.max_pixels, rows, workers)
    if decode == "gpu":
        from .gpu_decode import gpu_batches

        return gpu_batches(listing, todo, size, config.max_pixels, rows, workers)
    if decode == "hybrid":
        return hybrid_batches(listing, todo, size, config.max_pixels, rows, workers)
    return _thread_batches(listing, todo, size, resize, config.max_pixels, rows, workers)


def hybrid_batches(listing, todo, size: int, max_pixels: int, rows: int, workers: int, decoder=None):
    """The GPU decoder and ``workers`` decoding processes, each taking the next batch when free.

    Both sides give ``gpu-bilinear`` images: the processes decode with Pillow (libjpeg) and
    resize with the same float triangle filter the GPU applies (:func:`.resize.resize_array`),
    so the run keeps the key of ``--decode gpu`` (see docs/gpu-decoding.md for why)."""
    from .gpu_decode import gpu_batches
    from .hybrid import QUEUED_BATCHES, interleave
    from .resize import GPU_RESIZE

    chunks = Chunks(todo, rows)
    # The consumer may hold the model's batches, the queue's, and one a source waits to queue.
    held = MODEL_HELD_SLOTS + QUEUED_BATCHES + 1
    return interleave(chunks, {
        "gpu": lambda c: gpu_batches(listing, todo, size, max_pixels, rows, min(4, workers), decoder, chunks=c),
        "processes": lambda c: process_batches(listing, todo, size, GPU_RESIZE, max_pixels, rows, workers, c, held),
    })


def _thread_batches(listing, todo, size, resize, max_pixels, rows, workers):
    """Decode in threads (a few files a task), THREAD_PREFETCH_BATCHES batches ahead, in a producer thread."""
    out: queue.Queue = queue.Queue(maxsize=THREAD_PREFETCH_BATCHES)
    stop = threading.Event()
    decode = functools.partial(decode_file_hashed, size=size, resize=resize, max_pixels=max_pixels,
                               claims=LocalClaims())
    chunk = max(1, min(THREAD_CHUNK, rows // (4 * max(1, workers))))  # 4+ tasks a thread per batch: balanced

    def decode_chunk(paths):
        return [decode(path) for path in paths]

    def emit(pairs, decoded):
        decoded = [result for results in decoded for result in results]
        images = [image for image, _, _ in decoded]

        def stack(good):
            return np.stack([images[i] for i in good]) if good else np.zeros((0, size, size, 3), np.uint8)

        out.put(collect(pairs, [reason for _, reason, _ in decoded], stack, [digest for _, _, digest in decoded]))

    def produce():
        pool = ThreadPoolExecutor(workers)
        try:
            # Several batches in the pool at once: no barrier between batches, workers never idle.
            pending = deque()
            for start in range(0, len(todo), rows):
                if stop.is_set():
                    return
                pairs = todo[start : start + rows]
                paths = [listing.path(e) for e, _ in pairs]
                pending.append((pairs, pool.map(decode_chunk, [paths[i : i + chunk] for i in range(0, len(paths), chunk)])))
                if len(pending) > THREAD_PREFETCH_BATCHES:
                    emit(*pending.popleft())
            while pending and not stop.is_set():
                emit(*pending.popleft())
        except BaseException as exc:  # surface decoder crashes in the main thread
            out.put(exc)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            out.put(None)

    return drain(out, stop, threading.Thread(target=produce, name="featcache-decode", daemon=True))


# -- processes writing into a shared-memory ring ------------------------------------------------

_RING: tuple | None = None  # in a decoding process: (SharedMemory, ndarray view of the ring)
_CLAIMS: SharedClaims | None = None  # in a decoding process: the run's claimed contents (twins)


def _attach_ring(name: str, shape: tuple[int, ...], claims: tuple) -> None:
    """Process initializer: leave Ctrl-C to the main process, map the ring and the claims, end
    with the main process."""
    global _RING, _CLAIMS
    from multiprocessing import shared_memory

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shm = shared_memory.SharedMemory(name=name)
    _RING = (shm, np.ndarray(shape, np.uint8, shm.buf))
    _CLAIMS = SharedClaims.attach(claims)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A main process killed with SIGKILL cannot stop its pool, and the pool's queue never
    reports it gone (each process holds both of its ends): leave when the parent changes."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def _decode_into_ring(slot: int, start: int, paths: list[str], size: int, resize: str, max_pixels: int) -> list:
    """Decode ``paths`` into rows start.. of ring slot ``slot``; (failure reason or None, sha256
    of the bytes read) of each."""
    ring = _RING[1][slot]
    results = []
    for i, path in enumerate(paths):
        image, reason, digest = decode_file_hashed(path, size, resize, max_pixels, _CLAIMS)
        if image is not None:
            ring[start + i] = image
        results.append((reason, digest))
    return results


def ring_slots(rows: int, workers: int, chunk: int, held: int = MODEL_HELD_SLOTS) -> int:
    """Batches in the ring: those the consumer holds, plus enough decoded ahead that every
    process has two chunks queued (no process waits at a batch boundary), and at least two."""
    return held + max(2, math.ceil(2 * workers * chunk / rows))


def process_batches(listing, todo, size, resize, max_pixels, rows, workers, chunks: Chunks | None = None,
                    held: int = MODEL_HELD_SLOTS):
    """Batches decoded by processes into the shared-memory ring. ``chunks``: where the batches
    come from (shared with other decoders in a hybrid run); ``held``: batches the consumer may
    hold at once (the model's two, plus a hybrid run's queue)."""
    import multiprocessing
    from multiprocessing import shared_memory

    chunks = chunks if chunks is not None else Chunks(todo, rows)
    chunk = max(1, min(MAX_CHUNK, math.ceil(rows / workers)))
    slots = ring_slots(rows, workers, chunk, held)
    shape = (slots, rows, size, size, 3)
    shm = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)))
    ring = np.ndarray(shape, np.uint8, shm.buf)
    claims = SharedClaims.create(len(todo))
    # spawn: forking a process that runs TF/JAX threads is unsafe
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _attach_ring,
                               (shm.name, shape, claims.handle()))
    free = deque(range(slots))
    pending: deque = deque()  # (slot, pairs, futures) in the order the chunks were taken
    # Releases come from the consumer's thread; in a hybrid run this generator runs in another.
    state = threading.Condition()
    exhausted = []  # the chunks ran out (or were closed): no more submits

    def submit() -> bool:  # with ``state`` held
        if exhausted or not free:
            return False
        pairs = chunks.next()
        if pairs is None:
            exhausted.append(True)
            return False
        slot = free.popleft()
        futures = [pool.submit(_decode_into_ring, slot, i, [listing.path(e) for e, _ in pairs[i : i + chunk]],
                               size, resize, max_pixels) for i in range(0, len(pairs), chunk)]
        pending.append((slot, pairs, futures))
        return True

    broken = []  # a submit after a batch was released found the pool broken
    closed = []  # the generator has ended (a stop): batches still held are released into nothing

    def release(slot: int) -> None:
        with state:
            free.append(slot)
            if not closed:
                try:
                    submit()
                except BrokenProcessPool:
                    broken.append(True)
            state.notify_all()

    try:
        with state:
            try:
                while submit():
                    pass
            except BrokenProcessPool:
                raise DecoderDied() from None
        while True:
            with state:
                # Every slot downstream (a hybrid run's queue and model): wait for a release.
                while not pending and not exhausted and not broken and not chunks.closed:
                    state.wait(0.1)
                if broken:
                    raise DecoderDied()
                if not pending:
                    break
                slot, pairs, futures = pending.popleft()
            try:
                results = [r for f in futures for r in f.result()]
            except BrokenProcessPool:
                raise DecoderDied() from None

            def images_of(good, slot=slot, n=len(pairs)):
                if len(good) == n:
                    return ring[slot, :n]  # the common case: no copy
                return ring[slot, good]

            batch = collect(pairs, [r for r, _ in results], images_of, [d for _, d in results])
            batch.release = functools.partial(release, slot)
            yield batch
    finally:
        with state:
            closed.append(True)
            left = list(pending)
        for _, _, futures in left:
            for f in futures:
                f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        claims.close()
        del ring
        try:
            shm.close()
        except BufferError:  # a batch view still alive (an exception on its way): the mapping goes with it
            pass
        shm.unlink()
