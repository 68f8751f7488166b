"""Stage one: image folder -> features appended to the store, batch by batch, resumable.

The pieces: :mod:`.config` (options, ``auto`` values, the key), :mod:`.plan` (what is new),
:mod:`.feeder` (decoding ahead), :mod:`.batch_loop` (model and appends, overlapped),
:mod:`.signals` (clean stops), :mod:`.summary` (the result). This module puts them in order.
"""
from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from ..cache.writer import StoreWriter
from ..errors import FeatcacheError
from .batch_loop import LoopResult, run_batches
from .config import STORAGE_DTYPES, ExtractConfig, key_spec, listing_attrs, resolve_decode, resolve_run  # noqa: F401
from .images.discover import check_shard, select_shard
from .images.feeder import decoded_batches
from .bases.feature_model import FeatureModel
from .filestat import FileStats, recordable, stat_listing
from .plan import copy_rows, plan_run
from .summary import run_summary, run_times
from .signals import SIGNALS, Interrupted, stops_cleanly  # noqa: F401 (Interrupted: part of the API)
from .bases.weights import resolve_weights


@stops_cleanly
def extract(image_dir: str, store: str, config: ExtractConfig | None = None,
            shard: tuple[int, int] | None = None, **options) -> dict:
    """Extract features of every image under ``image_dir`` into ``store``.

    With ``shard=(I, N)`` only the listing's part I of N (see :mod:`.sharding`) is extracted.

    Only images whose (path, content digest) pair is not yet stored under this key run
    through the model. Returns a summary dict (feature_set, shape, extracted, reused,
    failed, seconds, startup_seconds, images_per_second, ...).
    """
    config = config or ExtractConfig(**options)
    if config.augment:  # cached augmentation: its own writer (views of training images)
        if shard is not None:
            raise FeatcacheError("--augment cannot be combined with --shard")
        from .augment_extract import extract_augmented

        return extract_augmented(image_dir, store, config)
    started = time.perf_counter()
    times = {}
    clock = time.perf_counter()
    started_ns = time.time_ns()  # before any stat: a file modified since is racy (see filestat)
    decode, spec, backbone, size, listing = resolve_run(image_dir, config, stat_files=True)
    if shard is not None:  # class names stay those of the full listing, so labels agree across shards
        listing.entries, listing.file_stats = select_shard(listing.entries, *check_shard(shard)), None
    with StoreWriter(store, open_file=False) as writer:  # the lock first: a second writer fails at once
        stats = stat_listing(listing)
        listing.file_stats = None  # now in ``stats``: a million stat objects are 300 MB
        clock = _lap(times, "list_seconds", clock)
        existing = writer.peek(spec)  # read-only: readers go on while the model is built; damage stops here
        file_stats = FileStats(listing, recordable(stats, started_ns))
        if existing is None or not existing.rows:
            # Cold: nothing stored to match, so no pass before the model; the decoders hash the
            # bytes they decode, and the batch loop drops twins (see plan's docstring).
            keep, copy, failures, files_read = {}, [], [], len(listing.entries)
            todo = [(e, None) for e in listing.entries]
        else:
            keep, copy, todo, failures, files_read = plan_run(existing, listing, None if config.rehash else stats)
        clock = _lap(times, "hash_seconds", clock)
        writer.check_rows(spec, [row for _, _, row in copy if row is not None])  # the rows it will copy
        model = None
        if todo or existing is None:
            # One compiled shape per run: every batch, the last one too, has this many rows.
            model = FeatureModel(backbone, size, resolve_weights(backbone, config.weights, config.seed, size),
                                 config.layer, config.pooling, spec.precision, config.seed, jit_compile=config.xla,
                                 pad_rows=min(config.batch_size, len(todo)) or None)
        with SIGNALS.critical():  # set-up: a signal waits until the store is consistent again
            writer.open()
            peeked = None if existing is None else existing.rows
            existing = None  # the peeked columns, no longer needed (a million rows: 400 MB)
            stored = writer.prepare(spec)  # the rows peeked at (the lock is held), in-flight tail cut
            if stored != peeked:  # the plan's row numbers are the peek's: never expected with the lock held
                raise FeatcacheError(f"{store}: {stored} committed rows where {peeked} were read; run extract again")
            if stored is None:
                writer.create(spec, model.output_shape, config.dtype, config.batch_size)
            else:
                writer.add_stat_columns()  # a store written before them gains them (rows "unknown")
            writer.set_listing_attrs(listing.class_names, config.seed, listing_attrs(listing, config, image_dir))
            writer.start_appending()

            if stored:
                # Every stored row: listed ones take their entry's label and split, the rest go inactive.
                kept = np.array(sorted(keep), np.int64)
                entries = [keep[r] for r in kept.tolist()]
                labels, splits = np.full(stored, -1, "int32"), np.full(stored, b"", "S10")
                active = np.zeros(stored, "uint8")
                labels[kept] = [e.label for e in entries]
                splits[kept] = [e.split for e in entries]
                active[kept] = 1
                writer.update_rows(np.arange(stored), labels=labels, splits=splits, active=active,
                                   stat_rows=kept, stats=file_stats.of(entries))
            writer.add_failures(failures)
            writer.commit()
        clock = _lap(times, "setup_seconds", clock)
        stored_copies = [(e, d, row) for e, d, row in copy if row is not None]
        known_rows = copy_rows(writer, stored_copies, file_stats)
        clock = _lap(times, "copy_seconds", clock)

        loop = _run_model(writer, listing, todo, config, decode, spec.resize, size, model, failures, file_stats)
        clock = time.perf_counter()
        # The same bytes under several paths in this listing: extracted once, copied for the rest.
        known_rows.update(loop.new_rows)
        twins = [(e, d, known_rows[d]) for e, d, row in copy + [(e, d, None) for e, d in loop.twins]
                 if row is None and d in known_rows]
        copy_rows(writer, twins, file_stats)
        twin_failures = twins_failed(loop, known_rows)
        if twin_failures:
            with SIGNALS.critical():
                writer.add_failures(twin_failures)
                writer.commit()
            failures += twin_failures
        _lap(times, "copy_seconds", clock)
        feature_shape = writer.group["features"].shape[1:]
        n_rows = int(writer.group["active"][:].sum())

    seconds = time.perf_counter() - started
    summary = run_summary(spec, store, listing, failures, n_rows, feature_shape, loop.extracted,
                          seconds, times["list_seconds"] + times["hash_seconds"], loop)
    summary.update(decode=decode, files_read=files_read, copied=len(stored_copies) + len(twins), **run_times(times, loop, seconds, listing))
    return summary


