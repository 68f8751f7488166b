"""Reading a store as far as it can be read: what is damaged, down to rows, and what is left.

:func:`scan` reads every chunk of every feature set once, one chunk at a time, and notes each
one that fails its checksum (or cannot be read at all) as the rows it holds. It also checks what
checksums cannot: the commit counter against the columns' lengths, text offsets, labels within
the class names, splits, active flags and digests. ``verify`` reports the result; ``repair``
copies the rows it found readable.

A row is *lost* when its features, digest, path (or another per-row column such as the views
of cached augmentation) cannot be read: without them the row cannot be used or matched to its
image again. A row whose label, split or active flag is damaged is *set aside*: repair keeps it
inactive, and the next extract, which re-derives those three from the folder for every stored
(path, digest), takes it back without running the model.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import h5py
import numpy as np

from ...errors import FeatcacheError
from .. import damage, text, torn
from ..checks import bad_values
from ..damage import StoreDamaged
from ..hdf5 import METADATA_READ_ATTEMPTS, check_is_hdf5, check_length, left_by_killed_writer, open_for_read, writer_running
from ..key import feature_set_key
from ..layout import (COMMITTED, CRC, FAILURE_COLUMNS, GROUP, PATHS, ROW_COLUMNS, ROW_DATASETS, STAT_COLUMNS,
                     UNKNOWN_SIZE, check_format, features_crc, read_spec)
from ..virtual import check_sources, sources

NEEDED = ("features", "digests")  # with the paths and any extra per-row column: a row without them is lost
RELISTED = ("labels", "splits", "active")  # re-derived from the folder by the next extract
# and the files' stat records (layout.STAT_COLUMNS): where damaged, the next extract hashes the file
KEPT_WITHOUT = (*RELISTED, *STAT_COLUMNS)
VIRTUAL_PIECE = 64  # rows read at a time from a merged store's virtual features
_STANDARD = {"features", COMMITTED, *ROW_COLUMNS, *text.names(PATHS), *(n for c in FAILURE_COLUMNS for n in text.names(c))}


@dataclass
class Damage:
    """Something damaged: ``rows`` [start, stop) when it is tied to rows."""

    what: str
    reason: str
    rows: tuple[int, int] | None = None
    file: str | None = None  # another file than the store (a merged store's shard)

    def to_dict(self) -> dict:
        out = {"what": self.what, "rows": None if self.rows is None else [self.rows[0], self.rows[1] - 1],
               "reason": self.reason}
        if self.file:
            out["file"] = self.file
        return out

    def text(self) -> str:
        where = f", {damage.row_range(*self.rows)}" if self.rows else ""
        return f"{self.what}{where}{f' (in {self.file})' if self.file else ''}: {self.reason}"


@dataclass
class SetScan:
    name: str
    rows: int = 0
    failures: list | None = None  # (path, reason) pairs, None if unreadable
    attrs: dict | None = None
    checksums: bool = False
    virtual: bool = False
    unreadable: str | None = None  # why nothing of the feature set can be read
    damage: list[Damage] = field(default_factory=list)
    torn: list[Damage] = field(default_factory=list)
    lost: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    set_aside: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    columns: dict = field(default_factory=dict)  # readable values (placeholders where damaged)

    @property
    def damaged(self) -> bool:
        return bool(self.unreadable or self.damage)

    def mark(self, what: str, reason: str, start: int | None = None, stop: int | None = None,
             lose: bool = True, file: str | None = None) -> None:
        """Note damage; rows [start, stop) are lost (``lose``) or set aside."""
        if start is None:
            self.damage.append(Damage(what, reason, file=file))
            return
        start, stop = int(start), int(stop)
        self.damage.append(Damage(what, reason, (start, stop), file))
        (self.lost if lose else self.set_aside)[start:stop] = True


@dataclass
class StoreScan:
    path: str
    damage: list[Damage] = field(default_factory=list)  # of the file as a whole
    sets: list[SetScan] = field(default_factory=list)
    torn_ok: bool = False

    @property
    def damaged(self) -> bool:
        return bool(self.damage) or any(s.damaged for s in self.sets)


def scannable(store) -> str:
    """``store`` as a path that verify and repair can read, or FeatcacheError: missing, a folder,
    or a file that is not HDF5. A file cut short within its signature is scanned as one in
    which nothing can be read."""
    store = os.fspath(store)
    if not os.path.exists(store):
        raise FeatcacheError(f"{store}: no such store")
    try:
        check_is_hdf5(store)
    except StoreDamaged:
        pass
    return store


def scan(path: str, lock_held: bool = False) -> StoreScan:
    """Read all of ``path`` (``lock_held``: the caller holds the writer lock)."""
    live = not lock_held and writer_running(path)
    result = StoreScan(path, torn_ok=left_by_killed_writer(path, lock_held))
    try:
        # no writer: a checksum that fails is damage at once (see hdf5.METADATA_READ_ATTEMPTS)
        f = open_for_read(path, lock_held, attempts=METADATA_READ_ATTEMPTS if live else 1, truncated_ok=True)
    except StoreDamaged as exc:
        result.damage.append(Damage(exc.what, exc.reason))
        return result
    with f:
        try:
            check_length(f, path, writer_possible=live)
        except StoreDamaged as exc:
            result.damage.append(Damage(exc.what, exc.reason))
        try:
            with damage.guard(path, "file metadata"):
                check_format(f, path)
                names = sorted(f[GROUP].keys()) if GROUP in f else []
        except StoreDamaged as exc:
            result.damage.append(Damage("list of feature sets", exc.reason))
            return result
        for name in names:
            result.sets.append(_scan_set(f, name, path, result.torn_ok, live))
    return result


def _scan_set(f: h5py.File, name: str, path: str, torn_ok: bool, live: bool) -> SetScan:
    s = SetScan(name)
    try:
        with damage.guard(path, "header", name):
            group = f[GROUP][name]
            s.attrs = dict(group.attrs.items())
            members = set(group.keys())
        spec = read_spec(s.attrs, name, path)
        if feature_set_key(spec) != name:
            raise FeatcacheError("its key attributes do not match its name")
    except FeatcacheError as exc:
        s.unreadable = exc.reason if isinstance(exc, StoreDamaged) else str(exc).split(": ")[-1]
        return s
    missing = [n for n in (*NEEDED, *text.names(PATHS)) if n not in members]
    if missing:
        s.unreadable = f"dataset {missing[0]} is missing"
        return s
    try:
        with damage.guard(path, "datasets", name):
            lengths = {n: group[n].shape[0] for n in members if isinstance(group[n], h5py.Dataset)}
            s.virtual = group["features"].is_virtual
            s.checksums = CRC in members and all(group[n].fletcher32 for n in members if n != "features")
            extras = [n for n in sorted(members) if n not in _STANDARD and len(group[n].shape) == 1]
    except StoreDamaged as exc:
        s.unreadable = f"its datasets: {exc.reason}"
        return s
    row_sets = [n for n in (*ROW_DATASETS, *extras) if n in lengths]
    n_failures = None
    try:
        with damage.guard(path, "committed counter", name):
            counter = torn.read(group[COMMITTED], 0, 3, 3, torn_ok, live)
        if counter.shape != (3,) or np.any(counter < 0):
            raise StoreDamaged(path, "committed counter", f"holds {counter.tolist()}", name)
        s.rows, n_failures = int(counter[0]), int(counter[1])
    except (StoreDamaged, KeyError) as exc:
        # rows complete in every column (the paths are appended last) can still be kept
        s.rows = min(lengths[n] for n in row_sets)
        s.mark("committed counter", getattr(exc, "reason", "missing"))
    s.lost, s.set_aside = np.zeros(s.rows, bool), np.zeros(s.rows, bool)
    for n in [*RELISTED, *(c for c in ROW_COLUMNS if c not in RELISTED)]:
        if n not in lengths:
            s.mark(f"{n} column", "missing", 0, s.rows, lose=n not in RELISTED)
    for n in row_sets:
        if lengths[n] < s.rows:
            s.mark(f"{n} dataset", f"holds {lengths[n]} of the {s.rows} committed rows", lengths[n], s.rows,
                   lose=n not in KEPT_WITHOUT)
    n_classes = _class_count(s)
    for n in (*ROW_COLUMNS, *extras):
        if n in lengths:
            s.columns[n] = _scan_column(s, group[n], n, n_classes, torn_ok, live, lose=n not in KEPT_WITHOUT)
    _scan_features(s, group, path, torn_ok, live)
    s.columns[PATHS] = _scan_text(s, group, PATHS, s.rows, torn_ok, live)
    _check_active(s)
    s.failures = _read_failures(s, group, path, n_failures, torn_ok, live)
    return s


def _class_names(s: SetScan) -> list | None:
    try:
        names = json.loads(s.attrs["class_names"])
        return names if isinstance(names, list) else None
    except (KeyError, TypeError, ValueError):
        return None


def _class_count(s: SetScan) -> int:
    names = _class_names(s)
    if names is None:
        s.mark("class_names attribute", "unreadable", 0, s.rows, lose=False)
        return 0
    return len(names)


def _chunks(ds: h5py.Dataset, stop: int):
    step = ds.chunks[0] if ds.chunks else VIRTUAL_PIECE if ds.is_virtual else max(stop, 1)
    for a in range(0, stop, step):
        yield a, min(a + step, stop)


def _read_pieces(s: SetScan, ds: h5py.Dataset, name: str, stop: int, boundary: int, torn_ok: bool, live: bool,
                 keep: bool):
    """Yield (start, stop, values or None, reason) for each chunk below ``stop``; torn chunks
    (see torn.py) are read raw and noted."""
    stop = min(stop, ds.shape[0])
    file_size = os.path.getsize(ds.file.filename)
    for a, b in _chunks(ds, stop):
        try:
            if ds.chunks and not ds.is_virtual:  # past the end of a truncated file HDF5 reads zeros
                where = ds.id.get_chunk_info_by_coord((a,) + (0,) * (len(ds.shape) - 1))
                if where.byte_offset is not None and where.byte_offset + where.size > file_size:
                    yield a, b, None, "past the end of the truncated file"
                    continue
            values = damage.read(ds, slice(a, b), live)
            yield a, b, values if keep else None, None
        except damage.READ_ERRORS as exc:
            chunk_stop = a + ds.chunks[0] if ds.chunks else b
            if torn_ok and ds.chunks and damage.is_data_checksum(exc) and torn.possibly_torn(name, a, chunk_stop, boundary):
                s.torn.append(Damage(name, "chunk torn by a killed run: read from its raw bytes", (a, b)))
                yield a, b, torn.raw_chunk(ds, a)[: b - a] if keep else None, None
            else:
                yield a, b, None, damage.reason(exc)


def _scan_features(s: SetScan, group: h5py.Group, path: str, torn_ok: bool, live: bool) -> None:
    ds = group["features"]
    parts = []
    if s.virtual:
        try:
            parts = sources(ds, path)
            check_sources(ds, path)
        except FeatcacheError as exc:
            s.mark("features", str(exc), 0, s.rows)
            return
    crc = s.columns.get(CRC)
    unknown = s.lost.copy()  # rows whose CRC (or digest, path) is damaged: lost already
    def shard(row):  # the shard file a merged store's row is read from
        return next((p.path for p in parts if p.first <= row < p.first + p.rows), None)

    for a, b, values, reason in _read_pieces(s, ds, "features", s.rows, s.rows, torn_ok, live, keep=crc is not None):
        if reason is not None:
            s.mark("features", reason, a, b, file=shard(a))
        elif crc is not None:
            for row in np.flatnonzero((features_crc(values) != crc[a:b]) & ~unknown[a:b]):
                s.mark("features", "checksum mismatch", a + row, a + row + 1, file=shard(a + row))


def _scan_column(s: SetScan, ds: h5py.Dataset, name: str, n_classes: int, torn_ok: bool, live: bool,
                 lose: bool) -> np.ndarray:
    values = np.full(s.rows, UNKNOWN_SIZE if name == "file_sizes" else 0, ds.dtype)  # placeholders where damaged
    for a, b, piece, reason in _read_pieces(s, ds, name, s.rows, s.rows, torn_ok, live, keep=True):
        if reason is not None:
            s.mark(f"{name} column", reason, a, b, lose=lose)
            continue
        values[a:b] = piece
        bad = bad_values(name, piece, n_classes)  # what checksums cannot see (unchecked stores, edits)
        for row in np.flatnonzero(bad) if bad is not None else ():
            s.mark(f"{name} column", f"value {piece[row]!r} cannot be right", a + row, a + row + 1, lose=lose)
    return values


def _scan_text(s: SetScan, group: h5py.Group, column: str, n: int, torn_ok: bool, live: bool) -> np.ndarray:
    """Entries of a text column, None where damaged (rows marked lost)."""
    data_name, ends_name = text.names(column)
    ends, data = group[ends_name], group[data_name]
    offsets = np.zeros(n, np.int64)
    readable = np.zeros(n, bool)
    for a, b, piece, reason in _read_pieces(s, ends, ends_name, n, n, torn_ok, live, keep=True):
        if reason is None:
            offsets[a:b], readable[a:b] = piece, True
        else:
            s.mark(f"{column} column", reason, a, b)
    nbytes = data.shape[0]
    last = int(offsets[readable].max()) if readable.any() else 0
    used = min(max(last, 0), nbytes)
    blob = np.zeros(used, np.uint8)
    bytes_ok = np.zeros(used, bool)
    for a, b, piece, reason in _read_pieces(s, data, data_name, used, used, torn_ok, live, keep=True):
        if reason is None:
            blob[a:b], bytes_ok[a:b] = piece, True
    entries = np.empty(n, dtype=object)
    starts = np.concatenate([[0], offsets[:-1]]) if n else offsets
    start_ok = np.concatenate([[True], readable[:-1]]) if n else readable
    bad_rows = []
    for i in range(n):
        lo, hi = int(starts[i]), int(offsets[i])
        if not (readable[i] and start_ok[i]):
            continue
        if not 0 <= lo <= hi <= used or not bytes_ok[lo:hi].all():
            bad_rows.append(i)
            continue
        try:
            entries[i] = blob[lo:hi].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            bad_rows.append(i)
    for i in bad_rows:
        s.mark(f"{column} column", "its text is unreadable or out of place", i, i + 1)
    return entries


def _check_active(s: SetScan) -> None:
    """Active rows need a class and a split; rows with damaged listing columns are set aside."""
    if not all(c in s.columns for c in RELISTED):
        return
    if not _class_names(s):
        return  # unlabeled (a folder without classes): label -1 and no split are what rows hold
    active = s.columns["active"].astype(bool) & ~s.set_aside
    bad = np.flatnonzero(active & ((s.columns["labels"] < 0) | (s.columns["splits"] == b"")))
    for row in bad:
        s.mark("row columns", "an active row without a label or split", int(row), int(row) + 1, lose=False)


def _read_failures(s: SetScan, group: h5py.Group, path: str, n: int | None, torn_ok: bool, live: bool):
    if n is None:
        return None
    try:
        with damage.guard(path, "failure list", s.name):
            read = lambda ds, a, b, boundary: torn.read(ds, a, b, boundary, torn_ok, live)  # noqa: E731
            paths, reasons = (text.read(group, c, n, read) for c in FAILURE_COLUMNS)
        return list(zip(paths.tolist(), reasons.tolist()))
    except StoreDamaged as exc:
        s.mark("failure list", exc.reason)
        return None


def summary(s: SetScan) -> dict:
    """What verify reports for one feature set."""
    lost = int(s.lost.sum()) if not s.unreadable else None
    aside = int((s.set_aside & ~s.lost).sum()) if not s.unreadable else None
    status = "damaged" if s.damaged else ("ok" if s.checksums else "unchecked")
    return {
        "feature_set": s.name,
        "status": status,
        "checksums": s.checksums,
        "merged": s.virtual,
        "rows": s.rows,
        "rows_lost": lost,
        "rows_set_aside": aside,
        "unreadable": s.unreadable,
        "damage": [d.to_dict() for d in _merged(s.damage)],
        "torn": [d.to_dict() for d in _merged(s.torn)],
    }


def _merged(items: list[Damage]) -> list[Damage]:
    """Adjacent row ranges of the same damage joined (a zeroed block hits many chunks)."""
    out: list[Damage] = []
    for d in items:
        last = out[-1] if out else None
        if (last and d.rows and last.rows and last.what == d.what and last.reason == d.reason
                and last.file == d.file and last.rows[1] == d.rows[0]):
            out[-1] = Damage(d.what, d.reason, (last.rows[0], d.rows[1]), d.file)
        else:
            out.append(d)
    return out
