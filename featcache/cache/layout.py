"""The layout of a feature set: names of its datasets and attributes, and how they are created
and appended to. Shared by the reader (store.py), the writer (writer.py), merging (shards.py)
and repair (repair.py); it imports nothing of theirs.

Checksums: every row's features have a CRC-32 in the column ``features_crc32`` (zlib.crc32 of
the row's bytes as stored, little-endian), checked by every read; every other chunked dataset
carries HDF5's Fletcher-32 filter, so a read of a damaged chunk fails instead of returning wrong
numbers. Not Fletcher-32 on the features: HDF5's filter measured 3x slower to write and 3-4x
slower to read, a CRC-32 per row under 2x (benchmarks/checksum_cost.py), and a chunk zeroed as a
whole, checksum included, passes Fletcher-32 (the Fletcher-32 of zeros is zero), while a stored
CRC-32 of a row is never that of zeros unless the row is zeros. Groups keep their links and attributes inside their object header
(checksummed by HDF5) rather than in a fractal heap: a damaged heap made HDF5 1.14 crash while
listing a group, a damaged header is an ordinary error.
"""
from __future__ import annotations

import json
import zlib

import filelock
import h5py
import numpy as np

from ..errors import FeatcacheError
from . import text
from .hdf5 import create_compact_group
from .key import FORMAT_VERSION, KeySpec

GROUP = "feature_sets"
SPLITS = ("train", "validation", "test")
# Per-row columns of fixed type; ``paths`` is a text column (see text.py), as are the failures.
ROW_COLUMNS = {"labels": "int32", "digests": "S64", "splits": "S10", "active": "uint8"}
PATHS = "paths"
FAILURE_COLUMNS = ("failure_paths", "failure_reasons")
COMMITTED = "committed"
# Per row: the stat of the image file when its digest was taken, so that a re-run reuses the
# digest of a file whose path and stat are unchanged without reading it (see extract/filestat.py).
# Absent in stores written before; a writer adds them (UNKNOWN_SIZE for the rows it finds).
STAT_COLUMNS = {"file_sizes": "int64", "file_mtimes_ns": "int64", "file_ctimes_ns": "int64", "file_inodes": "uint64"}
UNKNOWN_SIZE = -1  # in file_sizes: no stat recorded for the row (its file is hashed on the next run)
CRC = "features_crc32"  # per row: zlib.crc32 of the row's feature bytes (absent: an unchecked store)
# the datasets that hold one entry per row
ROW_DATASETS = ("features", *ROW_COLUMNS, text.names(PATHS)[1])
CHECKSUM = {"fletcher32": True}  # dataset options of every chunked dataset written
MAX_LINKS_COMPACT = 1024  # feature sets per store (and datasets per feature set) kept in the header
MAX_ATTRS_COMPACT = 256


