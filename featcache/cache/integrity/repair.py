"""``featcache repair STORE``: keep every row that can still be read, in a new store.

The rows are copied chunk by chunk into a new file written beside the store (with checksums),
the damaged file is kept as ``STORE.damaged-<time>`` (a hard link, so no bytes are copied),
and the new file replaces the store in one rename, all under the writer lock. Rows that could
not be read are left out; the next ``extract`` of the same folder extracts exactly those again,
since it keys rows by (path, content digest). Rows whose label, split or active flag was
damaged are kept inactive: that extract re-derives the three from the folder and takes them back.
"""
from __future__ import annotations

import json
import os
import time

import filelock
import h5py
import numpy as np

from ...version import __version__
from ...errors import FeatcacheError
from .. import torn
from ..hdf5 import open_for_read, os_reason
from ..key import FORMAT_VERSION
from ..layout import (COMMITTED, PATHS, ROW_COLUMNS, UNKNOWN_SIZE, append_failures, append_rows, create_feature_set_group,
                     create_row_column, create_row_columns, require_root, writer_lock)
from .scan import SetScan, StoreScan, scan, scannable, summary
from ..shards import withdraw_records


def repair(store: str) -> dict:
    """Rewrite ``store`` with what can still be read (see the module doc). Returns what was kept
    and lost per feature set; ``repaired`` is False when nothing was damaged."""
    store = scannable(store)
    started = time.perf_counter()
    lock = writer_lock(store)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise FeatcacheError(f"{store}: another featcache process is writing this store; repair it when it is done") from None
    except OSError as exc:
        raise FeatcacheError(f"{store}: cannot take the writer lock ({os_reason(exc)})") from None
    try:
        found = scan(store, lock_held=True)
        result = {"store": store, "repaired": False, "damaged_copy": None,
                  "feature_sets": [summary(s) for s in found.sets], "file_damage": [d.to_dict() for d in found.damage]}
        if not found.damaged:
            return {**result, "seconds": round(time.perf_counter() - started, 3)}
        merged = [s.name for s in found.sets if s.virtual]
        if merged:
            raise FeatcacheError(
                f"{store}: merged from shard stores ({', '.join(merged)}); repair the shard files that "
                f"`featcache verify {store}` names, run their extract --shard again and merge again"
            )
        kept = _rewrite(store, found)
        damaged_copy = _keep_original(store)
        os.replace(kept["tmp"], store)
        withdrawn = withdraw_records(store, [s.name for s in found.sets if s.damaged])
    finally:
        lock.release()
    return {**result, "repaired": True, "damaged_copy": damaged_copy, "kept": kept["sets"],
            "nothing_recovered": not any(k["rows_kept"] for k in kept["sets"]),
            "shard_records_withdrawn": withdrawn, "seconds": round(time.perf_counter() - started, 3)}


def _rewrite(store: str, found: StoreScan) -> dict:
    folder = os.path.dirname(os.path.abspath(store))
    tmp = os.path.join(folder, f".{os.path.basename(store)}.repair-{os.getpid()}")
    kept = []
    try:
        source = _open_source(store)
        with h5py.File(tmp, "w", libver="latest", locking=False) as out:
            out.attrs["format_version"] = FORMAT_VERSION
            out.attrs["featcache_version"] = __version__
            root = require_root(out)
            for s in found.sets:
                if s.unreadable or source is None:
                    kept.append({"feature_set": s.name, "rows_kept": 0, "lost": s.unreadable or "unreadable"})
                    continue
                kept.append(_copy_set(source, s, root, found.torn_ok))
        if source is not None:
            source.close()
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):
            raise FeatcacheError(f"{store}: cannot write the repaired store beside it ({os_reason(exc)})") from None
        raise
    return {"tmp": tmp, "sets": kept}


def _open_source(store: str) -> h5py.File | None:
    try:
        return open_for_read(store, lock_held=True, attempts=1, truncated_ok=True)
    except FeatcacheError:
        return None


def _copy_set(source: h5py.File, s: SetScan, root: h5py.Group, torn_ok: bool) -> dict:
    """Copy the readable rows of one feature set (in their order) into a new group of ``root``."""
    src = source[f"feature_sets/{s.name}"]
    keep = np.flatnonzero(~s.lost)
    aside = s.set_aside[keep]
    g = create_feature_set_group(root, s.name)
    feats = src["features"]
    out = g.create_dataset("features", shape=(len(keep), *feats.shape[1:]), maxshape=(None, *feats.shape[1:]),
                           chunks=feats.chunks or (64, *feats.shape[1:]), dtype=feats.dtype)
    step = out.chunks[0]
    done = 0
    for a in range(0, s.rows, feats.chunks[0] if feats.chunks else step):
        b = min(a + (feats.chunks[0] if feats.chunks else step), s.rows)
        rows = keep[(keep >= a) & (keep < b)]
        if len(rows):
            out[done : done + len(rows)] = torn.read(feats, a, b, s.rows, torn_ok, live=False)[rows - a]
            done += len(rows)
    create_row_columns(g, crc=False)  # the CRC column, if the store had one, is copied below
    listing = {name: s.columns.get(name, np.zeros(s.rows, dtype))[keep]  # a missing one: every row set aside
               for name, dtype in (("labels", "int32"), ("splits", "S10"), ("active", "uint8"))}
    columns = {
        "labels": np.where(aside, -1, listing["labels"]).astype("int32"),
        "splits": np.where(aside, b"", listing["splits"]).astype("S10"),
        "active": np.where(aside, 0, listing["active"]).astype("uint8"),
        "digests": s.columns["digests"][keep],
    }
    append_rows(g, columns, s.columns[PATHS][keep].tolist())
    for name in sorted(set(s.columns) - {*ROW_COLUMNS, PATHS}):  # the features' CRC, views of cached augmentation
        create_row_column(g, name, s.columns[name].dtype.str)
        g[name].resize(len(keep), axis=0)
        g[name][:] = s.columns[name][keep]
    if "file_sizes" in g and aside.any():  # a set-aside row's stat may be damaged: its file is hashed again
        sizes = g["file_sizes"][:]
        sizes[aside] = UNKNOWN_SIZE
        g["file_sizes"][:] = sizes
    append_failures(g, s.failures or [])
    attrs = dict(s.attrs)
    if any(d.what == "class_names attribute" for d in s.damage):
        attrs["class_names"] = json.dumps([])  # every row is set aside; the next extract lists the classes
    for key, value in attrs.items():
        g.attrs[key] = value
    g[COMMITTED][:] = [len(keep), len(s.failures or []), int(attrs.get("listing_generation", 0))]
    return {"feature_set": s.name, "rows": s.rows, "rows_kept": len(keep), "rows_lost": s.rows - len(keep),
            "rows_set_aside": int(aside.sum()), "lost": None}


def _keep_original(store: str) -> str:
    """Keep the damaged file beside the store as STORE.damaged-<time> (a hard link where the
    file system allows it, so the store is replaced in one rename)."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    name, n = f"{store}.damaged-{stamp}", 1
    while os.path.exists(name):
        n += 1
        name = f"{store}.damaged-{stamp}-{n}"
    try:
        os.link(store, name)
    except OSError:
        os.rename(store, name)  # no hard links here: the store is missing until the rename below
    return name

