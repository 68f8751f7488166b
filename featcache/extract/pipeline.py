"""Stage one: image folder -> features appended to the store, batch by batch, resumable."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ..cache.key import KeySpec, feature_set_key
from ..cache.hdf5 import StoreWriteError
from ..cache.store import StoreWriter, open_store, store_path_text
from ..errors import FeatcacheError
from .backbones import check_size, get_backbone
from .decode import DEFAULT_MAX_PIXELS, DecodeError, check_resize, decode_file, file_digest
from .discover import DEFAULT_FRACTIONS, ImageEntry, Listing, discover
from .model import POOLINGS, FeatureModel, resolve_precision
from .weights import resolve_weights

STORAGE_DTYPES = ("float32", "float16")
PREFETCH_BATCHES = 2  # decoded batches waiting for the model: enough to hide decode, memory stays flat


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped an extraction; what was committed stays. ``exit_status``: 128 + signal."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_status = 128 + signum


class _StopSignals:
    """SIGINT/SIGTERM during an extraction in the main thread raise :class:`Interrupted`, but
    never inside a critical section (store set-up, appending and committing a batch): there
    the signal waits until the section is done, so the store is never left half-written."""

    def __init__(self):
        self.depth, self.pending, self.saved = 0, None, {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread() or self.saved:
            return False  # signal handlers belong to the main thread (and one run at a time)
        self.depth, self.pending = 0, None
        self.saved = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return True

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}

    def _handle(self, signum, frame):
        if self.pending is not None:
            return  # already stopping
        self.pending = signum
        if not self.depth:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            raise Interrupted(self.pending)


_SIGNALS = _StopSignals()


def _images_committed(store: str, spec: KeySpec) -> int:
    """Images of the current listing committed for ``spec`` (0 if the store cannot be read)."""
    try:
        with open_store(store) as s:
            fs = s.find(spec)
            return 0 if fs is None else len(fs.rows())
    except FeatcacheError:
        return 0


def _stops_cleanly(func):
    """A signal or a full disk ends a run cleanly: the committed rows stay, and the message
    says how many and how to go on."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        arguments = inspect.signature(func).bind(*args, **kwargs).arguments

        def committed() -> tuple[str, int]:
            config = arguments.get("config") or ExtractConfig(**arguments.get("options", {}))
            store = os.fspath(arguments["store"])
            return store, _images_committed(store, key_spec(config))

        installed = _SIGNALS.install()
        try:
            return func(*args, **kwargs)
        except Interrupted as exc:
            store, n = committed()
            raise Interrupted(
                exc.signum, f"interrupted: {n} images committed to {store}; run the same command again to resume"
            ) from None
        except StoreWriteError as exc:
            store, n = committed()
            raise FeatcacheError(
                f"{exc.reason} while writing {store}: {n} images committed, nothing lost; "
                "make room and run the same command again to resume"
            ) from None
        finally:
            if installed:
                _SIGNALS.restore()

    return wrapper


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides the features (the key) plus how the run goes."""

    base: str = "vgg16"
    size: int | None = None
    weights: str | None = "imagenet"
    layer: str | None = None
    pooling: str = "none"
    dtype: str = "float32"
    precision: str = "auto"  # resolved per device and base (model.resolve_precision) before keying
    resize: str = "bilinear"
    batch_size: int = 32
    seed: int = 0
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    split_seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    follow_symlinks: bool = False
    decode_workers: int | None = None
    xla: bool = False  # jit_compile the model step (not in the key: float rounding only)
    decode_processes: bool = False  # decode in worker processes (no GIL: many cores feeding a GPU)
    progress: bool = True
    augment: int = 0  # K augmented views per training image (0: none); see extract/augment.py
    aug_seed: int = 0  # seed of the augmented views (in the key with the recipe and K)
    unlabeled: bool = False  # list every image below the folder, without classes (a flat folder is always so)


def key_spec(config: ExtractConfig) -> KeySpec:
    """The cache key fields of a run (no I/O beyond hashing a local weights file)."""
    backbone = get_backbone(config.base)
    if config.pooling not in POOLINGS:
        raise FeatcacheError(f"unknown pooling {config.pooling!r}; choose from {', '.join(POOLINGS)}")
    if config.dtype not in STORAGE_DTYPES:
        raise FeatcacheError(f"unknown storage dtype {config.dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    check_resize(config.resize)
    size = config.size or backbone.default_size
    check_size(backbone, size)
    return KeySpec(
        backbone=backbone.name,
        weights=resolve_weights(backbone, config.weights, config.seed, size).identity,
        input_size=size,
        resize=config.resize,
        preprocessing=backbone.preprocessing,
        layer=config.layer or "output",
        pooling=config.pooling,
        dtype=config.dtype,
        precision=resolve_precision(config.precision, backbone),
        augment=_augment_field(config),
    )


def _augment_field(config: ExtractConfig) -> str:
    if not config.augment:
        return "none"
    from .augment import DEFAULT_STRENGTHS, augment_key

    if config.augment < 0:
        raise FeatcacheError(f"--augment {config.augment}: must be 0 (none) or more views")
    return augment_key(dict(DEFAULT_STRENGTHS), config.aug_seed, config.augment)


def _digest_all(listing: Listing) -> tuple[list[tuple[ImageEntry, str]], list[tuple[str, str]]]:
    hashed, failures = [], []
    for entry in listing.entries:
        try:
            hashed.append((entry, file_digest(listing.path(entry))))
        except DecodeError as exc:
            failures.append((entry.relpath, str(exc)))
    return hashed, failures


def _decoded_batches(listing: Listing, todo, config: ExtractConfig, size: int):
    """Yield (entries, digests, uint8 images, failures) per batch; decoding runs ahead in threads
    (or processes: ``config.decode_processes``)."""
    workers = config.decode_workers or min(4, os.cpu_count() or 1)
    out: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()

    decode = functools.partial(decode_file, size=size, resize=config.resize, max_pixels=config.max_pixels)
    chunk = max(1, config.batch_size // (2 * workers))  # processes: fewer, larger messages

    def emit(batch, decoded):
        results = [(entry, digest, *r) for (entry, digest), r in zip(batch, decoded)]
        good = [r for r in results if r[3] is None]
        images = np.stack([r[2] for r in good]) if good else np.zeros((0, size, size, 3), np.uint8)
        failed = [(r[0].relpath, r[3]) for r in results if r[3] is not None]
        out.put(([r[0] for r in good], [r[1] for r in good], images, failed))

    def produce():
        if config.decode_processes:  # spawn: forking a process that runs TF/JAX threads is unsafe
            import multiprocessing

            pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _ignore_sigint)
        else:
            pool = ThreadPoolExecutor(workers)
        try:
            # Several batches in the pool at once: no barrier between batches, workers never idle.
            pending = deque()
            for start in range(0, len(todo), config.batch_size):
                if stop.is_set():
                    return
                batch = todo[start : start + config.batch_size]
                pending.append((batch, pool.map(decode, [listing.path(e) for e, _ in batch], chunksize=chunk)))
                if len(pending) > PREFETCH_BATCHES:
                    emit(*pending.popleft())
            while pending and not stop.is_set():
                emit(*pending.popleft())
        except BaseException as exc:  # surface decoder crashes in the main thread
            out.put(exc)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            out.put(None)

    thread = threading.Thread(target=produce, name="featcache-decode", daemon=True)
    thread.start()
    try:
        while (item := out.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock the producer if it waits on a full queue
            try:
                out.get(timeout=0.1)
            except queue.Empty:
                pass


def _ignore_sigint():
    """Decoding processes leave Ctrl-C to the main process, which stops the run cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _plan(existing, hashed):
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