def twins_failed(loop: LoopResult, known_rows: dict) -> list[tuple[str, str]]:
    """(path, reason) of the twins a decoder skipped whose bytes did not make a row: their
    claimer's failure (the same bytes fail the same way), or, where the claimer's bytes only
    shared the claims' key prefix, a line that says to run again."""
    return [(e.relpath, loop.failed_digests.get(d, "not extracted: its sha256 began as another file's; run extract again"))
            for e, d in loop.twins if d not in known_rows]


def _lap(times: dict, name: str, since: float) -> float:
    """Add the time since ``since`` to ``times[name]``; returns now."""
    now = time.perf_counter()
    times[name] = times.get(name, 0.0) + now - since
    return now


def _run_model(writer, listing, todo, config, decode, resize, size, model, failures, stats) -> LoopResult:
    """Decode and run the model over ``todo``, appending and committing batch by batch."""
    if not todo:
        return LoopResult()
    from tqdm import tqdm

    bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not config.progress,
               desc=f"extract {config.base}", dynamic_ncols=True)
    try:
        # closing: a stopped run ends its decoding processes now, not when the traceback is freed
        with contextlib.closing(decoded_batches(listing, todo, config, size, decode, resize, config.batch_size)) as batches:
            return run_batches(writer, batches, model, config.dtype, failures, on_commit=bar.update, stats=stats)
    finally:
        bar.close()
