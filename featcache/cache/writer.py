"""The single writer of a store: holds the lock, sets a feature set up, appends rows crash-safely.

Before it opens the file for writing, the writer reads what it will touch (see
:meth:`StoreWriter.peek`): a store it cannot trust is refused with StoreDamaged, never written
into. A store left by a killed writer is recovered first: the in-flight tail is cut off and
chunks torn by the kill are rewritten (see torn.py).
"""
from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass

import filelock
import h5py
import numpy as np

from ..version import __version__
from ..errors import FeatcacheError
from . import damage, text, torn
from .damage import StoreDamaged
from .hdf5 import (RESERVE_MARGIN, StoreWriteError, marked_open_for_write, open_for_write, os_reason, reserve_space,
                   trim_reserved)
from .key import FORMAT_VERSION, KeySpec, feature_set_key
from .layout import (COMMITTED, CRC, FAILURE_COLUMNS, PATHS, ROW_COLUMNS, ROW_DATASETS, STAT_COLUMNS, append_failures,
                     append_rows, check_format, create_feature_set_group, create_row_columns, create_stat_columns,
                     extra_row_columns, features_crc, read_spec, require_root, stat_columns, unknown_stats,
                     writer_lock)
from .store import FeatureSet, Store


@dataclass
class PreparedSet:
    """What the writer needs to know about an existing feature set before appending."""

    name: str
    rows: int
    paths: np.ndarray
    digests: np.ndarray
    stats: np.ndarray | None = None  # (rows, 4) int64 in STAT_COLUMNS order; None: not read, or a store without them


def read_stats(fs: FeatureSet, read: dict | None = None) -> np.ndarray | None:
    """The stat records of a feature set's committed rows, or None if it has no stat columns.
    ``read``: columns already read and checked (FeatureSet.check_appendable), not read again."""
    if not all(fs.has_column(name) for name in STAT_COLUMNS):
        return None
    read = read or {}
    return np.stack([(read[name] if name in read else fs.column(name)).astype(np.uint64 if dtype == "uint64" else np.int64).view(np.int64)
                     for name, dtype in STAT_COLUMNS.items()], axis=1).reshape(fs.n_committed, len(STAT_COLUMNS))


