"""Shard stores: their commit records, and merging them into one store without copying features.

A shard store is an ordinary store written by ``featcache extract ... --shard I/N``. Beside it
lies a small JSON sidecar, ``STORE.shard.json``, written atomically (temp file + os.replace)::

    {"format": 1, "shard": [I, N],
     "feature_sets": {"<feature set name>": {"rows": .., "active": .., "failures": .., "listing": "<sha256>", ...}}}

The sidecar is written when a shard run starts (it names the shard, with no record for the
feature set being extracted) and a feature set's record is added only when its run completed:
a record is the commit marker. A sidecar rather than an HDF5 attribute because a scheduler,
a shell script or ``merge`` can check it without opening HDF5, and replacing a small file
atomically is something every file system does, including shared ones.

:func:`merge` builds a store whose ``features`` are HDF5 virtual datasets over the shards'
committed rows (no feature bytes copied). The small row columns (labels, paths, digests,
splits, active, the file stat records) and the failures are copied. Virtual sources are stored as paths relative
to the merged file's folder; HDF5 resolves those against the folder of the merged file,
so the folder holding the merged file and its shards can be moved as a whole.
"""
from __future__ import annotations

import json
import os
import time
import uuid

import filelock
import h5py
import numpy as np

from ..version import __version__
from ..errors import FeatcacheError
from .hdf5 import check_is_hdf5
from .key import FORMAT_VERSION
from .layout import (CRC, GROUP, PATHS, ROW_COLUMNS, SPLITS, append_failures, append_rows, create_feature_set_group,
                     create_row_columns, create_stat_columns, require_root, stat_columns, unknown_stats, writer_lock)
from .store import Store
from .writer import read_stats

MARKER_SUFFIX = ".shard.json"
MARKER_FORMAT = 1
# Attributes that must agree between shards: they decide labels and splits.
_LISTING_ATTRS = ("class_names", "split_source", "split_fractions", "split_seed")


def marker_path(store: str | os.PathLike) -> str:
    return os.fspath(store) + MARKER_SUFFIX


def read_marker(store: str | os.PathLike) -> dict | None:
    """The shard sidecar of ``store``, or None if there is none (or it is unreadable)."""
    path = marker_path(store)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a torn or hand-edited sidecar counts as "not committed": the shard is redone
    if not isinstance(data, dict) or data.get("format") != MARKER_FORMAT or "shard" not in data:
        return None
    data.setdefault("feature_sets", {})
    return data


