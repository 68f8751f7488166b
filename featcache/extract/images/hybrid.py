"""Hybrid decoding (``--decode hybrid``): several decoders feed one model at once.

Each decoder (the GPU decoder, the CPU decoding processes) runs in a thread of its own and
takes the next batch of the listing (:class:`~.batches.Chunks`) whenever it is free, so the
rate is about the sum of theirs and a slow decoder never holds up a fast one. Batches reach the
model in the order they are decoded, not in listing order: rows are found by path and digest,
never by position, so the store is the same set of rows as a run with one decoder.

A decoder that fails (a decoding process killed, a GPU error) ends the run with its error as
soon as the model takes the next batch; the other decoders are stopped, the batches already
decoded but not yet in the model are released, nothing waits forever.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

from .batches import THREAD_PREFETCH_BATCHES, Batch, Chunks

QUEUED_BATCHES = THREAD_PREFETCH_BATCHES  # decoded batches waiting for the model, from all decoders
_DONE = object()


def interleave(chunks: Chunks, sources: dict[str, Callable[[Chunks], Iterator[Batch]]]) -> Iterator[Batch]:
    """Yield the batches of every source as they come; each source draws its work from ``chunks``.

    ``sources`` maps a name to a function that takes the shared chunks and returns a generator
    of :class:`~.batches.Batch` es (each source is started, iterated and closed in its thread)."""
    out: queue.Queue = queue.Queue(maxsize=QUEUED_BATCHES)
    stop = threading.Event()

    def pump(make) -> None:
        try:
            batches = make(chunks)
            try:
                for batch in batches:
                    out.put(batch)
                    if stop.is_set():
                        return
            finally:
                batches.close()  # its processes, threads and buffers end here, in its own thread
        except BaseException as exc:  # noqa: BLE001 (raised where the model takes batches)
            chunks.close()  # the others hand out no more work
            out.put(exc)
        finally:
            out.put(_DONE)

    threads = [threading.Thread(target=pump, args=(make,), name=f"featcache-hybrid-{name}", daemon=True)
               for name, make in sources.items()]
    for thread in threads:
        thread.start()
    live = len(threads)
    try:
        while live:
            item = out.get()
            if item is _DONE:
                live -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        chunks.close()
        while any(t.is_alive() for t in threads):  # unblock the sources: release what they queued
            try:
                item = out.get(timeout=0.1)
            except queue.Empty:
                continue
            if isinstance(item, Batch):
                item.release()
