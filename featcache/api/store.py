"""Stage one and the store: extraction, info, verify, repair, merge, the backbone registry."""
from __future__ import annotations

import os

from ..extract import defaults as EXTRACT
from ..errors import FeatcacheError
from .options import name_list


def _split_fractions(split) -> tuple[float, float, float]:
    """"0.8,0.1,0.1" (the command line's form) or a sequence of three numbers."""
    try:
        fractions = tuple(float(x) for x in (split.split(",") if isinstance(split, str) else split))
        if len(fractions) != 3:
            raise ValueError
    except (TypeError, ValueError):
        raise FeatcacheError(f"--split {split!r}: expected three fractions like 0.8,0.1,0.1") from None
    return fractions


# -- stage one: extraction and the store ---------------------------------------------------------

def extract_features(image_dir: str | os.PathLike, store: str | os.PathLike, *, base: str = EXTRACT.BASE,
                     size: int | None = None, weights: str | None = EXTRACT.WEIGHTS, layer: str | None = None,
                     pooling: str = EXTRACT.POOLING, batch_size: int = EXTRACT.BATCH_SIZE, dtype: str = EXTRACT.DTYPE,
                     precision: str = EXTRACT.PRECISION, decode: str = EXTRACT.DECODE,
                     decode_workers: int | None = None, xla: bool = False, decode_processes: bool = False,
                     resize: str = EXTRACT.RESIZE, split: str | tuple = EXTRACT.SPLIT,
                     split_seed: int = EXTRACT.SPLIT_SEED, seed: int = EXTRACT.SEED,
                     max_pixels: int = EXTRACT.MAX_PIXELS, follow_symlinks: bool = False, unlabeled: bool = False,
                     augment: int = EXTRACT.AUGMENT, rehash: bool = False, aug_seed: int = EXTRACT.AUG_SEED,
                     progress: bool = True,
                     shard: str | tuple[int, int] | None = None,
                     ray: str | None = None, shards: int | None = None, gpus_per_worker: float | None = None,
                     cpus_per_worker: int | None = None, log=None) -> dict:
    """Extract features of every image under ``image_dir`` into the HDF5 ``store``
    (``featcache extract``). Only images whose (path, content digest) is not yet stored under
    this cache key run through the model; a re-run is cheap: a file whose relative path, size,
    mtime, ctime and inode are those stored with its row is not even read (``rehash=True`` reads
    and hashes every file).

    A folder without class subfolders, or any tree with ``unlabeled=True``, is stored without
    labels (features and paths; ``class_names`` is empty): heads cannot train on it, but
    ``open_store(store).load()`` reads it and ``predict`` classifies its images.

    ``shard="I/N"`` (or ``(I, N)``) extracts one shard; ``ray=""`` (a local Ray) or an address
    runs ``shards`` Ray tasks and merges them into ``store``. ``log``: a callable taking one
    line (Ray progress); default stderr.

    Returns a dict: ``feature_set`` (its name in the store), ``store``, ``shape`` (rows and
    feature shape), ``extracted``, ``reused``, ``failed``, ``failures`` and ``skipped`` (lists of
    ``{path, reason}``), ``warnings``, ``class_names``, ``seconds``, ``hash_seconds``,
    ``startup_seconds`` (model build, first compile, first batch), ``images_per_second`` (the
    steady state after the first batch), ``wall_images_per_second`` (listed images over the
    whole run), ``list_seconds``, ``setup_seconds``, ``copy_seconds``, ``write_seconds``,
    ``files_read`` and ``copied`` (see extract/summary.py run_times), ``decode`` and ``resize`` (as resolved); sharded runs add ``shard``, ``shard_images``, ``status``; Ray runs add
    ``merge``, ``shard_dir`` and ``shards``. Images that could not be used are listed, not
    raised: check ``failed``.
    """
    from ..extract.pipeline import ExtractConfig, extract as run_extract
    from ..extract.scale.sharding import check_scale_options, parse_shard

    shard_text = f"{shard[0]}/{shard[1]}" if isinstance(shard, tuple) else shard
    ray = "" if ray is True else ray  # ray=True: a local Ray instance, like a bare --ray
    check_scale_options(shard_text, ray, shards, gpus_per_worker, cpus_per_worker)
    config = ExtractConfig(
        base=base, size=size, weights=weights, layer=layer, pooling=pooling, batch_size=batch_size, dtype=dtype,
        precision=precision, decode=decode, decode_workers=decode_workers, xla=xla, decode_processes=decode_processes,
        resize=resize, split_fractions=_split_fractions(split), split_seed=split_seed, seed=seed,
        max_pixels=max_pixels, follow_symlinks=follow_symlinks, unlabeled=unlabeled, augment=augment, aug_seed=aug_seed,
        progress=progress, rehash=rehash,
    )
    image_dir, store = os.fspath(image_dir), os.fspath(store)
    if ray is not None:
        from ..extract.scale.ray_runner import run_ray

        return run_ray(image_dir, store, config, shards, ray or None, gpus_per_worker or 0, cpus_per_worker or 1,
                       log=log)
    if shard_text is not None:
        from ..extract.scale.sharding import run_shard

        return run_shard(image_dir, store, config, parse_shard(shard_text))
    return run_extract(image_dir, store, config)