def _write_marker(store: str, data: dict) -> None:
    path = marker_path(store)
    folder = os.path.dirname(os.path.abspath(path))
    # A unique name opened with "x" (not mkstemp): the sidecar gets the umask's usual permissions.
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{MARKER_SUFFIX}")
    try:
        with open(tmp, "x", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic: readers see the old or the new sidecar, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _update_marker(store: str, shard: tuple[int, int], update) -> None:
    """Read-modify-write the sidecar while holding the store's writer lock."""
    lock = writer_lock(store)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FeatcacheError(
            f"{store}: another featcache process is writing this shard store; wait for it to finish"
        ) from None
    try:
        data = read_marker(store) or {"format": MARKER_FORMAT, "shard": list(shard), "feature_sets": {}}
        update(data)
        _write_marker(store, data)
    finally:
        lock.release()


def begin_shard(store: str, shard: tuple[int, int], name: str) -> None:
    """Record which shard ``store`` holds and withdraw ``name``'s commit record before its rows change."""
    check_shard_identity(store, shard)

    fresh = not os.path.exists(store)

    def update(data):
        if fresh:  # the store is gone: so are the rows any old record counted
            data["feature_sets"] = {}
        data["shard"] = list(shard)
        data["feature_sets"].pop(name, None)

    _update_marker(store, shard, update)


def commit_shard(store: str, shard: tuple[int, int], name: str, record: dict) -> None:
    """Mark feature set ``name`` of ``store`` complete (the commit marker)."""

    def update(data):
        data["shard"] = list(shard)
        data["feature_sets"][name] = {**record, "committed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    _update_marker(store, shard, update)


def withdraw_records(store: str, names) -> list[str]:
    """Drop the commit records of feature sets ``names`` (their rows changed: repair). The caller
    holds the store's writer lock. Returns the names withdrawn."""
    marker = read_marker(store)
    withdrawn = sorted(set(names) & set(marker["feature_sets"])) if marker else []
    if withdrawn:
        for name in withdrawn:
            marker["feature_sets"].pop(name)
        _write_marker(store, marker)
    return withdrawn


def check_shard_identity(store: str, shard: tuple[int, int]) -> None:
    """Refuse to write shard I/N into a store that holds another shard (rows would count twice)."""
    if not os.path.exists(store):
        return  # a sidecar left without its store describes nothing
    marker = read_marker(store)
    if marker is not None and tuple(marker["shard"]) != tuple(shard):
        held = "{}/{}".format(*marker["shard"])
        raise FeatcacheError(
            f"{store}: holds shard {held} (see {marker_path(store)}), not {shard[0]}/{shard[1]}; "
            "give each shard its own store file"
        )


def committed_record(store: str, shard: tuple[int, int], name: str) -> dict | None:
    """The commit record of feature set ``name`` if it is there and still matches the store."""
    marker = read_marker(store)
    if marker is None or tuple(marker["shard"]) != tuple(shard) or name not in marker["feature_sets"]:
        return None
    record = marker["feature_sets"][name]
    if not os.path.exists(store):
        return None
    try:
        with Store(store) as s:
            if name not in s.feature_set_names() or s[name].n_committed != record.get("rows"):
                return None
    except FeatcacheError:
        return None
    return record


# -- merging -----------------------------------------------------------------------------


def _relative_source(shard: str, out: str) -> str:
    """The shard's path as stored in the virtual dataset: relative to the merged file's folder."""
    try:
        return os.path.relpath(os.path.abspath(shard), os.path.dirname(os.path.abspath(out))).replace(os.sep, "/")
    except ValueError:  # another drive (Windows): only an absolute path can work
        return os.path.abspath(shard)


def _attr_value(value):
    return value.tolist() if isinstance(value, np.ndarray) else value


def _check_out(out: str, shards: list[str]) -> None:
    out_abs = os.path.abspath(out)
    for shard in shards:
        if os.path.abspath(shard) == out_abs:
            raise FeatcacheError(f"{out}: is one of the shards; write the merged store to another file")
    if not os.path.exists(out):
        return
    check_is_hdf5(out)
    try:
        with h5py.File(out, "r", locking=False) as f:
            merged = "merged" in f.attrs
    except OSError as exc:
        raise FeatcacheError(f"{out}: cannot read it ({exc})") from None
    if not merged:
        raise FeatcacheError(f"{out}: exists and is not a merged store; merge into a new file")


def _shard_table(shards: list[str], allow_missing: bool, feature_sets: list[str] | None):
    """Validate the shards' sidecars: (committed shards by index, names to merge, notes on missing ones)."""
    if not shards:
        raise FeatcacheError("merge: no shard stores given")
    markers, not_shards, uncommitted = {}, [], []
    seen: set[str] = set()
    for path in shards:
        if os.path.abspath(path) in seen:
            raise FeatcacheError(f"merge: {path} is given twice")
        seen.add(os.path.abspath(path))
        if not os.path.exists(path):
            raise FeatcacheError(f"{path}: no such shard store")
        marker = read_marker(path)
        if marker is None:
            not_shards.append(path)
        else:
            markers[path] = marker
    if not_shards:
        raise FeatcacheError(
            "not shard stores (no readable " + MARKER_SUFFIX + " beside them; written with extract --shard?): "
            + ", ".join(not_shards)
        )
    counts = {tuple(m["shard"])[1] for m in markers.values()}
    if len(counts) > 1:
        listing = "; ".join(f"{p}: {m['shard'][0]}/{m['shard'][1]}" for p, m in markers.items())
        raise FeatcacheError(f"merge: the shards come from different shard counts ({listing})")
    count = counts.pop()
    by_index: dict[int, str] = {}
    for path, marker in markers.items():
        index = int(marker["shard"][0])
        if index in by_index:
            raise FeatcacheError(f"merge: {by_index[index]} and {path} are both shard {index}/{count}")
        by_index[index] = path

    def names_of(marker):
        names = set(marker["feature_sets"])
        return names & set(feature_sets) if feature_sets else names

    committed = {i: p for i, p in by_index.items() if names_of(markers[p])}
    for i, p in by_index.items():
        if i not in committed:
            uncommitted.append(f"{i}/{count} ({p})")
    key_sets = {}
    for i, p in sorted(committed.items()):
        key_sets.setdefault(frozenset(names_of(markers[p])), []).append(p)
    if len(key_sets) > 1:
        detail = "; ".join(f"{', '.join(files)}: {', '.join(sorted(k))}" for k, files in key_sets.items())
        raise FeatcacheError(
            f"merge: the shards hold different feature sets (keys differ): {detail}"
            + ("" if feature_sets else "; choose with --feature-set")
        )
    missing = [f"{i}/{count}" for i in range(count) if i not in by_index]
    problems = []
    if missing:
        problems.append("missing shards " + ", ".join(missing))
    if uncommitted:
        problems.append("uncommitted shards (their run did not finish; re-run them) " + ", ".join(uncommitted))
    if problems and not allow_missing:
        raise FeatcacheError("merge: " + "; ".join(problems) + " (merge without them with --allow-missing)")
    if not committed:
        wanted = f" with feature set {', '.join(feature_sets)}" if feature_sets else ""
        raise FeatcacheError(f"merge: no committed shards{wanted}")
    names = sorted(next(iter(key_sets)))
    return count, [(i, committed[i], markers[committed[i]]) for i in sorted(committed)], names, problems


def _read_shard_set(path: str, store: Store, name: str, record: dict):
    fs = store[name]
    if fs.n_committed != record.get("rows"):
        raise FeatcacheError(
            f"{path}: feature set {name} has {fs.n_committed} committed rows but its commit marker says "
            f"{record.get('rows')}; the shard changed after it was committed: re-run it"
        )
    rows = fs.n_committed
    features = fs.features
    return {
        "rows": rows,
        "columns": {c: fs.column(c) for c in ROW_COLUMNS},
        "crc": fs.column(CRC) if fs.has_crc else None,
        "stats": read_stats(fs),  # None: a shard written before the stat columns
        "paths": fs.column(PATHS),
        "failures": fs.failures(),
        "attrs": {k: _attr_value(v) for k, v in fs.attrs.items()},  # for comparing
        "raw_attrs": dict(fs.attrs),  # for copying, dtypes as stored
        "shape": features.shape[1:],
        "dtype": features.dtype,
        "source_shape": features.shape,
    }


def _check_consistent(name: str, parts: list[tuple[str, dict]]) -> None:
    first_path, first = parts[0]
    for path, part in parts[1:]:
        for attr in _LISTING_ATTRS:
            a, b = first["attrs"].get(attr), part["attrs"].get(attr)
            if a != b:
                raise FeatcacheError(
                    f"merge: {first_path} and {path} disagree on {attr} of {name} ({a} vs {b}); "
                    "re-run the shards against the same image folder and options"
                )
    owner: dict[str, str] = {}
    for path, part in parts:
        cols = part["columns"]
        for p, active in zip(part["paths"], cols["active"]):
            if not active:
                continue
            if p in owner:
                raise FeatcacheError(f"merge: image {p} is in two shards ({owner[p]} and {path}) of {name}")
            owner[p] = path


def merge(shards: list[str], out: str, allow_missing: bool = False, feature_sets: list[str] | None = None) -> dict:
    """Join committed shard stores into ``out``: virtual features, copied row columns.

    All feature sets committed in the shards are merged, or only ``feature_sets``.
    ``out`` is written to a temporary file and renamed into place, so readers of a previous
    merge see either it or the new one."""
    shards = [os.fspath(s) for s in shards]
    out = os.fspath(out)
    started = time.perf_counter()
    count, committed, names, problems = _shard_table(shards, allow_missing, feature_sets)
    _check_out(out, shards)
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise FeatcacheError(f"{out}: folder {folder} does not exist")

    lock = writer_lock(out)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FeatcacheError(f"{out}: another featcache process is writing this store") from None
    tmp = os.path.join(folder, f".{os.path.basename(out)}.tmp-{os.getpid()}")
    summaries = []
    try:
        opened = [(i, path, marker, Store(path)) for i, path, marker in committed]
        try:
            with h5py.File(tmp, "w", libver="latest", locking=False) as f:
                f.attrs["format_version"] = FORMAT_VERSION
                f.attrs["featcache_version"] = __version__
                f.attrs["merged"] = json.dumps({"shard_count": count, "shards": [i for i, *_ in committed]})
                root = require_root(f)
                for name in names:
                    parts = [(path, _read_shard_set(path, s, name, marker["feature_sets"][name]))
                             for _, path, marker, s in opened]
                    _check_consistent(name, parts)
                    summaries.append(_write_merged_set(root, name, parts, out))
        finally:
            for *_, s in opened:
                s.close()
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    finally:
        lock.release()
    return {
        "store": out,
        "shard_count": count,
        "merged_shards": [i for i, *_ in committed],
        "missing": problems,
        "feature_sets": summaries,
        "bytes": os.path.getsize(out),
        "shard_bytes": sum(os.path.getsize(p) for _, p, _ in committed),
        "seconds": round(time.perf_counter() - started, 3),
    }


def _write_merged_set(root: h5py.Group, name: str, parts: list[tuple[str, dict]], out: str) -> dict:
    first = parts[0][1]
    total = sum(p["rows"] for _, p in parts)
    shape, dtype = first["shape"], first["dtype"]
    layout = h5py.VirtualLayout(shape=(total, *shape), dtype=dtype)
    offset = 0
    merged_from = []
    for path, part in parts:
        rows = part["rows"]
        rel = _relative_source(path, out)
        if rows:
            source = h5py.VirtualSource(rel, f"/{GROUP}/{name}/features", shape=part["source_shape"], dtype=dtype)
            layout[offset : offset + rows] = source[0:rows]
        merged_from.append({"file": rel, "rows": rows, "first_row": offset})
        offset += rows
    g = create_feature_set_group(root, name)
    g.create_virtual_dataset("features", layout)
    paths = np.concatenate([p["paths"] for _, p in parts]).tolist()
    failures = [f for _, p in parts for f in p["failures"]]
    # one chunk per column: nothing is appended to a merged store
    checked = all(p["crc"] is not None for _, p in parts)  # the shards' CRCs check the virtual features
    create_row_columns(g, rows=max(total, 1), text_bytes=max(len("".join(paths).encode()), 1),
                       failures=max(len(failures), 1), crc=checked)
    columns = {c: np.concatenate([p["columns"][c] for _, p in parts]) for c in ROW_COLUMNS}
    if checked:
        columns[CRC] = np.concatenate([p["crc"] for _, p in parts])
    # The file stat records too (a re-run against the merged store reads no unchanged file);
    # "unknown" for the rows of a shard written before them.
    create_stat_columns(g, 0, chunk_rows=max(total, 1))
    columns.update(stat_columns(np.concatenate([unknown_stats(p["rows"]) if p["stats"] is None else p["stats"]
                                                for _, p in parts])))
    append_rows(g, columns, paths)
    append_failures(g, failures)
    g["committed"][:] = [total, len(failures), int(first["raw_attrs"].get("listing_generation", 0))]
    for key, value in first["raw_attrs"].items():
        g.attrs[key] = value
    g.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    g.attrs["merged_from"] = json.dumps(merged_from)
    active = np.concatenate([p["columns"]["active"] for _, p in parts]).astype(bool)
    splits = np.concatenate([p["columns"]["splits"] for _, p in parts]).astype(str)
    return {
        "feature_set": name,
        "rows": total,
        "rows_active": int(active.sum()),
        "shape": [int(active.sum()), *map(int, shape)],
        "failures": len(failures),
        "counts": {s: int(np.sum(active & (splits == s))) for s in SPLITS},
    }