def store_path_text(relpath: str) -> str:
    """A relative path as stored: file names that are not valid UTF-8 keep their bytes as
    backslash escapes, so every name can be stored and maps to one stable string."""
    if relpath.isascii():  # nearly every path: itself, without two codec calls
        return relpath
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_spec(attrs, name: str, path: str) -> KeySpec:
    """The KeySpec in a feature set's ``key`` attribute; a clear error if it is not one."""
    try:
        return KeySpec(**json.loads(attrs["key"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatcacheError(
            f"{path}: feature set {name}: its key attribute is unreadable ({exc.__class__.__name__}); "
            "edited by hand or written by another tool"
        ) from None


def check_format(f: h5py.File, path: str) -> None:
    version = int(f.attrs.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise FeatcacheError(
            f"{path}: store format version {version} is newer than this featcache "
            f"(supports {FORMAT_VERSION}); upgrade featcache to read it"
        )


def writer_lock(path: str) -> filelock.FileLock:
    # Not 0: a reader repairing a killed writer's mark holds the lock for milliseconds
    # (hdf5.open_for_read); a real second writer holds it for its whole run.
    return filelock.FileLock(path + ".lock", timeout=0.5)


def require_root(f: h5py.File) -> h5py.Group:
    """The group of feature sets, created with its links kept compact."""
    if GROUP in f:
        return f[GROUP]
    return create_compact_group(f, GROUP, MAX_LINKS_COMPACT, MAX_ATTRS_COMPACT)


def create_feature_set_group(root: h5py.Group, name: str) -> h5py.Group:
    return create_compact_group(root, name, MAX_LINKS_COMPACT, MAX_ATTRS_COMPACT)


def create_row_column(group: h5py.Group, name: str, dtype: str, rows: int = 4096) -> None:
    """An empty, checksummed per-row column chunked for ``rows`` rows."""
    group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(rows,), dtype=dtype, **CHECKSUM)


def create_row_columns(group: h5py.Group, rows: int = 4096, text_bytes: int = text.BYTES_CHUNK,
                       failures: int = 256, crc: bool = True) -> None:
    """The empty per-row columns, failure columns and committed counter of a new feature set,
    chunked for ``rows`` rows, ``text_bytes`` of paths and ``failures`` failures at a time;
    ``crc``: with the features' CRC column."""
    for name, dtype in ROW_COLUMNS.items():
        create_row_column(group, name, dtype, rows)
    if crc:
        create_row_column(group, CRC, "uint32", rows)
    text.create(group, PATHS, rows, text_bytes)
    for column in FAILURE_COLUMNS:
        text.create(group, column, failures, text_bytes)
    # rows, failures, and which listing (set_listing_attrs) they belong to; chunked to be checksummed
    group.create_dataset(COMMITTED, data=np.zeros(3, dtype="int64"), chunks=(3,), **CHECKSUM)


def create_stat_columns(group: h5py.Group, rows: int, chunk_rows: int = 4096) -> None:
    """The STAT_COLUMNS, holding ``rows`` rows of "unknown" (a store written before them)."""
    for name, dtype in STAT_COLUMNS.items():
        create_row_column(group, name, dtype, chunk_rows)
        if rows:
            group[name].resize(rows, axis=0)
            group[name][:] = UNKNOWN_SIZE if name == "file_sizes" else 0


def unknown_stats(rows: int) -> np.ndarray:
    """``rows`` stat records that say "not known" (STAT_COLUMNS order, int64)."""
    out = np.zeros((rows, len(STAT_COLUMNS)), np.int64)
    out[:, 0] = UNKNOWN_SIZE
    return out


def stat_columns(stats: np.ndarray) -> dict:
    """(k, 4) int64 stat records -> the STAT_COLUMNS values (inodes as their unsigned selves)."""
    stats = np.asarray(stats, np.int64).reshape(-1, len(STAT_COLUMNS))
    return {name: stats[:, i].view(np.uint64) if dtype == "uint64" else stats[:, i]
            for i, (name, dtype) in enumerate(STAT_COLUMNS.items())}


def features_crc(features: np.ndarray) -> np.ndarray:
    """The CRC-32 of each row's bytes, little-endian whatever the machine (what CRC holds)."""
    rows = np.ascontiguousarray(features, dtype=features.dtype.newbyteorder("<")).reshape(len(features), -1)
    return np.fromiter((zlib.crc32(row) for row in rows), dtype=np.uint32, count=len(rows))


def append_rows(group: h5py.Group, columns: dict, paths) -> None:
    """Append rows: ``columns`` by dataset name (features, ROW_COLUMNS, CRC), and their paths.
    The features' CRC is computed here unless given (a merged store copies its shards')."""
    n = text.count(group, PATHS)
    if "features" in columns:
        columns = {**columns, "features": np.asarray(columns["features"], dtype=group["features"].dtype)}
        if CRC in group and CRC not in columns:
            columns[CRC] = features_crc(columns["features"])
    for name, values in columns.items():
        ds = group[name]
        ds.resize(n + len(values), axis=0)
        dtype = ROW_COLUMNS.get(name) or STAT_COLUMNS.get(name)
        ds[n:] = np.asarray(values, dtype=dtype) if dtype else values
    text.append(group, PATHS, [store_path_text(p) for p in paths])


def append_failures(group: h5py.Group, failures) -> None:
    """Append (path, reason) pairs."""
    if failures:
        paths, reasons = zip(*failures)
        text.append(group, FAILURE_COLUMNS[0], [store_path_text(p) for p in paths])
        text.append(group, FAILURE_COLUMNS[1], list(reasons))


def extra_row_columns(group: h5py.Group) -> list[str]:
    """Per-row columns beyond the standard ones (e.g. the ``views`` of cached augmentation)."""
    standard = {"features", COMMITTED, *ROW_COLUMNS, *text.names(PATHS)}
    standard.update(n for c in FAILURE_COLUMNS for n in text.names(c))
    return sorted(n for n in group if n not in standard and isinstance(group[n], h5py.Dataset)
                  and len(group[n].shape) == 1)

