"""Appendable text columns that SWMR readers can follow.

A text column ``NAME`` is two fixed-type datasets: ``NAME_utf8`` (uint8, the entries' UTF-8
bytes back to back) and ``NAME_end`` (int64, where each entry ends in ``NAME_utf8``). HDF5's
variable-length strings cannot be used: their bytes live in a global heap that a writer in
SWMR mode allocates after a reader opened the file, and the reader then fails with "address of
object past end of allocation" (HDF5 supports only fixed-size types under SWMR).
"""

from __future__ import annotations

import h5py
import numpy as np

from . import damage
from .damage import StoreDamaged

BYTES_CHUNK = 1 << 16


def names(column: str) -> tuple[str, str]:
    """The two datasets of a text column: (bytes, end offsets)."""
    return f"{column}_utf8", f"{column}_end"


def create(group: h5py.Group, column: str, chunk_rows: int, chunk_bytes: int = BYTES_CHUNK) -> None:
    data, ends = names(column)
    # Fletcher-32: a damaged chunk fails to read (see layout.py)
    group.create_dataset(data, shape=(0,), maxshape=(None,), chunks=(chunk_bytes,), dtype="uint8", fletcher32=True)
    group.create_dataset(ends, shape=(0,), maxshape=(None,), chunks=(chunk_rows,), dtype="int64", fletcher32=True)


def count(group: h5py.Group, column: str) -> int:
    """Entries written (committed or not)."""
    return group[names(column)[1]].shape[0]


def _end_at(group: h5py.Group, column: str, n: int) -> int:
    """Bytes used by the first ``n`` entries."""
    return int(group[names(column)[1]][n - 1]) if n else 0


def append(group: h5py.Group, column: str, texts) -> None:
    data, ends = (group[name] for name in names(column))
    encoded = [t.encode("utf-8") for t in texts]
    n = ends.shape[0]
    start = _end_at(group, column, n)
    offsets = start + np.cumsum([len(b) for b in encoded], dtype=np.int64)
    blob = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    # bytes first: an entry's end offset never points past bytes already written
    data.resize(start + len(blob), axis=0)
    data[start:] = blob
    ends.resize(n + len(encoded), axis=0)
    ends[n:] = offsets


def truncate(group: h5py.Group, column: str, n: int) -> None:
    """Keep the first ``n`` entries (cut the in-flight tail of a killed run)."""
    data, ends = (group[name] for name in names(column))
    ends.resize(n, axis=0)
    data.resize(_end_at(group, column, n), axis=0)


def bad_ends(offsets: np.ndarray, nbytes: int) -> int | None:
    """The first entry whose end offset cannot be right (negative, decreasing, or past the
    ``nbytes`` bytes stored), or None."""
    if not len(offsets):
        return None
    bad = np.flatnonzero((np.diff(offsets, prepend=0) < 0) | (offsets > nbytes))
    return int(bad[0]) if len(bad) else None


def decode(blob: bytes, offsets: np.ndarray) -> list[str]:
    """Entries from their bytes back to back and their end offsets (UnicodeDecodeError if not UTF-8)."""
    starts = [0, *offsets[:-1].tolist()] if len(offsets) else []
    if blob.isascii():  # byte offsets are character offsets: one decode, then slices
        whole = blob.decode("ascii")
        return [whole[s:e] for s, e in zip(starts, offsets.tolist())]
    return [blob[s:e].decode("utf-8") for s, e in zip(starts, offsets.tolist())]


def _read_plain(dataset: h5py.Dataset, start: int, stop: int, boundary: int) -> np.ndarray:
    return damage.read(dataset, slice(start, stop))


def read(group: h5py.Group, column: str, n: int, read_range=_read_plain) -> np.ndarray:
    """The first ``n`` entries as an object array of str; StoreDamaged if they cannot be right.
    ``read_range(dataset, start, stop, committed)`` reads elements (see FeatureSet._read)."""
    data, ends = (group[name] for name in names(column))
    path, feature_set = group.file.filename, group.name.rsplit("/", 1)[-1]
    offsets = read_range(ends, 0, n, n) if n else np.zeros(0, np.int64)
    first_bad = bad_ends(offsets, data.shape[0])
    if first_bad is not None:
        raise StoreDamaged(path, f"{column} column", f"entry {first_bad} ends at byte {int(offsets[first_bad])}, "
                           f"out of order or past the {data.shape[0]} bytes stored", feature_set)
    used = int(offsets[-1]) if n else 0
    blob = read_range(data, 0, used, used).tobytes() if used else b""
    try:
        return np.array(decode(blob, offsets), dtype=object)
    except UnicodeDecodeError:
        raise StoreDamaged(path, f"{column} column", "text that is not UTF-8", feature_set) from None


def max_nbytes(texts) -> int:
    """At most this many bytes once encoded (for reserving space before writing)."""
    return 4 * sum(len(t) for t in texts)
