"""A batch of decoded images on its way to the model, and the producer-thread plumbing the
decoders (:mod:`.feeder`, :mod:`.gpu_decode`) share."""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable

from .claims import TWIN

THREAD_PREFETCH_BATCHES = 2  # decoded batches waiting for the model: enough to hide decode, memory stays flat


@dataclass
class Batch:
    """One batch for the model: the images that decoded, in listing order, and the failures."""

    entries: list
    digests: list[str]
    images: object  # (n, size, size, 3) uint8: numpy, or a device array (GPU decoding)
    failed: list[tuple[str, str]]
    release: Callable[[], None] = field(default=lambda: None)  # the images' buffer may be reused
    twins: list = field(default_factory=list)  # (entry, digest) not decoded: another file claimed the bytes
    failed_digests: dict = field(default_factory=dict)  # digest -> reason of the failures (their twins' too)


def collect(batch_pairs, results, images_of, digests=None) -> Batch:
    """A Batch from (entry, digest) pairs and per-image failure reasons (None: decoded; TWIN:
    not decoded, see :mod:`.claims`). ``digests``: per pair, the sha256 of the bytes the decoder
    read (the pair's digest is None in a cold run, see plan); the pair's own digest where not given."""
    digests = digests or [d for _, d in batch_pairs]
    good, failed, twins, failed_digests = [], [], [], {}
    for i, reason in enumerate(results):
        if reason is None:
            good.append(i)
        elif reason == TWIN:
            twins.append((batch_pairs[i][0], digests[i]))
        else:
            failed.append((batch_pairs[i][0].relpath, reason))
            if digests[i] is not None:
                failed_digests[digests[i]] = reason
    return Batch([batch_pairs[i][0] for i in good], [digests[i] for i in good], images_of(good), failed,
                 twins=twins, failed_digests=failed_digests)


def drain(out: queue.Queue, stop: threading.Event, thread: threading.Thread):
    """Yield a producer thread's items until None; stop it (and unblock it) when the consumer leaves."""
    thread.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock the producer if it waits on a full queue
            try:
                item = out.get(timeout=0.1)
                if isinstance(item, Batch):
                    item.release()
            except queue.Empty:
                pass


class Chunks:
    """The listing's batches (``rows`` pairs each, in order), handed out one at a time to
    whichever decoder asks first; thread-safe. Closed, it hands out nothing more (a stop)."""

    def __init__(self, todo: list, rows: int):
        self.todo, self.rows = todo, rows
        self._starts = iter(range(0, len(todo), rows))
        self._lock = threading.Lock()
        self.closed = False

    def next(self) -> list | None:
        """The next batch's (entry, digest) pairs, or None when there are none left."""
        with self._lock:
            start = None if self.closed else next(self._starts, None)
            if start is None:
                self.closed = True
                return None
            return self.todo[start : start + self.rows]

    def close(self) -> None:
        with self._lock:
            self.closed = True

    def __iter__(self):
        while (pairs := self.next()) is not None:
            yield pairs