def _writes(method):
    """HDF5 errors while writing become StoreWriteError (the store path and a reason), or
    StoreDamaged when what HDF5 had to read back was damaged."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as exc:
            if "checksum" in str(exc) or damage.is_data_checksum(exc):
                raise StoreDamaged(self.path, "data read back while writing", damage.reason(exc)) from None
            raise StoreWriteError(self.path, os_reason(exc)) from None

    return wrapper


class StoreWriter:
    """The single writer of a store file: holds the lock, appends rows crash-safely."""

    def __init__(self, path: str | os.PathLike, open_file: bool = True):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(parent):
            raise FeatcacheError(f"{self.path}: folder {parent} does not exist")
        self._lock = writer_lock(self.path)
        try:
            self._lock.acquire()
        except filelock.Timeout:
            raise FeatcacheError(
                f"{self.path}: another featcache process is writing this store; "
                "wait for it to finish or write to another store"
            ) from None
        except OSError as exc:
            raise FeatcacheError(f"{self.path}: cannot write in folder {parent} ({os_reason(exc)})") from None
        self.file: h5py.File | None = None
        self.group: h5py.Group | None = None
        self._fd: int | None = None  # for reserving disk space (see hdf5.reserve_space)
        if os.path.exists(self.path):  # a read-only store fails now, not after the model is built
            try:
                os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            except OSError as exc:
                self._lock.release()
                raise FeatcacheError(f"{self.path}: cannot write the store ({os_reason(exc)})") from None
        # We hold the lock: a writer's mark on the file is a killed writer's, whose torn chunks
        # are rewritten in existing() (see torn.py). Read before anything clears the mark.
        self.recovering = marked_open_for_write(self.path)
        if open_file:
            self.open()

    def _existing_store(self) -> bool:
        return os.path.exists(self.path) and os.path.getsize(self.path) > 0

    def peek(self, spec: KeySpec) -> PreparedSet | None:
        """The committed rows of ``spec``, read without opening for write: SWMR readers are not
        disturbed while the caller hashes images and builds its model.

        Also checks, cheaply, that the store can be trusted with an append: the metadata of every
        feature set, and everything of ``spec``'s feature set that an append reads or rewrites
        (FeatureSet.check_appendable). StoreDamaged otherwise."""
        if not self._existing_store():
            return None
        with Store(self.path, lock_held=True, torn_ok=self.recovering) as store:
            store.check_metadata()
            fs = store.find(spec)
            if fs is None:
                return None
            read: dict = {}
            fs.check_appendable(read)  # reads and checks every row column: kept, not read twice
            return PreparedSet(fs.name, fs.n_committed, read[PATHS], read["digests"].astype(str), read_stats(fs, read))

    def check_rows(self, spec: KeySpec, rows) -> None:
        """Read the feature ``rows`` of ``spec`` that the caller will copy (StoreDamaged if damaged)."""
        rows = np.unique(np.asarray(list(rows), dtype=np.int64))
        if len(rows) and self._existing_store():
            with Store(self.path, lock_held=True, torn_ok=self.recovering) as store:
                store[feature_set_key(spec)].read(rows)

    def open(self) -> None:
        """Open (or create) the file for writing; from here until start_appending readers wait."""
        try:
            self.file = open_for_write(self.path)
            check_format(self.file, self.path)
            self._fd = os.open(self.path, os.O_WRONLY)
            reserve_space(self.file, self._fd, RESERVE_MARGIN)
            self.file.attrs["format_version"] = FORMAT_VERSION
            self.file.attrs["featcache_version"] = __version__
            require_root(self.file)
        except (OSError, RuntimeError) as exc:
            self.close(quiet=True)
            raise StoreWriteError(self.path, os_reason(exc)) from None
        except BaseException:
            self.close(quiet=True)
            raise

    def _reserve(self, rows: int, fields, text_bytes: int = 0) -> None:
        """Reserve disk space for appending ``rows`` rows to ``fields`` and ``text_bytes`` to
        text columns (whole chunks, generously)."""
        need = RESERVE_MARGIN + text_bytes + 4 * text.BYTES_CHUNK  # up to 2 text columns, 2 chunks each
        for field in fields:
            ds = self.group[field]
            if ds.chunks:
                need += (rows // ds.chunks[0] + 2) * int(np.prod(ds.chunks)) * ds.dtype.itemsize
        reserve_space(self.file, self._fd, need)

    # -- set-up phase (not SWMR: creates objects and attributes) --------------------------

    @_writes
    def existing(self, spec: KeySpec) -> PreparedSet | None:
        """Rows already committed for ``spec`` (:meth:`prepare`), with their paths and digests; not
        their stats (its caller, cached augmentation, reads and hashes every file anyway)."""
        rows = self.prepare(spec)
        if rows is None:
            return None
        fs = FeatureSet(self.group, by_writer=True)
        return PreparedSet(fs.name, rows, fs.column(PATHS), fs.column("digests"))

    def prepare(self, spec: KeySpec) -> int | None:
        """``spec``'s feature set made ready to append to: the in-flight tail of a killed run cut
        off (and the chunks it tore rewritten). Returns its committed rows; None: no such set."""
        name = feature_set_key(spec)
        root = require_root(self.file)
        if name not in root:
            return None
        group = root[name]
        if group["features"].is_virtual:
            raise FeatcacheError(
                f"{self.path}: feature set {name} is merged from shard stores (featcache merge); "
                "extract into the shard stores and merge again"
            )
        stored = read_spec(group.attrs, name, self.path)
        if stored != spec:
            raise FeatcacheError(f"{self.path}: feature set {name} holds key {stored}, not the requested {spec}")
        if self.recovering:
            self._rewrite_torn(group)
        rows = int(group[COMMITTED][0])
        for field in ("features", *ROW_COLUMNS, *extra_row_columns(group)):
            if group[field].shape[0] != rows:
                group[field].resize(rows, axis=0)
        text.truncate(group, PATHS, rows)
        # a run killed in set_listing_attrs may have left the attribute and the counter apart
        group[COMMITTED][2] = int(group.attrs.get("listing_generation", 0))
        self.group = group
        return rows

    @_writes
    def add_stat_columns(self) -> None:
        """Give a feature set written before the stat columns its STAT_COLUMNS, "unknown" for
        its rows (set-up phase: creates datasets)."""
        if any(name not in self.group for name in STAT_COLUMNS):
            for name in STAT_COLUMNS:  # a run killed while adding them left some: start again
                if name in self.group:
                    del self.group[name]
            create_stat_columns(self.group, int(self.group[COMMITTED][0]))

    def _rewrite_torn(self, group: h5py.Group) -> None:
        """A killed writer may have torn the chunks it was rewriting: write them anew from
        their raw bytes (see torn.py). Failure columns are emptied by set_listing_attrs anyway."""
        counter = torn.read(group[COMMITTED], 0, 3, 3, torn_ok=True)
        group[COMMITTED][:] = counter  # a whole-chunk write: HDF5 does not read the old one
        rows = int(counter[0])
        for field in ("features", *ROW_COLUMNS, *extra_row_columns(group), text.names(PATHS)[1]):
            torn.rewrite_torn(group[field], rows)
        ends = group[text.names(PATHS)[1]]
        used = int(ends[rows - 1]) if rows else 0
        torn.rewrite_torn(group[text.names(PATHS)[0]], used)

    @_writes
    def create(self, spec: KeySpec, feature_shape: tuple[int, ...], dtype: str, chunk_rows: int) -> None:
        name = feature_set_key(spec)
        group = create_feature_set_group(require_root(self.file), name)
        row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
        # Chunks of about a batch, at most 4 MiB: fast appends and fast batch reads.
        rows_per_chunk = max(1, min(chunk_rows, (4 << 20) // max(row_bytes, 1)))
        group.create_dataset(  # checksummed by row (the CRC column), see layout.py
            "features", shape=(0, *feature_shape), maxshape=(None, *feature_shape),
            chunks=(rows_per_chunk, *feature_shape), dtype=dtype,
        )
        create_row_columns(group)
        create_stat_columns(group, 0)
        group.attrs["key"] = json.dumps(spec.to_dict(), sort_keys=True)
        for field, value in spec.to_dict().items():
            group.attrs[field] = value
        group.attrs["feature_shape"] = np.array(feature_shape, dtype="int64")
        group.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.group = group

    @_writes
    def set_listing_attrs(self, class_names: list[str], seed: int, extra: dict | None = None) -> None:
        attrs = {"class_names": json.dumps(class_names), "seed": seed, **(extra or {})}
        changed = {name: value for name, value in attrs.items()
                   if name not in self.group.attrs or not np.array_equal(self.group.attrs[name], value)}
        if changed:  # readers still holding the old attributes will be told to open again
            listing = int(self.group.attrs.get("listing_generation", 0)) + 1
            for name, value in changed.items():
                self.group.attrs[name] = value
            self.group.attrs["listing_generation"] = listing
            self.group[COMMITTED][2] = listing
        # A run's failures are the current state: previous failures are retried.
        for column in FAILURE_COLUMNS:
            text.truncate(self.group, column, 0)
        self.group[COMMITTED][1] = 0

    @_writes
    def start_appending(self) -> None:
        """Switch to SWMR: from here on only appends and in-place writes, crash-safe."""
        self.file.flush()
        self.file.swmr_mode = True

    # -- append phase (SWMR) -----------------------------------------------------------

    @_writes
    def update_rows(self, rows: np.ndarray, labels: np.ndarray, splits: np.ndarray, active: np.ndarray,
                    stat_rows: np.ndarray | None = None, stats: np.ndarray | None = None) -> None:
        """Rewrite the listing columns of existing rows (a relabelled, re-split or vanished file),
        and the stat records of ``stat_rows`` (files hashed again, or first stat'ed, this run)."""
        if len(rows) == 0:
            return
        g = self.group
        self._reserve(0, ("labels", "splits", "active"))
        n = int(g[COMMITTED][0])
        new_labels, new_splits, new_active = g["labels"][:n], g["splits"][:n], g["active"][:n]
        new_labels[rows], new_splits[rows], new_active[rows] = labels, splits, active
        g["labels"][:n], g["splits"][:n], g["active"][:n] = new_labels, new_splits, new_active
        if stat_rows is not None and len(stat_rows) and STAT_COLUMNS.keys() <= g.keys():
            self._reserve(0, tuple(STAT_COLUMNS))
            for name, values in stat_columns(stats).items():
                column = g[name][:n]
                column[stat_rows] = values
                g[name][:n] = column

    @_writes
    def append(self, features, labels, paths, digests, splits, stats: np.ndarray | None = None) -> None:
        """Append rows; they count only after :meth:`commit`. ``stats``: (k, 4) stat records of
        their files (STAT_COLUMNS order; None: unknown)."""
        g = self.group
        k = len(labels)
        if k == 0:
            return
        columns = {"features": features, "labels": labels, "splits": splits, "active": np.ones(k, dtype="uint8"),
                   "digests": digests}
        if STAT_COLUMNS.keys() <= g.keys():
            columns.update(stat_columns(unknown_stats(k) if stats is None else stats))
        self._reserve(k, (*ROW_DATASETS, *(n for n in columns if n not in ROW_DATASETS), *([CRC] if CRC in g else [])),
                      text.max_nbytes(paths))
        append_rows(g, columns, paths)

    def read_features(self, start: int, stop: int, pick: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of features as stored (``pick``: only those offsets in it), their
        CRC checked (to copy them under another path: a damaged row must not be copied with a
        fresh CRC)."""
        what, name = f"features, {damage.row_range(start, stop)}", self.group.name.rsplit("/", 1)[-1]
        with damage.guard(self.path, what, name):
            values = damage.read(self.group["features"], slice(start, stop))
            crc = self.group[CRC][start:stop] if CRC in self.group else None
            if pick is not None:
                values = values[pick]
                crc = crc[pick] if crc is not None else None
            if crc is not None and np.any(features_crc(values) != crc):
                raise StoreDamaged(self.path, what, "checksum mismatch", name)
        return values

    def read_rows(self, rows: np.ndarray) -> np.ndarray:
        """Features of the sorted, distinct ``rows`` as stored, their CRC checked (to copy them
        under other paths). One read per chunk of features they touch (HDF5 reads a chunk whole
        anyway): sparse rows cost what their chunks cost, not a read each."""
        rows = np.asarray(rows, np.int64)
        features = self.group["features"]
        out = np.empty((len(rows), *features.shape[1:]), features.dtype)
        if not len(rows):
            return out
        chunk = features.chunks[0] if features.chunks else len(rows)
        breaks = np.flatnonzero(np.diff(rows // chunk) != 0) + 1
        spans = [(int(run[0]), int(run[-1]) + 1, run) for run in np.split(rows, breaks)]
        done = 0
        for start, stop, run in spans:
            values = self.read_features(start, stop, run - start)
            out[done : done + len(run)] = values
            done += len(run)
        return out

    @_writes
    def add_failures(self, failures: list[tuple[str, str]]) -> None:
        if not failures:
            return
        ends = [text.names(c)[1] for c in FAILURE_COLUMNS]
        self._reserve(len(failures), ends, sum(text.max_nbytes(f) for f in failures))
        append_failures(self.group, failures)

    @_writes
    def commit(self) -> None:
        """Make appended rows count: flush them, then advance the committed counter.

        Two flushes so the counter can never reach disk before the rows it counts."""
        self.file.flush()
        self.group[COMMITTED][:2] = [self.group["features"].shape[0], text.count(self.group, FAILURE_COLUMNS[0])]
        self.file.flush()

    def close(self, quiet: bool = False) -> None:
        """Close the file, give back unused reserved space, release the lock.

        ``quiet``: an error is already on its way; do not replace it with a close error."""
        error = None
        try:
            if self.file is not None and self.file.id.valid:
                try:
                    self.file.close()
                except (OSError, RuntimeError) as exc:
                    error = StoreWriteError(self.path, os_reason(exc))
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
                if error is None:
                    trim_reserved(self.path)
        finally:
            self._lock.release()
        if error is not None and not quiet:
            raise error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close(quiet=exc[0] is not None)
