"""Chunks torn by a killed writer: not damage, and readable.

HDF5 rewrites a dataset's last, partly filled chunk in place when rows are appended to it, and
a run that re-lists a folder rewrites ``labels``, ``splits`` and ``active`` in place. A writer
killed (SIGKILL) during such a write leaves the chunk half old, half new: the kernel stops a
write at a page boundary when a fatal signal arrives. The committed rows' bytes are the same
in both versions, so they are intact, but the chunk's checksum matches neither and HDF5
refuses to read it.

So in a store left by a killed writer (its superblock still marked open for writing and no
writer running), a chunk that fails its checksum where that writer was writing is read from its
raw bytes: the chunk holding a dataset's last committed element, or any chunk of the three
re-listed columns. A failing chunk anywhere else is damage. The next writer rewrites torn
chunks cleanly before it appends (:func:`rewrite_torn`).
"""
from __future__ import annotations

import h5py
import numpy as np

from . import damage

# by a run that re-lists the folder, and the commit counter by every commit
REWRITTEN_IN_PLACE = ("labels", "splits", "active", "committed")


def chunk_starts(dataset: h5py.Dataset, start: int, stop: int):
    step = dataset.chunks[0]
    return range(start - start % step, stop, step)


def possibly_torn(name: str, chunk_start: int, chunk_stop: int, boundary: int) -> bool:
    """Could a killed writer have been rewriting this chunk of dataset ``name``, whose first
    ``boundary`` elements are committed?"""
    if name in REWRITTEN_IN_PLACE:
        return chunk_start < boundary
    return chunk_start < boundary < chunk_stop  # the partly filled last chunk


def raw_chunk(dataset: h5py.Dataset, chunk_start: int) -> np.ndarray:
    """A chunk's elements from its stored bytes, without the Fletcher-32 check (the filter
    appends the 4-byte checksum to the data)."""
    offset = (chunk_start,) + (0,) * (len(dataset.shape) - 1)
    _, raw = dataset.id.read_direct_chunk(offset)
    count = int(np.prod(dataset.chunks))
    values = np.frombuffer(raw, dtype=dataset.dtype, count=count)
    return values.reshape(dataset.chunks)


def read(dataset: h5py.Dataset, start: int, stop: int, boundary: int, torn_ok: bool, live: bool = True) -> np.ndarray:
    """``dataset[start:stop]``; with ``torn_ok`` (the store was left by a killed writer), chunks
    that writer may have torn are read from their raw bytes. Other failures are raised.
    ``live``: a writer may be running (see damage.read)."""
    try:
        return damage.read(dataset, slice(start, stop), live)
    except OSError as exc:
        if not (torn_ok and dataset.chunks and damage.is_data_checksum(exc)):
            raise
    name = dataset.name.rsplit("/", 1)[-1]
    pieces = []
    for a in chunk_starts(dataset, start, stop):
        b = a + dataset.chunks[0]
        lo, hi = max(a, start), min(b, stop)
        try:
            pieces.append(damage.read(dataset, slice(lo, hi), live))
        except OSError as exc:
            if not (damage.is_data_checksum(exc) and possibly_torn(name, a, b, boundary)):
                raise
            pieces.append(raw_chunk(dataset, a)[lo - a : hi - a])
    return np.concatenate(pieces)


def torn_chunks(dataset: h5py.Dataset, boundary: int) -> list[int]:
    """Starts of the chunks below ``boundary`` that fail their checksum where a killed writer
    may have torn them."""
    if not dataset.chunks or dataset.is_virtual or boundary <= 0:
        return []
    name = dataset.name.rsplit("/", 1)[-1]
    starts = chunk_starts(dataset, 0, boundary) if name in REWRITTEN_IN_PLACE else chunk_starts(dataset, boundary - 1, boundary)
    torn = []
    for a in starts:
        b = a + dataset.chunks[0]
        if not possibly_torn(name, a, b, boundary):
            continue
        try:
            damage.read(dataset, slice(a, min(b, boundary)), live=False)
        except OSError as exc:
            if damage.is_data_checksum(exc):
                torn.append(a)
    return torn


def rewrite_torn(dataset: h5py.Dataset, boundary: int) -> int:
    """For the writer, before it appends: rewrite every torn chunk below ``boundary`` from its
    raw bytes as a new chunk (cut the dataset at the first one, which drops those chunks
    without reading them, and write the elements back). Returns how many were torn."""
    torn = torn_chunks(dataset, boundary)
    if not torn:
        return 0
    first = torn[0]
    values = read(dataset, first, boundary, boundary, torn_ok=True, live=False)
    dataset.resize(first, axis=0)
    dataset.resize(boundary, axis=0)
    dataset[first:boundary] = values
    return len(torn)
