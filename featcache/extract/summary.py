"""The result of an extraction run: what ``--json`` prints."""
from __future__ import annotations

import os

from ..cache.key import KeySpec, feature_set_key
from .batch_loop import LoopResult
from .images.discover import Listing


def run_summary(spec: KeySpec, store: str, listing: Listing, failures, n_rows: int, feature_shape, extracted: int,
                seconds: float, hash_seconds: float, loop: LoopResult | None) -> dict:
    """The result of an extraction run (what --json prints).

    ``startup_seconds``: the run until the first batch's features were back, hashing left out
    (imports, building the model, the first compile, the first batch); ``images_per_second``:
    the steady rate after that (batches 2..N; the whole loop for a one-batch run)."""
    loop = loop or LoopResult()
    startup = seconds - loop.seconds + loop.first_batch_seconds - hash_seconds if loop.extracted else 0.0
    return {
        "feature_set": feature_set_key(spec),
        "store": os.fspath(store),
        "shape": [n_rows, *feature_shape],
        "extracted": extracted,
        "reused": n_rows - extracted,
        "failed": len(failures),
        "failures": [{"path": p, "reason": r} for p, r in failures],
        "skipped": [{"path": p, "reason": r} for p, r in listing.skipped],
        "warnings": listing.warnings,
        "class_names": listing.class_names,
        "seconds": round(seconds, 3),
        "hash_seconds": round(hash_seconds, 3),
        "startup_seconds": round(max(startup, 0.0), 3),
        "images_per_second": round(loop.images_per_second, 2),
        "resize": spec.resize,
    }


def run_times(times: dict, loop: LoopResult | None, seconds: float, listing: Listing) -> dict:
    """Where a run's wall-clock time went: ``list_seconds`` (listing the folder and stat of every
    file), ``hash_seconds`` (reading and hashing the files whose stat did not match a stored
    row), ``setup_seconds`` (checking the store, building the model, setting the feature set
    up), ``copy_seconds`` (bulk copies of stored features under new paths), ``write_seconds``
    (appending and committing extracted rows; overlapped with the model, so part of the loop),
    and ``wall_images_per_second``: the listed images over the whole run's wall clock."""
    loop = loop or LoopResult()
    out = {name: round(times.get(name, 0.0), 3)
           for name in ("list_seconds", "hash_seconds", "setup_seconds", "copy_seconds")}
    out["write_seconds"] = round(loop.write_seconds, 3)
    out["wall_images_per_second"] = round(len(listing.entries) / seconds, 2) if seconds > 0 else 0.0
    return out
