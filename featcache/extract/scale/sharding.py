"""Sharded extraction: which images belong to shard I of N, and the shard task itself.

An image belongs to shard ``sha256("featcache-shard:" + relpath) mod N``
(:func:`~featcache.extract.images.discover.shard_of`, kept in discover so that the pipeline, which this
module runs, does not import this module back): the same family of
hash as the split (:func:`~featcache.extract.images.discover.hash_split`) with its own salt, so
shards and splits are independent, and adding images never moves existing ones to another
shard. Every shard lists the whole folder (class names and label indices come from the full
listing, so they agree across shards) and keeps only its own entries.

A shard run writes its own store and, once complete, a commit record in the store's
sidecar (see :mod:`featcache.cache.shards`). A re-run whose shard listing is unchanged since
the commit (same paths, sizes, modification times, labels and splits) returns at once
without opening the store for writing; any other re-run resumes through the store's own
incremental logic (only images not yet stored go through the model).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from ...cache.key import feature_set_key
from ...cache.shards import begin_shard, check_shard_identity, commit_shard, committed_record, marker_path
from ...cache.store import Store
from ...errors import FeatcacheError
# shard selection lives in discover (the pipeline needs it; this module needs the pipeline)
from ..images.discover import SHARD_SALT, ImageEntry, Listing, check_shard, discover, parse_shard, select_shard, shard_of  # noqa: F401

def shard_store_name(index: int, count: int) -> str:
    """The recommended file name of a shard store, e.g. ``shard-0003-of-0008.h5``."""
    return f"shard-{index:04d}-of-{count:04d}.h5"


def listing_fingerprint(listing: Listing, entries: list[ImageEntry]) -> str:
    """A digest of what the shard would extract, from file metadata only (no image bytes read)."""
    h = hashlib.sha256()
    h.update(json.dumps([listing.class_names, listing.split_source]).encode())
    for e in entries:
        try:
            st = os.stat(listing.path(e))
            meta = (st.st_size, st.st_mtime_ns)
        except OSError:
            meta = None
        h.update(json.dumps([e.relpath, e.label, e.split, meta]).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def run_shard(image_dir: str, store: str, config, shard: tuple[int, int]) -> dict:
    """Extract shard ``shard = (I, N)`` of ``image_dir`` into ``store`` and commit it.

    Returns the extract summary plus ``shard``, ``shard_images`` (images listed in this
    shard), ``status`` ("extracted" or "skipped": already committed and unchanged) and
    ``marker`` (the sidecar's path)."""
    from ..pipeline import extract, key_spec

    index, count = check_shard(tuple(shard))
    started = time.perf_counter()
    store = os.fspath(store)
    spec = key_spec(config)
    name = feature_set_key(spec)
    check_shard_identity(store, (index, count))
    listing = discover(image_dir, config.split_fractions, config.split_seed, config.follow_symlinks, config.unlabeled)
    entries = select_shard(listing.entries, index, count)
    fingerprint = listing_fingerprint(listing, entries)
    info = {"shard": [index, count], "shard_images": len(entries), "marker": marker_path(store)}

    record = committed_record(store, (index, count), name)
    if record is not None and record.get("listing") == fingerprint:
        with Store(store) as s:
            fs = s[name]
            failures = fs.failures()
            shape = [len(fs.rows()), *fs.feature_shape]
        return {
            "feature_set": name, "store": store, "shape": shape, "extracted": 0, "reused": shape[0],
            "failed": len(failures), "failures": [{"path": p, "reason": r} for p, r in failures],
            "skipped": [{"path": p, "reason": r} for p, r in listing.skipped], "warnings": listing.warnings,
            "class_names": listing.class_names, "seconds": round(time.perf_counter() - started, 3),
            "hash_seconds": 0.0, "images_per_second": 0.0, **info, "status": "skipped",
        }

    begin_shard(store, (index, count), name)
    result = extract(image_dir, store, config, shard=(index, count))
    with Store(store) as s:
        fs = s[name]
        rows, n_failures = fs.n_committed, fs.n_failures
    commit_shard(store, (index, count), name, {
        "key": spec.to_dict(),
        "rows": rows,
        "active": result["shape"][0],
        "failures": n_failures,
        "images": len(entries),
        "extracted": result["extracted"],
        "class_names": listing.class_names,
        "listing": fingerprint,
    })
    return {**result, **info, "status": "extracted"}


def shard_paths(folder: str, count: int) -> list[str]:
    return [os.path.join(folder, shard_store_name(i, count)) for i in range(count)]


def check_scale_options(shard, ray_address, shards, gpus_per_worker, cpus_per_worker) -> None:
    """Which of extract's scale-out options go together."""
    if shard is not None and ray_address is not None:
        raise FeatcacheError("--shard and --ray: use one (--ray runs every shard itself; set their number with --shards)")
    if ray_address is None:
        for name, value in (("--shards", shards), ("--gpus-per-worker", gpus_per_worker),
                            ("--cpus-per-worker", cpus_per_worker)):
            if value is not None:
                raise FeatcacheError(f"{name}: only with --ray (for a job array use --shard I/N)")
