"""What a run has to do: hash the listing, match it against the stored rows, copy known features.

Where files are hashed (one read per file in a cold run):

* A cold run (no stored rows under the key) hashes nothing up front. Every listed file goes to
  the decoders with no digest, and each decoding thread or process hashes the very bytes it
  decodes (:func:`.images.decode.decode_file_hashed`); the batch loop, before a batch goes
  through the model, drops the rows whose digest an earlier row of this run already has
  (byte-identical twins) and copies their features at the end (:mod:`.batch_loop`). No serial
  pass, no second read, and twins are extracted once.
* A re-run hashes only the files whose stat does not match a stored row (see :mod:`.filestat`),
  in a pool of threads (``hashlib`` and reads let go of the GIL), before the plan. Their digests
  decide whether they are extracted at all: a moved or renamed folder, the usual reason for an
  unmatched stat, is copied in bulk without decoding a file or building the model. Hashing them
  in the decoders instead would decode every moved file to throw the image away.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..cache.layout import store_path_text
from ..cache.writer import StoreWriter
from .images.decode import DecodeError, file_digest
from .filestat import matched_rows
from .images.discover import ImageEntry, Listing
from .signals import SIGNALS

COPY_BATCH_BYTES = 32 << 20  # features gathered per bulk copy (one append, one commit)
COPY_BATCH_MAX_ROWS = 8192
HASH_THREADS = min(8, 2 * (os.cpu_count() or 1))  # reads and sha256 run outside the GIL: threads scale


HASH_CHUNK = 256  # files per task: a million files are 4,000 tasks, not a million futures


def _digests(paths: list[str]) -> list[tuple[str | None, str | None]]:
    """(sha256, None) or (None, why not) of each file."""
    out = []
    for path in paths:
        try:
            out.append((file_digest(path), None))
        except DecodeError as exc:
            out.append((None, str(exc)))
    return out


def digest_all(listing: Listing, unread: list[int] | None = None
               ) -> tuple[list[tuple[ImageEntry, str]], list[tuple[str, str]], int]:
    """(entry, sha256) of each readable file of ``unread`` (indices into the listing's entries;
    None: every file), (relpath, reason) of the others, and how many files were read (in
    HASH_THREADS threads)."""
    entries = listing.entries
    unread = range(len(entries)) if unread is None else unread
    results = []
    if len(unread):
        with ThreadPoolExecutor(min(HASH_THREADS, len(unread))) as pool:
            paths = [listing.path(entries[i]) for i in unread]
            chunks = pool.map(_digests, [paths[k : k + HASH_CHUNK] for k in range(0, len(paths), HASH_CHUNK)])
            results = [r for chunk in chunks for r in chunk]
    hashed, failures = [], []
    for i, (digest, reason) in zip(unread, results):
        if digest is None:
            failures.append((entries[i].relpath, reason))
        else:
            hashed.append((entries[i], digest))
    return hashed, failures, len(unread)


def plan_run(existing, listing: Listing, stats: np.ndarray | None):
    """A re-run's plan: files whose stat matches a stored row (filestat) are kept without being
    read; the others are hashed and matched by plan. ``stats``: the listing's stat records, or
    None to read every file (--rehash). Returns (keep, copy, todo, failures, files read)."""
    rows = np.full(len(listing.entries), -1, np.int64) if stats is None else matched_rows(existing, listing, stats)
    hashed, failures, files_read = digest_all(listing, np.flatnonzero(rows < 0).tolist())
    matched = np.flatnonzero(rows >= 0).tolist()
    entries = listing.entries
    keep, copy, todo = plan(existing, hashed, zip(rows[matched].tolist(), [entries[i] for i in matched]))
    return keep, copy, todo, failures, files_read


def plan(existing, hashed, matched=()):
    """Match hashed files against stored rows.

    ``matched``: (stored row, entry) pairs already known to be unchanged (by stat), kept as
    they are. Returns (row updates for stored (path, digest) pairs, rows whose features can be
    copied for a known digest under a new path, images to extract)."""
    keep = dict(matched)
    if not hashed:  # an unchanged re-run: no look-up table over the stored rows
        return keep, [], []
    stored_row, digest_row = {}, {}
    if existing is not None:  # built by dict() from zips: no Python loop per stored row
        paths, digests = existing.paths.tolist(), existing.digests.tolist()
        rows = range(len(digests))
        stored_row = dict(zip(zip(paths, digests), rows))  # the last row of a (path, digest) pair
        digest_row = dict(zip(reversed(digests), reversed(rows)))  # the first row of a digest
    copy, todo = [], []
    for entry, digest in hashed:
        row = stored_row.get((store_path_text(entry.relpath), digest))
        if row is not None:
            keep[row] = entry
        elif digest in digest_row:
            copy.append((entry, digest, digest_row[digest]))
        else:
            todo.append((entry, digest))
    # The same bytes twice in one listing: extract once, copy for the rest.
    first, unique_todo = {}, []
    for entry, digest in todo:
        if digest in first:
            copy.append((entry, digest, None))
        else:
            first[digest] = entry
            unique_todo.append((entry, digest))
    return keep, copy, unique_todo


def copy_batch_rows(writer: StoreWriter) -> int:
    features = writer.group["features"]
    row_bytes = int(np.prod(features.shape[1:])) * features.dtype.itemsize
    return max(1, min(COPY_BATCH_MAX_ROWS, COPY_BATCH_BYTES // max(row_bytes, 1)))


def copy_rows(writer: StoreWriter, copies, stats=None, batch_rows: int | None = None) -> dict[str, int]:
    """Append rows whose features are already stored (same bytes under another path), in
    batches: each batch's source rows are read in sorted order, their CRCs checked (damage is
    never copied under a fresh CRC), appended in the listing's order and committed; a signal
    waits for the batch in hand. ``stats``: a filestat.FileStats (the copies' stat records).

    Returns digest -> source row for the copied digests."""
    batch_rows = batch_rows or copy_batch_rows(writer)
    for start in range(0, len(copies), batch_rows):
        part = copies[start : start + batch_rows]
        sources, where = np.unique(np.array([row for _, _, row in part], np.int64), return_inverse=True)
        features = writer.read_rows(sources)[where]
        entries = [e for e, _, _ in part]
        with SIGNALS.critical():
            writer.append(features, [e.label for e in entries], [e.relpath for e in entries], [d for _, d, _ in part],
                          [e.split for e in entries], stats.of(entries) if stats is not None else None)
            writer.commit()
    return {digest: row for _, digest, row in copies}
