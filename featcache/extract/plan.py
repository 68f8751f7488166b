"""What a run has to do: hash the listing, match it against the stored rows, copy known features."""
from __future__ import annotations

from ..cache.layout import store_path_text
from ..cache.writer import StoreWriter
from .images.decode import DecodeError, file_digest
from .images.discover import ImageEntry, Listing


def digest_all(listing: Listing) -> tuple[list[tuple[ImageEntry, str]], list[tuple[str, str]]]:
    """(entry, sha256) of every readable file, and (relpath, reason) of the others."""
    hashed, failures = [], []
    for entry in listing.entries:
        try:
            hashed.append((entry, file_digest(listing.path(entry))))
        except DecodeError as exc:
            failures.append((entry.relpath, str(exc)))
    return hashed, failures


def plan(existing, hashed):
    """Match the listing against stored rows.

    Returns (row updates for stored (path, digest) pairs, rows whose features can be copied
    for a known digest under a new path, images to extract)."""
    stored_row, digest_row = {}, {}
    if existing is not None:
        for i, (p, d) in enumerate(zip(existing.paths, existing.digests)):
            stored_row[(p, d)] = i
            digest_row.setdefault(d, i)
    keep, copy, todo = {}, [], []
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


def copy_rows(writer: StoreWriter, copies) -> dict[str, int]:
    """Append rows whose features are already stored (same bytes under another path).

    Returns digest -> source row for the copied digests."""
    for entry, digest, row in copies:  # read with its CRC checked: damage is never copied under a fresh one
        writer.append(writer.read_features(row, row + 1), [entry.label], [entry.relpath], [digest], [entry.split])
    return {digest: row for _, digest, row in copies}
