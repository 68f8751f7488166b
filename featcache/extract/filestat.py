"""Re-runs by file stat, as git's index does: a file whose relative path and stat are those
recorded with a stored row keeps that row's digest without being read.

What is compared (one stat record per file, ``layout.STAT_COLUMNS``): size, mtime in ns, ctime
in ns and inode number. Size and mtime catch ordinary edits. ctime is set by the kernel on every
change of the file's data or metadata and cannot be set back from user space: a tool that
rewrites a file and restores its mtime (``os.utime``, ``touch -d``, ``rsync -t`` of new bytes)
still changes the ctime, so the file is read again. The inode catches a file replaced by another
one (an editor's save-by-rename, an extraction that recreates files) whose size and times happen
to agree. The device number is left out, as git leaves it out by default: it changes across
reboots and remounts on NFS and removable drives, and the path, inode and ctime already pin the
file. The cost of a stricter check is only a re-read: a tree copied with ``cp -a`` (same mtimes,
new inodes and ctimes) is hashed once again, never reused wrongly.

Racy files (git's "racy clean" problem): a file written within the file system's timestamp
granularity of the listing may change again without its mtime moving. Such files (mtime not
older than RACY_NS before the run started) are hashed as usual, but their stat is not recorded
(UNKNOWN_SIZE), so the next run hashes them again. ``rehash`` (``extract --rehash``) ignores
the records and reads every file.
"""
from __future__ import annotations

import os
from operator import attrgetter

import numpy as np

from ..cache.layout import STAT_COLUMNS, UNKNOWN_SIZE, store_path_text
from .images.discover import Listing

# Coarser than any timestamp granularity in use (FAT: 2 s, ext3/HFS+: 1 s), and than a little clock skew.
RACY_NS = 3_000_000_000


def stat_listing(listing: Listing) -> np.ndarray:
    """(n, 4) int64 stat records of the listing's files (UNKNOWN_SIZE where stat fails:
    the file is hashed, and its read says what is wrong with it). The walk's own stats
    (Listing.file_stats) when it took them, otherwise a stat call per file."""
    n = len(listing.entries)
    sizes, mtimes, ctimes = np.full(n, UNKNOWN_SIZE, np.int64), np.zeros(n, np.int64), np.zeros(n, np.int64)
    inodes = np.zeros(n, np.uint64)
    taken = listing.file_stats
    for i, st in enumerate(taken if taken is not None and len(taken) == n else map(_stat, map(listing.path, listing.entries))):
        if st is not None:
            sizes[i], mtimes[i], ctimes[i], inodes[i] = st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino
    return np.stack([sizes, mtimes, ctimes, inodes.view(np.int64)], axis=1)


def _stat(path: str):
    try:
        return os.stat(path)
    except OSError:
        return None


def recordable(stats: np.ndarray, started_ns: int) -> np.ndarray:
    """``stats`` with the racy ones (modified within RACY_NS of the run's start, or later) made unknown."""
    out = stats.copy()
    out[stats[:, 1] >= started_ns - RACY_NS, 0] = UNKNOWN_SIZE
    return out


def matched_rows(existing, listing: Listing, stats: np.ndarray) -> np.ndarray:
    """For each listed file, the stored row with the same path and stat (its digest is known
    without reading the file), or -1 (the file has to be read). ``existing``: the stored rows
    (writer.PreparedSet) or None.

    One dict look-up per file (its path's last stored row), the stat compared for all files at
    once; only a file whose path has several stored rows (older versions of it) and whose stat
    differs from the last one's is looked up among those rows."""
    n = len(listing.entries)
    if existing is None or existing.stats is None or not existing.rows:
        return np.full(n, -1, np.int64)
    paths = existing.paths.tolist()
    last = dict(zip(paths, range(len(paths))))  # a path's last row wins
    listed = [store_path_text(e.relpath) for e in listing.entries]
    rows = np.fromiter(map(last.get, listed, [-1] * n), np.int64, n)
    stored = existing.stats[np.maximum(rows, 0)]
    usable = (rows >= 0) & (stats[:, 0] != UNKNOWN_SIZE)
    same = usable & (stored[:, 0] != UNKNOWN_SIZE) & (stored == stats).all(axis=1)
    retry = np.flatnonzero(usable & ~same)
    if len(retry):  # an older row of the same path may hold this stat
        earlier = {}
        for row, path in enumerate(paths):
            if last[path] != row:
                earlier.setdefault(path, []).append(row)
        for i in retry:
            for row in reversed(earlier.get(listed[i], ())):  # the latest first, as before
                if existing.stats[row, 0] != UNKNOWN_SIZE and (existing.stats[row] == stats[i]).all():
                    rows[i], same[i] = row, True
                    break
    rows[~same] = -1
    return rows


class FileStats:
    """The stat records to store with a run's rows, looked up by entry."""

    def __init__(self, listing: Listing, stats: np.ndarray):
        assert stats.shape == (len(listing.entries), len(STAT_COLUMNS))
        self.index = dict(zip(map(attrgetter("relpath"), listing.entries), range(len(listing.entries))))
        self.stats = stats

    def of(self, entries) -> np.ndarray:
        rows = np.fromiter(map(self.index.__getitem__, map(attrgetter("relpath"), entries)), np.int64, len(entries))
        return self.stats[rows].reshape(-1, len(STAT_COLUMNS))