def info(store: str | os.PathLike) -> dict:
    """What a store holds (``featcache info``).

    Returns ``{"store": path, "feature_sets": [summary, ...]}``; each summary has
    ``feature_set``, ``key`` (every cache-key field), ``shape``, ``dtype``, ``rows_stored``,
    ``rows_active``, ``labelled``, ``class_names``, ``counts`` (split -> class -> images), ``failures``,
    ``seed`` and ``checksums`` (False: written before featcache stored checksums, "unchecked").
    A damaged store raises StoreDamaged (a FeatcacheError) naming what is damaged."""
    from ..cache.store import open_store

    with open_store(store) as s:
        summaries = [s[name].summary() for name in s.feature_set_names()]
    return {"store": os.fspath(store), "feature_sets": summaries}

def verify(store: str | os.PathLike) -> dict:
    """Read all of ``store`` and check it (``featcache verify``): every chunk's checksum, every
    row's CRC and the consistency of the columns. Safe beside a running extraction.

    Returns ``store``, ``ok`` (nothing damaged), ``damage`` (of the file as a whole: truncation,
    metadata) and per feature set ``feature_sets: [{feature_set, status ("ok", "damaged" or
    "unchecked": written before checksums), rows, rows_lost, rows_set_aside, unreadable,
    damage: [{what, rows: [first, last] or None, reason, file?}], torn}]``, ``unchecked``,
    ``left_by_killed_run``, ``bytes``, ``seconds`` and ``repair`` (the command to run, or None).
    A damaged store is a result (``ok`` False), not an error."""
    from ..cache.integrity.verify import verify as run_verify

    return run_verify(os.fspath(store))

def repair(store: str | os.PathLike) -> dict:
    """Rewrite a damaged ``store`` with every row that can still be read (``featcache repair``);
    the damaged file is kept beside it as ``STORE.damaged-<time>``. The next extraction of the
    same folder recomputes the rows left out.

    Returns ``store``, ``repaired`` (False: nothing was damaged, nothing done), ``damaged_copy``,
    ``feature_sets`` (what verify found), ``kept: [{feature_set, rows, rows_kept, rows_lost,
    rows_set_aside, lost}]``, ``nothing_recovered``, ``shard_records_withdrawn`` and ``seconds``."""
    from ..cache.integrity.repair import repair as run_repair

    return run_repair(os.fspath(store))

def merge(shards, out: str | os.PathLike, *, allow_missing: bool = False, feature_sets=None) -> dict:
    """Join committed shard stores into ``out`` without copying features (``featcache merge``).

    ``feature_sets``: names to merge (default all). Returns ``store``, ``merged_shards``,
    ``shard_count``, ``missing`` (problems), ``bytes``, ``shard_bytes`` and per feature set
    ``feature_sets: [{feature_set, shape, counts, failures}]``."""
    from ..cache.shards import merge as run_merge

    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    return run_merge([os.fspath(s) for s in shards], os.fspath(out), allow_missing=allow_missing,
                     feature_sets=name_list(feature_sets) or None)

def bases() -> list[dict]:
    """The backbone registry (``featcache bases``).

    Returns one dict per base: ``name``, ``default_size``, ``preprocessing``, ``top_block``,
    the freeze boundary and how Keras builds it."""
    from dataclasses import asdict

    from ..extract.bases.backbones import REGISTRY

    return [{**asdict(b), "top_block": list(b.top_block)} for b in REGISTRY.values()]


# -- stage two: heads on cached features ---------------------------------------------------------
