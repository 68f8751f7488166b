"""Telling a damaged store from a busy one, and saying so in one line.

HDF5 reports damage in many words (a metadata or data checksum that does not match, a bad
signature, an object that is not where a link says). Everything the cache package reads from a
store goes through :func:`guard`, which turns those errors into :class:`StoreDamaged`: the
file, the feature set, what is damaged and the repair command. A live writer can make a reader
see a chunk half rewritten (HDF5 rewrites the last, partly filled chunk of a dataset in place),
so :func:`read` retries a data checksum failure a few times before calling it damage.
"""
from __future__ import annotations

import contextlib
import re
import shlex
import time

from ..errors import FeatcacheError

# Errors h5py raises for objects it cannot read (missing objects are KeyError, bad selections or
# types ValueError/TypeError, undecodable text UnicodeDecodeError).
READ_ERRORS = (OSError, RuntimeError, KeyError, ValueError, TypeError, IndexError)
TORN_READ_ATTEMPTS = 3
TORN_READ_PAUSE = 0.02  # seconds; a writer rewrites a chunk with one pwrite


class StoreDamaged(FeatcacheError):
    """Part of a store cannot be read as it was written. ``what``: which part; ``reason``: why."""

    def __init__(self, path: str, what: str, reason: str, feature_set: str | None = None):
        where = f"feature set {feature_set}: " if feature_set else ""
        super().__init__(
            f"{path}: {where}damaged {what} ({reason}); run `featcache repair {shlex.quote(str(path))}` "
            "to keep what can still be read"
        )
        self.path, self.what, self.reason, self.feature_set = path, what, reason, feature_set


def is_data_checksum(exc: BaseException) -> bool:
    """A chunk whose Fletcher-32 checksum did not match (HDF5: the filter failed on read)."""
    return "filter returned failure during read" in str(exc)


def reason(exc: BaseException) -> str:
    """A short reason for an HDF5 read error (no library internals)."""
    message = str(exc)
    if is_data_checksum(exc):
        return "data checksum mismatch"
    if "incorrect metadata checksum" in message:
        return "metadata checksum mismatch"
    if isinstance(exc, UnicodeDecodeError):
        return "text that is not UTF-8"
    if isinstance(exc, KeyError):
        return f"missing object: {message.strip(chr(39)).strip()}"[:120]
    # h5py: "Summary (detail)": the innermost words are the most specific
    inner = re.findall(r"\(([^()]*)\)", message)
    text = inner[-1] if inner else message
    return (text or exc.__class__.__name__)[:120]


@contextlib.contextmanager
def guard(path: str, what: str, feature_set: str | None = None):
    """HDF5 read errors inside become StoreDamaged(path, what, reason, feature_set)."""
    try:
        yield
    except FeatcacheError:
        raise
    except READ_ERRORS as exc:
        raise StoreDamaged(path, what, reason(exc), feature_set) from None


def read(dataset, selection=slice(None), live: bool = True):
    """``dataset[selection]``, retrying a data checksum failure that a live writer's in-place
    rewrite of a chunk can cause; a failure that stays is raised (damage). ``live`` False: no
    writer can be running, no retry."""
    attempts = TORN_READ_ATTEMPTS if live else 1
    for attempt in range(attempts):
        try:
            return dataset[selection]
        except OSError as exc:
            if attempt == attempts - 1 or not is_data_checksum(exc):
                raise
            time.sleep(TORN_READ_PAUSE)
    raise AssertionError("unreachable")


def row_range(start: int, stop: int) -> str:
    """Rows start..stop-1 as people count them in messages."""
    return f"row {start}" if stop - start == 1 else f"rows {start}-{stop - 1}"


def chunk_ranges(dataset: "h5py.Dataset", start: int, stop: int):
    """Row ranges [a, b) of ``dataset``'s chunks along axis 0 that meet [start, stop)."""
    step = dataset.chunks[0] if dataset.chunks else max(stop - start, 1)
    first = start - start % step
    for a in range(first, stop, step):
        yield max(a, start), min(a + step, stop)


def damaged_chunks(dataset: "h5py.Dataset", start: int, stop: int, first_only: bool = False):
    """Yield the row ranges [a, b) of chunks in [start, stop) that cannot be read. Virtual
    datasets are read in pieces of their sources' chunks (the merged file has none of its own)."""
    for a, b in chunk_ranges(dataset, start, stop) if dataset.chunks else _virtual_pieces(dataset, start, stop):
        try:
            read(dataset, slice(a, b))
        except READ_ERRORS:
            yield a, b
            if first_only:
                return


def _virtual_pieces(dataset: "h5py.Dataset", start: int, stop: int, step: int = 64):
    for a in range(start, stop, step):
        yield a, min(a + step, stop)
