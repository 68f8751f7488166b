"""Reading the HDF5 feature store: one file, many feature sets, each a group named by its cache key.

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
Every chunk is checksummed (Fletcher-32) in stores written since featcache checks damage;
older feature sets read as before and are reported "unchecked".

Every read goes through this module and raises :class:`~.damage.StoreDamaged` for damage:
the writer is in writer.py, the names and creation of datasets in layout.py.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..errors import FeatcacheError
from . import damage, text, torn
from .exclude import excluded_paths
from .checks import check_active_rows, check_column, check_counter
from .damage import StoreDamaged, damaged_chunks, guard, row_range
from .hdf5 import METADATA_READ_ATTEMPTS, left_by_killed_writer, open_for_read, open_swmr, writer_running
from .key import KeySpec, feature_set_key
from .layout import (COMMITTED, CRC, FAILURE_COLUMNS, GROUP, PATHS, ROW_COLUMNS, ROW_DATASETS, SPLITS, check_format,
                     extra_row_columns, features_crc, read_spec)
from .virtual import check_sources, sources


class FeatureSet:
    """Read access to one feature set. Only committed, active rows count as the dataset.

    ``by_writer``: read by the store's writer, whose view of the attributes is current.
    ``torn_ok``: the store was left by a killed writer; chunks it may have torn are read from
    their raw bytes (see torn.py). ``live``: a writer may be appending (reads that fail a
    checksum are retried, see damage.read)."""

    def __init__(self, group: h5py.Group, by_writer: bool = False, torn_ok: bool = False, live: bool = True):
        self.group = group
        self.torn_ok, self.live = torn_ok, live
        self.name = group.name.rsplit("/", 1)[-1]
        self.path = path = group.file.filename
        with self.guard("attributes"):
            self.attrs = dict(group.attrs.items())  # read once: HDF5 gives a reader the first version anyway
        self.spec = read_spec(self.attrs, self.name, path)
        if feature_set_key(self.spec) != self.name:
            raise FeatcacheError(
                f"{path}: feature set {self.name}: its key attributes do not match its name (edited by hand?); "
                "refusing to use it"
            )
        # SWMR: the counter first, then the columns. The writer flushes rows before it advances
        # the counter, so every column refreshed after reading it holds at least that many rows.
        with self.guard("committed counter"):
            group[COMMITTED].refresh()
            counter = self._read(group[COMMITTED], 0, 3, 3)  # one read: one commit
        self.n_committed, self.n_failures, listing = check_counter(counter, path, self.name)
        if listing != int(self.attrs.get("listing_generation", 0)) and not by_writer:
            # A reader keeps the attributes it first saw; a run since then rewrote them.
            raise FeatcacheError(
                f"{path}: feature set {self.name} was re-listed by a featcache run after this store was "
                "opened; open the store again (if that run was killed setting up, run it again to repair)"
            )
        with self.guard("datasets"):
            for member in group:
                group[member].refresh()
            self.has_crc = CRC in group
            short = [n for n in (*ROW_DATASETS, *([CRC] if self.has_crc else [])) if group[n].shape[0] < self.n_committed]
            if text.count(group, FAILURE_COLUMNS[0]) < self.n_failures:
                short.append(text.names(FAILURE_COLUMNS[0])[1])
            self.is_virtual = group["features"].is_virtual
        if short:
            if not by_writer and writer_running(path):
                raise FeatcacheError(
                    f"{path}: feature set {self.name} is being set up by a featcache run; try again in a moment"
                )
            raise StoreDamaged(path, f"{short[0]} dataset", f"holds fewer than the {self.n_committed} "
                               "committed rows", self.name)
        if self.is_virtual:  # a merged store: its shard files must be reachable
            self.checksummed = check_sources(group["features"], path) and self._columns_checksummed()
        else:
            self.checksummed = self._columns_checksummed()

    def _read(self, dataset: h5py.Dataset, start: int, stop: int, boundary: int) -> np.ndarray:
        """Elements [start, stop) of a dataset whose first ``boundary`` elements are committed."""
        return torn.read(dataset, start, stop, boundary, self.torn_ok, self.live)

    def guard(self, what: str):
        """HDF5 errors while reading ``what`` become StoreDamaged naming this feature set."""
        return guard(self.path, what, self.name)

    def _columns_checksummed(self) -> bool:
        """Every row column has Fletcher-32 and the features have their CRC column."""
        names = [n for n in (*ROW_DATASETS, text.names(PATHS)[0]) if n != "features"]
        with self.guard("datasets"):
            return self.has_crc and all(self.group[n].fletcher32 for n in names)

    @property
    def class_names(self) -> list[str]:
        with self.guard("class_names attribute"):
            names = json.loads(self.attrs["class_names"])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError("not a list of names")
            return names

    @property
    def labelled(self) -> bool:
        """False for images extracted from a folder without classes: features and paths only."""
        return bool(self.class_names)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])

    @property
    def features(self) -> h5py.Dataset:
        """The features dataset, for its shape and dtype; read rows with :meth:`read`."""
        with self.guard("datasets"):
            return self.group["features"]

    def has_column(self, name: str) -> bool:
        with self.guard("datasets"):
            return name in self.group

    def column(self, name: str, raw: bool = False) -> np.ndarray:
        """A whole row column (labels, paths, digests, splits, active, or another per-row
        dataset such as views) up to the committed rows; StoreDamaged if it cannot be right.
        ``raw``: digests and splits as stored (bytes), not converted to str (a million digests
        take 2 s to convert)."""
        if name == PATHS:
            with self.guard(f"{PATHS} column"):
                return text.read(self.group, PATHS, self.n_committed, self._read)
        with self.guard(f"{name} column"):
            ds = self.group[name]
            ds.refresh()
        try:
            values = self._read(ds, 0, self.n_committed, self.n_committed)
        except damage.READ_ERRORS as exc:  # name the rows of the first damaged chunk
            with self.guard(f"{name} column"):
                where = next(damaged_chunks(ds, 0, self.n_committed, first_only=True), None)
            rows = f", {row_range(*where)}" if where else ""
            raise StoreDamaged(self.path, f"{name} column{rows}", damage.reason(exc), self.name) from None
        n_classes = len(self.class_names) if name == "labels" else 0
        check_column(name, values, n_classes, self.path, self.name)
        if name in ("digests", "splits") and not raw:
            return values.astype(str)
        return values

    def rows(self, split: str | None = None) -> np.ndarray:
        """Sorted row indices of the current dataset, optionally of one split."""
        if split is not None and split not in SPLITS:
            raise FeatcacheError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
        active, splits = self.column("active").astype(bool), self.column("splits")
        check_active_rows(self.column("labels"), splits, active, self.labelled, self.path, self.name)
        if split is not None:
            active &= splits == split
        excluded = excluded_paths()
        if excluded:  # --exclude: left out of every split while the command runs
            active &= ~np.isin(self.column("paths"), list(excluded))
        return np.flatnonzero(active)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """Features of the given sorted rows, read in contiguous runs (fast with h5py).
        StoreDamaged names the damaged chunk's rows."""
        rows = np.asarray(rows, dtype=np.int64)
        features = self.features
        out = np.empty((len(rows), *features.shape[1:]), dtype=features.dtype)
        if len(rows) == 0:
            return out
        if rows[0] < 0 or rows[-1] >= self.n_committed:
            raise FeatcacheError(f"{self.path}: feature set {self.name}: rows {rows[0]}..{rows[-1]} are not "
                                 f"all among its {self.n_committed} committed rows")
        crc = self._crc() if self.has_crc else None
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        start = 0
        for run in np.split(rows, breaks):
            try:
                out[start : start + len(run)] = self._read(features, int(run[0]), int(run[-1]) + 1, self.n_committed)
            except damage.READ_ERRORS as exc:
                raise self._damaged_rows(int(run[0]), int(run[-1]) + 1, exc) from None
            if crc is not None:
                bad = run[features_crc(out[start : start + len(run)]) != crc[run]]
                if len(bad):
                    raise self._damaged_rows(int(bad[0]), int(bad[-1]) + 1, None)
            start += len(run)
        return out

    def _crc(self) -> np.ndarray:
        if getattr(self, "_crc_values", None) is None:  # read once: streaming reads many pieces
            self._crc_values = self.column(CRC)
        return self._crc_values

    def _damaged_rows(self, start: int, stop: int, exc: BaseException | None) -> StoreDamaged:
        """The error for a failed read of rows [start, stop) (``exc`` None: their CRC did not
        match): narrowed to the first damaged chunk, and to the shard file it lies in for a
        merged store."""
        pieces = [(start, stop)] if exc is None else damaged_chunks(self.features, start, stop, first_only=True)
        reason = "checksum mismatch" if exc is None else damage.reason(exc)
        for first, last in pieces:
            if self.is_virtual:
                for s in sources(self.features, self.path):
                    if s.first <= first < s.first + s.rows:
                        a, b = first - s.first + s.source_first, min(last, s.first + s.rows) - s.first + s.source_first
                        return StoreDamaged(s.path, f"features, {row_range(a, b)} (read through merged store "
                                            f"{self.path})", reason, self.name)
            return StoreDamaged(self.path, f"features, {row_range(first, last)}", reason, self.name)
        return StoreDamaged(self.path, f"features, {row_range(start, stop)}", reason, self.name)

    def load(self, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of one split (or all) in memory."""
        rows = self.rows(split)
        return self.read(rows), self.column("labels")[rows]

    def failures(self) -> list[tuple[str, str]]:
        with self.guard("failure columns"):
            paths, reasons = (text.read(self.group, c, self.n_failures, self._read) for c in FAILURE_COLUMNS)
        return list(zip(paths.tolist(), reasons.tolist()))

    def check_appendable(self, read: dict | None = None) -> None:
        """Read what appending to this feature set reads or rewrites, so that a writer never
        writes into damage: every row column (read whole and checked), the chunk index of every
        per-row dataset and its last, partly filled chunk (an append rewrites it). Cheap: the
        features are not read beyond that chunk; the failures are emptied by each run, not read.
        ``read``: a dict that receives the columns read (raw, see column), for a caller that needs them."""
        with self.guard("datasets"):
            extras = extra_row_columns(self.group)
        read = {} if read is None else read
        for name in (*ROW_COLUMNS, PATHS, *extras):
            read[name] = self.column(name, raw=True)
        self.rows()
        data, ends = text.names(PATHS)
        boundaries = {name: self.n_committed for name in ("features", *ROW_COLUMNS, *extras, ends)}
        with self.guard(f"{PATHS} column"):
            boundaries[data] = int(self._read(self.group[ends], self.n_committed - 1, self.n_committed,
                                              self.n_committed)[0]) if self.n_committed else 0
        for name, boundary in boundaries.items():
            with self.guard(f"{name} dataset, its chunk index"):
                ds = self.group[name]
                if ds.is_virtual or not ds.chunks:
                    continue
                ds.id.get_num_chunks()  # walks the whole chunk index: metadata only, checksummed
            tail = boundary - boundary % ds.chunks[0]
            if tail == boundary:
                continue
            if name == "features":
                self.read(np.arange(tail, boundary))
                continue
            with self.guard(f"{name} dataset"):
                self._read(ds, tail, boundary, boundary)

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
            "seed": int(self.attrs.get("seed", 0)),
            "checksums": self.checksummed,
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
    """A store opened for reading (safe beside a running writer).

    ``lock_held``: the caller holds the writer lock (no writer can be running)."""

    def __init__(self, path: str | os.PathLike, lock_held: bool = False, torn_ok: bool | None = None):
        self.path = os.fspath(path)
        self.lock_held = lock_held
        # before opening: open_for_read may clear a killed writer's mark
        self.torn_ok = left_by_killed_writer(self.path, lock_held) if torn_ok is None else torn_ok
        self.file = open_for_read(self.path, lock_held, attempts=1 if lock_held else METADATA_READ_ATTEMPTS)
        try:
            with guard(self.path, "file metadata"):
                check_format(self.file, self.path)
        except BaseException:
            self.file.close()
            raise

    def feature_set_names(self) -> list[str]:
        with guard(self.path, "list of feature sets"):
            return sorted(self.file[GROUP].keys()) if GROUP in self.file else []

    def __getitem__(self, name: str) -> FeatureSet:
        if name not in self.feature_set_names():
            known = ", ".join(self.feature_set_names()) or "none"
            raise FeatcacheError(f"{self.path}: no feature set {name!r} (feature sets: {known})")
        with guard(self.path, "header", name):
            group = self.file[GROUP][name]
        return FeatureSet(group, by_writer=self.lock_held, torn_ok=self.torn_ok, live=not self.lock_held)

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

    def check_metadata(self) -> None:
        """Open every feature set (headers, counters, datasets): cheap, reads no rows."""
        for name in self.feature_set_names():
            self[name]

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
        with open_swmr(os.fspath(path)) as f:
            group = next(iter(f[GROUP].values()))
            group[COMMITTED].refresh()
            return int(group[COMMITTED][0])
    except (*damage.READ_ERRORS, StopIteration):
        return 0


def open_store(path: str | os.PathLike) -> Store:
    """Open a store for reading."""
    return Store(path)
