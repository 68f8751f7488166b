"""The shard files behind a merged store's virtual ``features`` (see shards.py for merging).

HDF5 reads the fill value (zeros) for a virtual source it cannot open, without an error, so a
moved, truncated, damaged or replaced shard would silently read as zero features. Readers
check every source before use: it must be found the way HDF5 looks for it (HDF5_VDS_PREFIX,
then the merged file's folder, then the working folder), open cleanly and hold the rows
merged from it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import h5py

from ..errors import FeatcacheError
from .damage import guard
from .hdf5 import open_for_read


@dataclass(frozen=True)
class Source:
    """One shard file's part of a virtual dataset: rows [first, first + rows) of the merged
    dataset are rows [source_first, ...) of ``dataset`` in ``path`` (as found on disk)."""

    name: str  # as stored in the merged file
    path: str
    dataset: str
    first: int
    rows: int
    source_first: int


def _find(source: str, store_path: str) -> str | None:
    folder = os.path.dirname(os.path.abspath(store_path))
    prefixes = [p for p in os.environ.get("HDF5_VDS_PREFIX", "").split(":") if p]
    if os.path.isabs(source):
        base = os.path.basename(source)  # HDF5 falls back to the bare file name
        candidates = [source, *(os.path.join(p.replace("${ORIGIN}", folder), base) for p in prefixes)]
        candidates.append(os.path.join(folder, base))
    else:
        candidates = [os.path.join(p.replace("${ORIGIN}", folder), source) for p in prefixes]
        candidates += [os.path.join(folder, source), os.path.abspath(source)]
    return next((c for c in candidates if os.path.isfile(c)), None)


def sources(dataset: h5py.Dataset, store_path: str) -> list[Source]:
    """The shard parts of a virtual dataset, in row order (raises if a shard file is missing)."""
    parts = []
    for vs in dataset.virtual_sources():
        if vs.file_name == ".":
            continue
        (first, *_), (last, *_) = vs.vspace.get_select_bounds()
        (source_first, *_), _ = vs.src_space.get_select_bounds()
        found = _find(vs.file_name, store_path)
        if found is None:
            folder = os.path.dirname(os.path.abspath(store_path))
            raise FeatcacheError(
                f"{store_path}: its features are read from shard file {vs.file_name}, which is missing "
                f"(looked in {folder}); keep the shard files where they were merged, or merge again"
            )
        parts.append(Source(vs.file_name, found, vs.dset_name, int(first), int(last) - int(first) + 1, int(source_first)))
    return sorted(parts, key=lambda s: s.first)


def check_sources(dataset: h5py.Dataset, store_path: str) -> bool:
    """Fail clearly when a virtual dataset's shard files are gone, damaged or shorter than
    merged (about a millisecond per shard). True if every source is checksummed."""
    needed: dict[tuple[str, str], tuple[str, int]] = {}
    for s in sources(dataset, store_path):
        key = (s.path, s.dataset)
        needed[key] = (s.name, max(needed.get(key, (s.name, 0))[1], s.source_first + s.rows))
    checked = True
    for (found, name), (source, rows) in sorted(needed.items()):
        with open_for_read(found) as f, guard(found, f"dataset {name}"):
            have = f[name].shape[0] if name in f else -1
            checked = checked and have >= 0 and bool(f[name].fletcher32)
        if have < rows:
            raise FeatcacheError(
                f"{store_path}: shard file {source} no longer holds the {rows} rows merged from it "
                "(replaced or rewritten?); merge again"
            )
    return checked