@_stops_cleanly
def extract(image_dir: str, store: str, config: ExtractConfig | None = None,
            shard: tuple[int, int] | None = None, **options) -> dict:
    """Extract features of every image under ``image_dir`` into ``store``.

    With ``shard=(I, N)`` only the listing's part I of N (see :mod:`.sharding`) is extracted.

    Only images whose (path, content digest) pair is not yet stored under this key run
    through the model. Returns a summary dict (feature_set, shape, extracted, reused,
    failed, seconds, images_per_second, ...).
    """
    config = config or ExtractConfig(**options)
    if config.augment:  # cached augmentation: its own writer (views of training images)
        if shard is not None:
            raise FeatcacheError("--augment cannot be combined with --shard")
        from .augment import extract_augmented

        return extract_augmented(image_dir, store, config)
    started = time.perf_counter()
    spec = key_spec(config)
    backbone = get_backbone(config.base)
    size = spec.input_size
    listing = discover(image_dir, config.split_fractions, config.split_seed, config.follow_symlinks, config.unlabeled)
    if shard is not None:  # class names stay those of the full listing, so labels agree across shards
        from .sharding import check_shard, select_shard

        listing.entries = select_shard(listing.entries, *check_shard(shard))
    with StoreWriter(store, open_file=False) as writer:  # the lock first: a second writer fails at once
        hashed, failures = _digest_all(listing)
        hash_seconds = time.perf_counter() - started
        existing = writer.peek(spec)  # read-only: readers go on while the model is built
        keep, copy, todo = _plan(existing, hashed)
        model = None
        if todo or existing is None:
            model = FeatureModel(backbone, size, resolve_weights(backbone, config.weights, config.seed, size),
                                 config.layer, config.pooling, spec.precision, config.seed, jit_compile=config.xla)
        with _SIGNALS.critical():  # set-up: a signal waits until the store is consistent again
            writer.open()
            existing = writer.existing(spec)  # the rows peeked at (the lock is held), in-flight tail cut
            if existing is None:
                writer.create(spec, model.output_shape, config.dtype, config.batch_size)
            writer.set_listing_attrs(listing.class_names, config.seed, listing_attrs(listing, config, image_dir))
            writer.start_appending()

            if existing is not None and existing.rows:
                rows = np.arange(existing.rows)
                entries = [keep.get(int(r)) for r in rows]
                writer.update_rows(
                    rows,
                    labels=np.array([e.label if e else -1 for e in entries], dtype="int32"),
                    splits=np.array([e.split if e else "" for e in entries], dtype="S10"),
                    active=np.array([1 if e else 0 for e in entries], dtype="uint8"),
                )
            known_rows = _copy_rows(writer, [(e, d, row) for e, d, row in copy if row is not None])
            writer.add_failures(failures)
            writer.commit()

        extracted, extract_seconds, new_rows = _run_model(writer, listing, todo, config, size, model, failures)
        # The same bytes under several paths in this listing: extracted once, copied for the rest.
        known_rows.update(new_rows)
        with _SIGNALS.critical():
            _copy_rows(writer, [(e, d, known_rows[d]) for e, d, row in copy if row is None and d in known_rows])
            writer.commit()
        feature_shape = writer.group["features"].shape[1:]
        n_rows = int(writer.group["active"][:].sum())

    return run_summary(spec, store, listing, failures, n_rows, feature_shape, extracted,
                       time.perf_counter() - started, hash_seconds, extract_seconds)


