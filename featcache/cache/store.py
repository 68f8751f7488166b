"""The HDF5 feature store: one file, many feature sets, each a group named by its cache key.

Layout of one feature set (``/feature_sets/<key>``)::

    features         (N, ...)  float32|float16   the cached activations, chunked by batch
    labels           (N,)      int32             index into the class_names attribute
    paths_utf8/_end  text column (see text.py)   image path relative to the image root
    digests          (N,)      S64               sha256 (hex) of the image file's bytes
    splits           (N,)      S10               "train", "validation" or "test"
    active           (N,)      uint8             1 if the row belongs to the latest listing
    committed        (3,)      int64             [rows, failures] written completely, listing_generation
    failure_paths_*, failure_reasons_*           text columns: images that could not be used, and why

Rows past ``committed[0]`` are a batch that was in flight when a run died; the next writer
cuts them off. Attributes: ``key`` (canonical JSON of every key field), each key field on
its own, ``feature_shape``, and the listing: ``class_names``, ``seed``, ``split_*``,
``image_root``, ``weights_arg``, ``listing_generation`` (runs that changed the listing).
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

from .. import __version__
from ..errors import FeatcacheError
from . import text
from .hdf5 import RESERVE_MARGIN, StoreWriteError, open_for_read, open_for_write, os_reason, reserve_space, trim_reserved
from .key import FORMAT_VERSION, KeySpec, feature_set_key

GROUP = "feature_sets"
SPLITS = ("train", "validation", "test")
# Per-row columns of fixed type; ``paths`` is a text column (see text.py), as are the failures.
ROW_COLUMNS = {"labels": "int32", "digests": "S64", "splits": "S10", "active": "uint8"}
PATHS = "paths"
FAILURE_COLUMNS = ("failure_paths", "failure_reasons")
# the datasets that hold one entry per row
_ROW_DATASETS = ("features", *ROW_COLUMNS, text.names(PATHS)[1])


def store_path_text(relpath: str) -> str:
    """A relative path as stored: file names that are not valid UTF-8 keep their bytes as
    backslash escapes, so every name can be stored and maps to one stable string."""
    return relpath.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def read_spec(group: h5py.Group, path: str) -> KeySpec:
    """The KeySpec in a feature set's ``key`` attribute; a clear error if it is not one."""
    name = group.name.rsplit("/", 1)[-1]
    try:
        return KeySpec(**json.loads(group.attrs["key"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatcacheError(
            f"{path}: feature set {name}: its key attribute is unreadable ({exc.__class__.__name__}); "
            "edited by hand or written by another tool"
        ) from None


def _check_format(f: h5py.File, path: str) -> None:
    version = int(f.attrs.get("format_version", FORMAT_VERSION))
    if version > FORMAT_VERSION:
        raise FeatcacheError(
            f"{path}: store format version {version} is newer than this featcache "
            f"(supports {FORMAT_VERSION}); upgrade featcache to read it"
        )


class FeatureSet:
    """Read access to one feature set. Only committed, active rows count as the dataset.

    ``by_writer``: read by the store's writer, whose view of the attributes is current."""

    def __init__(self, group: h5py.Group, by_writer: bool = False):
        self.group = group
        self.name = group.name.rsplit("/", 1)[-1]
        path = group.file.filename
        self.spec = read_spec(group, path)
        if feature_set_key(self.spec) != self.name:
            raise FeatcacheError(
                f"{path}: feature set {self.name}: its key attributes do not match its name (edited by hand?); "
                "refusing to use it"
            )
        # SWMR: the counter first, then the columns. The writer flushes rows before it advances
        # the counter, so every column refreshed after reading it holds at least that many rows.
        group["committed"].refresh()
        self.n_committed, self.n_failures, listing = (int(v) for v in group["committed"][:])  # one read: one commit
        if listing != int(group.attrs.get("listing_generation", 0)) and not by_writer:
            # A reader keeps the attributes it first saw; a run since then rewrote them.
            raise FeatcacheError(
                f"{path}: feature set {self.name} was re-listed by a featcache run after this store was "
                "opened; open the store again (if that run was killed setting up, run it again to repair)"
            )
        for ds in group.values():
            ds.refresh()
        if any(group[name].shape[0] < self.n_committed for name in _ROW_DATASETS) or (
            text.count(group, FAILURE_COLUMNS[0]) < self.n_failures
        ):
            raise FeatcacheError(
                f"{path}: feature set {self.name} is being set up by a featcache run; try again in a moment"
            )
        if group["features"].is_virtual:  # a merged store: its shard files must be reachable
            from .shards import check_sources

            check_sources(group["features"], group.file.filename)

    @property
    def class_names(self) -> list[str]:
        return json.loads(self.group.attrs["class_names"])

    @property
    def labelled(self) -> bool:
        """False for images extracted from a folder without classes: features and paths only."""
        return bool(self.class_names)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.group["features"].shape[1:])

    @property
    def features(self) -> h5py.Dataset:
        return self.group["features"]

    def column(self, name: str) -> np.ndarray:
        """A whole row column (labels, paths, digests, splits, active) up to the committed rows."""
        if name == PATHS:
            return text.read(self.group, PATHS, self.n_committed)
        values = self.group[name][: self.n_committed]
        if name in ("digests", "splits"):
            return values.astype(str)
        return values

    def rows(self, split: str | None = None) -> np.ndarray:
        """Sorted row indices of the current dataset, optionally of one split."""
        mask = self.column("active").astype(bool)
        if split is not None:
            if split not in SPLITS:
                raise FeatcacheError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
            mask &= self.column("splits") == split
        return np.flatnonzero(mask)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Features of the given sorted rows, read in contiguous runs (fast with h5py)."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows),) + self.feature_shape, dtype=self.features.dtype)
        if len(rows) == 0:
            return out
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        start = 0
        for run in np.split(rows, breaks):
            out[start : start + len(run)] = self.features[run[0] : run[-1] + 1]
            start += len(run)
        return out

    def load(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split (or all) in memory."""
        rows = self.rows(split)
        return self.read(rows), self.column("labels")[rows]

    def failures(self) -> list[tuple[str, str]]:
        paths, reasons = (text.read(self.group, c, self.n_failures) for c in FAILURE_COLUMNS)
        return list(zip(paths.tolist(), reasons.tolist()))

    def summary(self) -> dict:
        """Counts per class and split, the key fields and failures: what `featcache info` shows."""
        rows = self.rows()
        labels = self.column("labels")[rows]
        splits = self.column("splits")[rows]
        names = self.class_names
        counts = {
            split: {names[i]: int(np.sum((splits == split) & (labels == i))) for i in range(len(names))}
            for split in SPLITS
        } if names else {}
        return {
            "feature_set": self.name,
            "key": self.spec.to_dict(),
            "shape": [len(rows), *self.feature_shape],
            "dtype": str(self.features.dtype),
            "rows_stored": self.n_committed,
            "rows_active": len(rows),
            "labelled": bool(names),
            "class_names": names,
            "counts": counts,
            "failures": [{"path": p, "reason": r} for p, r in self.failures()],
            "seed": int(self.group.attrs.get("seed", 0)),
        }


@dataclass(frozen=True)
class Loaded:
    """Rows of a feature set in memory (:meth:`Store.load`)."""

    feature_set: str
    features: np.ndarray  # (N, ...) as stored (float32 unless extracted with --dtype float16)
    labels: np.ndarray | None  # (N,) indices into class_names; None for an unlabeled feature set
    paths: np.ndarray  # (N,) image paths relative to the image folder, str
    splits: np.ndarray  # (N,) "train" / "validation" / "test"; "" when unlabeled
    class_names: list[str]  # [] when unlabeled


class Store:
    """A store opened for reading (safe beside a running writer)."""

    def __init__(self, path: str | os.PathLike, lock_held: bool = False):
        self.path = os.fspath(path)
        self.lock_held = lock_held
        self.file = open_for_read(self.path, lock_held)
        try:
            _check_format(self.file, self.path)
        except BaseException:
            self.file.close()
            raise

    def feature_set_names(self) -> list[str]:
        return sorted(self.file[GROUP].keys()) if GROUP in self.file else []

    def __getitem__(self, name: str) -> FeatureSet:
        if name not in self.feature_set_names():
            known = ", ".join(self.feature_set_names()) or "none"
            raise FeatcacheError(f"{self.path}: no feature set {name!r} (feature sets: {known})")
        return FeatureSet(self.file[GROUP][name], by_writer=self.lock_held)

    def find(self, spec: KeySpec) -> FeatureSet | None:
        name = feature_set_key(spec)
        return self[name] if name in self.feature_set_names() else None

    def load(self, feature_set: str | None = None, split: str | None = None, backbone: str | None = None) -> "Loaded":
        """One feature set's active rows in memory (of one split, or all): features, labels
        (None when unlabeled), relative image paths, splits and class names.

        ``feature_set`` names it; without a name the store must hold exactly one (of ``backbone``)."""
        fs = self.select(feature_set, backbone)
        rows = fs.rows(split)
        return Loaded(fs.name, fs.read(rows), fs.column("labels")[rows] if fs.labelled else None,
                      fs.column("paths")[rows], fs.column("splits")[rows], fs.class_names)

    def select(self, name: str | None = None, backbone: str | None = None) -> FeatureSet:
        """One feature set by exact name, or the only one built with ``backbone``."""
        if name:
            return self[name]
        names = [n for n in self.feature_set_names() if backbone is None or self[n].spec.backbone == backbone]
        if len(names) != 1:
            what = f"with base {backbone!r} " if backbone else ""
            listing = ", ".join(names) or "none"
            raise FeatcacheError(
                f"{self.path}: {len(names)} feature sets {what}(name one with --feature-set: {listing})"
            )
        return self[names[0]]

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def committed_rows(path: str | os.PathLike) -> int:
    """Rows committed so far in the store's first feature set, as any SWMR reader sees them;
    0 while there is nothing to read yet. For watching a run from another process."""
    try:
        with h5py.File(path, "r", libver="latest", swmr=True, locking=False) as f:
            group = next(iter(f[GROUP].values()))
            group["committed"].refresh()
            return int(group["committed"][0])
    except (OSError, KeyError, StopIteration):
        return 0


def create_row_columns(group: h5py.Group, rows: int = 4096, text_bytes: int = text.BYTES_CHUNK,
                       failures: int = 256) -> None:
    """The empty per-row columns, failure columns and committed counter of a new feature set,
    chunked for ``rows`` rows, ``text_bytes`` of paths and ``failures`` failures at a time."""
    for name, dtype in ROW_COLUMNS.items():
        group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(rows,), dtype=dtype)
    text.create(group, PATHS, rows, text_bytes)
    for column in FAILURE_COLUMNS:
        text.create(group, column, failures, text_bytes)
    # rows, failures, and which listing (set_listing_attrs) they belong to
    group.create_dataset("committed", data=np.zeros(3, dtype="int64"))


def append_rows(group: h5py.Group, columns: dict, paths) -> None:
    """Append rows: ``columns`` by dataset name (features and/or ROW_COLUMNS), and their paths."""
    n = text.count(group, PATHS)
    for name, values in columns.items():
        ds = group[name]
        ds.resize(n + len(values), axis=0)
        ds[n:] = np.asarray(values, dtype=ROW_COLUMNS[name]) if name in ROW_COLUMNS else values
    text.append(group, PATHS, [store_path_text(p) for p in paths])


def append_failures(group: h5py.Group, failures) -> None:
    """Append (path, reason) pairs."""
    if failures:
        paths, reasons = zip(*failures)
        text.append(group, FAILURE_COLUMNS[0], [store_path_text(p) for p in paths])
        text.append(group, FAILURE_COLUMNS[1], list(reasons))


def open_store(path: str | os.PathLike) -> Store:
    """Open a store for reading."""
    return Store(path)


def writer_lock(path: str) -> filelock.FileLock:
    # Not 0: a reader repairing a killed writer's mark holds the lock for milliseconds
    # (hdf5.open_for_read); a real second writer holds it for its whole run.
    return filelock.FileLock(path + ".lock", timeout=0.5)


@dataclass
class PreparedSet:
    """What the writer needs to know about an existing feature set before appending."""

    name: str
    rows: int
    paths: np.ndarray
    digests: np.ndarray


def _writes(method):
    """HDF5 errors while writing become StoreWriteError: the store path and a reason."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except (OSError, RuntimeError) as exc:
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
        if open_file:
            self.open()

    def peek(self, spec: KeySpec) -> PreparedSet | None:
        """The committed rows of ``spec``, read without opening for write: SWMR readers are not
        disturbed while the caller hashes images and builds its model."""
        if not os.path.exists(self.path) or os.path.getsize(self.path) == 0:
            return None
        with Store(self.path, lock_held=True) as store:
            fs = store.find(spec)
            return None if fs is None else PreparedSet(fs.name, fs.n_committed, fs.column("paths"), fs.column("digests"))

    def open(self) -> None:
        """Open (or create) the file for writing; from here until start_appending readers wait."""
        try:
            self.file = open_for_write(self.path)
            _check_format(self.file, self.path)
            self._fd = os.open(self.path, os.O_WRONLY)
            reserve_space(self.file, self._fd, RESERVE_MARGIN)
            self.file.attrs["format_version"] = FORMAT_VERSION
            self.file.attrs["featcache_version"] = __version__
            self.file.require_group(GROUP)
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
        """Rows already committed for ``spec``, with the in-flight tail of a killed run cut off."""
        name = feature_set_key(spec)
        if name not in self.file[GROUP]:
            return None
        group = self.file[GROUP][name]
        if group["features"].is_virtual:
            raise FeatcacheError(
                f"{self.path}: feature set {name} is merged from shard stores (featcache merge); "
                "extract into the shard stores and merge again"
            )
        stored = read_spec(group, self.path)
        if stored != spec:
            raise FeatcacheError(f"{self.path}: feature set {name} holds key {stored}, not the requested {spec}")
        rows = int(group["committed"][0])
        for field in ("features", *ROW_COLUMNS):
            if group[field].shape[0] != rows:
                group[field].resize(rows, axis=0)
        text.truncate(group, PATHS, rows)
        # a run killed in set_listing_attrs may have left the attribute and the counter apart
        group["committed"][2] = int(group.attrs.get("listing_generation", 0))
        self.group = group
        fs = FeatureSet(group, by_writer=True)
        return PreparedSet(name, rows, fs.column("paths"), fs.column("digests"))

    @_writes
    def create(self, spec: KeySpec, feature_shape: tuple[int, ...], dtype: str, chunk_rows: int) -> None:
        name = feature_set_key(spec)
        group = self.file[GROUP].create_group(name)
        row_bytes = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
        # Chunks of about a batch, at most 4 MiB: fast appends and fast batch reads.
        rows_per_chunk = max(1, min(chunk_rows, (4 << 20) // max(row_bytes, 1)))
        group.create_dataset(
            "features", shape=(0, *feature_shape), maxshape=(None, *feature_shape),
            chunks=(rows_per_chunk, *feature_shape), dtype=dtype,
        )
        create_row_columns(group)
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
            self.group["committed"][2] = listing
        # A run's failures are the current state: previous failures are retried.
        for column in FAILURE_COLUMNS:
            text.truncate(self.group, column, 0)
        self.group["committed"][1] = 0

    @_writes
    def start_appending(self) -> None:
        """Switch to SWMR: from here on only appends and in-place writes, crash-safe."""
        self.file.flush()
        self.file.swmr_mode = True

    # -- append phase (SWMR) -----------------------------------------------------------

    @_writes
    def update_rows(self, rows: np.ndarray, labels: np.ndarray, splits: np.ndarray, active: np.ndarray) -> None:
        """Rewrite the listing columns of existing rows (a relabelled, re-split or vanished file)."""
        if len(rows) == 0:
            return
        g = self.group
        self._reserve(0, ("labels", "splits", "active"))
        n = int(g["committed"][0])
        new_labels, new_splits, new_active = g["labels"][:n], g["splits"][:n], g["active"][:n]
        new_labels[rows], new_splits[rows], new_active[rows] = labels, splits, active
        g["labels"][:n], g["splits"][:n], g["active"][:n] = new_labels, new_splits, new_active

    @_writes
    def append(self, features, labels, paths, digests, splits) -> None:
        """Append rows; they count only after :meth:`commit`."""
        g = self.group
        k = len(labels)
        if k == 0:
            return
        self._reserve(k, _ROW_DATASETS, text.max_nbytes(paths))
        append_rows(g, {"features": features, "labels": labels, "splits": splits,
                        "active": np.ones(k, dtype="uint8"), "digests": digests}, paths)

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
        self.group["committed"][:2] = [self.group["features"].shape[0], text.count(self.group, FAILURE_COLUMNS[0])]
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
