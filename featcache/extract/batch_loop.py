"""The extraction loop: decoded batches through the model into the store, overlapped.

Three things run at once: decoding (threads, processes or the GPU, :mod:`.feeder`), the model
(batch k+1 is dispatched before batch k's features are fetched, so a GPU never waits for the
host), and the store appends (a writer thread: appending and committing a batch never holds up
the model). Each batch is still committed on its own, in order, so a killed run loses at most
the batches in flight; on SIGINT/SIGTERM the batches already through the model are committed
before the run stops.

A batch's digests are those of the bytes its decoders read (a cold run hashes nowhere else, see
:mod:`.plan`). Byte-identical twins are extracted once: the decoders skip the decode of bytes
another file of the run claimed (:mod:`.images.claims`), and a row whose digest an earlier row
of the run already has is dropped before the model runs. Both are returned in
``LoopResult.twins``: the caller copies the features of the first one (a bulk copy), or its
failure (``LoopResult.failed_digests``).
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .images.feeder import DecoderDied
from .signals import Interrupted

APPEND_QUEUE_BATCHES = 2  # batches of features waiting for the writer: memory stays flat


@dataclass
class LoopResult:
    extracted: int = 0
    seconds: float = 0.0  # the whole loop
    first_batch_seconds: float = 0.0  # until the first batch's features were back (decode, compile, run)
    steady_images: int = 0  # images of batches 2..N (dispatched once the first batch's features were back)
    steady_seconds: float = 0.0  # and the time they took
    new_rows: dict[str, int] = field(default_factory=dict)  # digest -> row
    write_seconds: float = 0.0  # appending and committing (in the writer thread, overlapped with the model)
    twins: list = field(default_factory=list)  # (entry, digest) dropped: an earlier row had these bytes
    failed_digests: dict = field(default_factory=dict)  # digest -> reason its file failed (for its twins)

    @property
    def images_per_second(self) -> float:
        """Steady state (batches 2..N); the whole loop when there was only one batch."""
        if self.steady_images and self.steady_seconds > 0:
            return self.steady_images / self.steady_seconds
        return self.extracted / self.seconds if self.extracted and self.seconds > 0 else 0.0


class _Appender:
    """A thread that appends and commits batches in order; errors come back to the caller."""

    def __init__(self, writer, result: LoopResult, failures: list, on_commit, stats=None):
        self.writer, self.result, self.failures, self.on_commit, self.stats = writer, result, failures, on_commit, stats
        self.queue: queue.Queue = queue.Queue(maxsize=APPEND_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="featcache-append", daemon=True)
        self.thread.start()

    def put(self, entries, digests, features, failed) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((entries, digests, features, failed))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self._write(*item)
                except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
                    self.error = exc

    def _write(self, entries, digests, features, failed) -> None:
        if not entries and not failed:  # a batch of twins only: nothing to commit (a flush saved)
            return
        writer = self.writer
        started = time.perf_counter()
        if entries:
            first_row = writer.group["features"].shape[0]
            writer.append(features, [e.label for e in entries], [e.relpath for e in entries], digests,
                          [e.split for e in entries], self.stats.of(entries) if self.stats is not None else None)
            self.result.new_rows.update((d, first_row + i) for i, d in enumerate(digests))
        writer.add_failures(failed)
        writer.commit()
        self.result.write_seconds += time.perf_counter() - started
        self.failures.extend(failed)
        self.result.extracted += len(entries)
        self.on_commit(len(entries) + len(failed))

    def close(self, raise_error: bool) -> None:
        """Wait until every queued batch is committed."""
        self.queue.put(None)
        self.thread.join()
        if raise_error and self.error is not None:
            raise self.error


def take_rows(images, rows: list[int]):
    """Rows ``rows`` of a batch's images: numpy, or a backend tensor (GPU decoding)."""
    if isinstance(images, np.ndarray):
        return images[rows]
    import keras

    return keras.ops.take(images, np.asarray(rows, np.int32), axis=0)


def drop_twins(batch, seen: set, twins: list):
    """``batch`` without the rows whose digest is in ``seen`` (or earlier in the batch); those
    rows go to ``twins``, the others' digests into ``seen``."""
    keep = []
    for i, (entry, digest) in enumerate(zip(batch.entries, batch.digests)):
        if digest in seen:
            twins.append((entry, digest))
        else:
            seen.add(digest)
            keep.append(i)
    if len(keep) == len(batch.entries):
        return batch
    return dataclasses.replace(batch, entries=[batch.entries[i] for i in keep],
                               digests=[batch.digests[i] for i in keep], images=take_rows(batch.images, keep))


def run_batches(writer, batches, model, dtype: str, failures: list, on_commit=lambda n: None,
                stats=None) -> LoopResult:
    """Run ``batches`` (:class:`~.feeder.Batch`) through ``model`` into ``writer``, one commit each.
    ``stats``: a filestat.FileStats, the stat records stored with the rows."""
    result = LoopResult()
    started = time.perf_counter()
    first_done = None
    appender = _Appender(writer, result, failures, on_commit, stats)
    in_flight = None  # (batch, model handle): dispatched, features not fetched yet
    seen: set = set()  # digests of the rows sent to the model

    def finish(batch, handle) -> None:
        nonlocal first_done
        features = model.fetch(handle).astype(dtype, copy=False) if handle is not None else None
        if first_done is None:
            first_done = time.perf_counter()
        else:
            result.steady_images += len(batch.entries)
        appender.put(batch.entries, batch.digests, features, batch.failed)
        batch.release()  # its images' buffer may take the next batch

    ok = False
    try:
        try:
            for batch in batches:
                twins_before = len(result.twins)
                result.twins += batch.twins
                result.failed_digests.update(batch.failed_digests)
                batch = drop_twins(batch, seen, result.twins)
                if len(result.twins) > twins_before:  # done here: copied at the end (progress counts them now)
                    on_commit(len(result.twins) - twins_before)
                handle = model.dispatch(batch.images) if len(batch.entries) else None
                done, in_flight = in_flight, (batch, handle)
                if done is not None:
                    finish(*done)
                if first_done is None:
                    # The first batch alone: its features back ends the start-up. (Overlapped, a
                    # backend that computes on dispatch, TensorFlow on a CPU, ran batch 2 before
                    # batch 1 was fetched, and batch 2 then counted as steady state for free.)
                    done, in_flight = in_flight, None
                    finish(*done)
            if in_flight is not None:
                done, in_flight = in_flight, None
                finish(*done)
        except (Interrupted, DecoderDied):
            if in_flight is not None:  # through the model already: commit it before stopping
                done, in_flight = in_flight, None
                finish(*done)
            raise
        ok = True
    finally:
        appender.close(raise_error=ok)
        result.seconds = time.perf_counter() - started
        if first_done is not None:
            result.first_batch_seconds = first_done - started
            result.steady_seconds = time.perf_counter() - first_done
    return result