def listing_attrs(listing: Listing, config: ExtractConfig, image_dir: str) -> dict:
    """Feature-set attributes that describe the listing a run saw (not part of the key)."""
    backbone = get_backbone(config.base)
    return {
        "split_source": listing.split_source,
        "split_fractions": list(config.split_fractions),
        "split_seed": config.split_seed,
        "image_root": os.path.abspath(image_dir),
        # The key holds only the weights' hash; stage two needs the argument to rebuild the base.
        "weights_arg": resolve_weights(backbone, config.weights, config.seed).arg,
    }


def run_summary(spec: KeySpec, store: str, listing: Listing, failures, n_rows: int, feature_shape, extracted: int,
                seconds: float, hash_seconds: float, extract_seconds: float) -> dict:
    """The result of an extraction run (what --json prints)."""
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
        "images_per_second": round(extracted / extract_seconds, 2) if extracted and extract_seconds > 0 else 0.0,
    }


def _copy_rows(writer: StoreWriter, copies) -> dict[str, int]:
    """Append rows whose features are already stored (same bytes under another path).

    Returns digest -> source row for the copied digests."""
    features = writer.group["features"]
    for entry, digest, row in copies:
        writer.append(features[row : row + 1], [entry.label], [entry.relpath], [digest], [entry.split])
    return {digest: row for _, digest, row in copies}


def _run_model(writer, listing, todo, config, size, model, failures) -> tuple[int, float, dict[str, int]]:
    """Decode and run the model over ``todo``, appending and committing batch by batch.

    Returns (images extracted, seconds, digest -> new row)."""
    new_rows: dict[str, int] = {}
    if not todo:
        return 0, 0.0, new_rows
    from tqdm import tqdm

    extracted = 0
    started = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not config.progress,
               desc=f"extract {config.base}", dynamic_ncols=True)
    try:
        for entries, digests, images, failed in _decoded_batches(listing, todo, config, size):
            feats = model(images).astype(config.dtype) if len(images) else None
            with _SIGNALS.critical():  # a signal waits until this batch is committed
                if len(images):
                    first_row = writer.group["features"].shape[0]
                    new_rows.update((d, first_row + i) for i, d in enumerate(digests))
                    writer.append(feats, [e.label for e in entries], [e.relpath for e in entries], digests,
                                  [e.split for e in entries])
                writer.add_failures(failed)
                failures.extend(failed)
                writer.commit()
            extracted += len(images)
            bar.update(len(entries) + len(failed))
    finally:
        bar.close()
    return extracted, time.perf_counter() - started, new_rows
