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
