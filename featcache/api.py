"""featcache's Python API: one function per command.

Each function takes the command's options as keyword arguments, with the same names (dashes
become underscores) and the same defaults as the command line, and returns the dict that the
command's ``--json`` prints. Errors raise :class:`featcache.FeatcacheError`, whose message is the
one line the command prints after ``error:``. Options that only shape the command's own output
(``--json``, ``--no-progress`` as ``progress``, ``--strict``'s exit status) are the CLI's.

Usage::

    import featcache
    result = featcache.extract_features("images/", "features.h5", base="mobilenet_0.25", weights="bundled")
    run = featcache.train("features.h5", out="runs/dense", head="dense", pool="avg")

The heavy stages (TensorFlow, scikit-learn) are imported inside the functions, so importing
this module is instant.
"""
from __future__ import annotations

import os

from .errors import FeatcacheError
from .classify.rows import DEFAULT_MEMORY_BUDGET_MB
from .extract import defaults as EXTRACT

__all__ = ["extract_features", "info", "verify", "repair", "merge", "bases", "train", "compare", "search", "report",
           "predict", "export", "finetune", "ensemble", "upgrade", "demo", "FeatcacheError"]



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
    from .extract.pipeline import ExtractConfig, extract as run_extract
    from .extract.scale.sharding import check_scale_options, parse_shard

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
        from .extract.scale.ray_runner import run_ray

        return run_ray(image_dir, store, config, shards, ray or None, gpus_per_worker or 0, cpus_per_worker or 1,
                       log=log)
    if shard_text is not None:
        from .extract.scale.sharding import run_shard

        return run_shard(image_dir, store, config, parse_shard(shard_text))
    return run_extract(image_dir, store, config)


def info(store: str | os.PathLike) -> dict:
    """What a store holds (``featcache info``).

    Returns ``{"store": path, "feature_sets": [summary, ...]}``; each summary has
    ``feature_set``, ``key`` (every cache-key field), ``shape``, ``dtype``, ``rows_stored``,
    ``rows_active``, ``labelled``, ``class_names``, ``counts`` (split -> class -> images), ``failures``,
    ``seed`` and ``checksums`` (False: written before featcache stored checksums, "unchecked").
    A damaged store raises StoreDamaged (a FeatcacheError) naming what is damaged."""
    from .cache.store import open_store

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
    from .cache.integrity.verify import verify as run_verify

    return run_verify(os.fspath(store))


def repair(store: str | os.PathLike) -> dict:
    """Rewrite a damaged ``store`` with every row that can still be read (``featcache repair``);
    the damaged file is kept beside it as ``STORE.damaged-<time>``. The next extraction of the
    same folder recomputes the rows left out.

    Returns ``store``, ``repaired`` (False: nothing was damaged, nothing done), ``damaged_copy``,
    ``feature_sets`` (what verify found), ``kept: [{feature_set, rows, rows_kept, rows_lost,
    rows_set_aside, lost}]``, ``nothing_recovered``, ``shard_records_withdrawn`` and ``seconds``."""
    from .cache.integrity.repair import repair as run_repair

    return run_repair(os.fspath(store))


def merge(shards, out: str | os.PathLike, *, allow_missing: bool = False, feature_sets=None) -> dict:
    """Join committed shard stores into ``out`` without copying features (``featcache merge``).

    ``feature_sets``: names to merge (default all). Returns ``store``, ``merged_shards``,
    ``shard_count``, ``missing`` (problems), ``bytes``, ``shard_bytes`` and per feature set
    ``feature_sets: [{feature_set, shape, counts, failures}]``."""
    from .cache.shards import merge as run_merge

    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    return run_merge([os.fspath(s) for s in shards], os.fspath(out), allow_missing=allow_missing,
                     feature_sets=_names(feature_sets) or None)


def bases() -> list[dict]:
    """The backbone registry (``featcache bases``).

    Returns one dict per base: ``name``, ``default_size``, ``preprocessing``, ``top_block``,
    the freeze boundary and how Keras builds it."""
    from dataclasses import asdict

    from .extract.bases.backbones import REGISTRY

    return [{**asdict(b), "top_block": list(b.top_block)} for b in REGISTRY.values()]


# -- stage two: heads on cached features ---------------------------------------------------------


def train(store: str | os.PathLike, *, out: str | os.PathLike, feature_set: str | None = None,
          feature_sets=None, base: str | None = None, head: str = "dense", pool: str | None = None, units: int | None = None,
          dropout: float | None = None, l2: float | None = None, optimizer: str | None = None,
          lr: float | None = None, epochs: int | None = None, batch_size: int | None = None,
          steps_per_execution: int | None = None, C: float | None = None, max_iter: int | None = None,
          stream_epochs: int | None = None, seed: int | None = None, standardize: bool | None = None,
          memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, early_stopping: int | None = None,
          checkpoint: bool = False, reduce_lr: int | None = None, csv_log: bool = False,
          tensorboard: str | None = None, no_report: bool = False) -> dict:
    """Train one head on one feature set of ``store`` and write the run directory ``out``
    (``featcache train``) with its HTML report ``out/report.html`` (not with ``no_report``).
    Options left at None take the head's default (see the head table in docs/train-and-compare.md); an option the
    chosen head does not take raises. ``feature_sets`` (two or more names, comma-separated text
    or a list) trains one fused head on all of them instead.

    Returns ``kind`` ("head" or "fused"), ``head``, ``feature_set``, ``untrained`` (the check before training), ``train`` /
    ``validation`` / ``test`` (each ``{n, accuracy, loss}``), ``overfitting``, ``streaming``,
    ``seconds``, ``cpu_seconds``, ``seconds_total``, ``run_dir`` and ``report`` (its path, or None)."""
    from .classify.train.harness import train as run_train

    options = _given(pool=pool, units=units, dropout=dropout, l2=l2, optimizer=optimizer, lr=lr, epochs=epochs,
                     batch_size=batch_size, steps_per_execution=steps_per_execution, C=C, max_iter=max_iter,
                     stream_epochs=stream_epochs, seed=seed, early_stopping=early_stopping, checkpoint=checkpoint,
                     reduce_lr=reduce_lr, csv_log=csv_log, tensorboard=tensorboard, standardize=standardize)
    return run_train(os.fspath(store), feature_set, base, head, os.fspath(out), memory_budget_mb,
                     report=not no_report, feature_sets=_names(feature_sets) if feature_sets is not None else None,
                     **options)


def compare(store: str | os.PathLike, *, heads: str | list[str] = "dense,logreg", feature_sets=None,
            cv: int | None = None, pool: str | None = None, units: int | None = None, dropout: float | None = None,
            l2: float | None = None, optimizer: str | None = None, lr: float | None = None,
            epochs: int | None = None, batch_size: int | None = None, steps_per_execution: int | None = None,
            C: float | None = None, max_iter: int | None = None, stream_epochs: int | None = None,
            seed: int | None = None, standardize: bool | None = None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
            out: str | os.PathLike | None = None, no_report: bool = False) -> dict:
    """A leaderboard of heads x feature sets on the same images and metrics (``featcache compare``).

    ``heads`` and ``feature_sets``: comma-separated text or lists (feature sets default to all in
    the store). Ranked by validation accuracy; the test split is reported, never used to rank.
    With ``cv=K``: K-fold cross-validation on train+validation. ``out``: a new folder keeping
    each entry as a run directory ``HEAD-FEATURE_SET`` (not with ``cv``), ``leaderboard.json``
    and (not with ``no_report``) each run's report.html and ``leaderboard.html`` linking them.

    Returns ``store``, ``cv``, ``rows`` (images per split), ``rows_left_out`` and ``leaderboard``:
    entries with ``rank``, ``head``, ``feature_set``, ``settings``, ``validation``/``test``/``train``
    (``{n, accuracy, loss}``) or ``cv`` (means, stds, folds), ``seconds``; with ``out`` also
    ``out``, ``leaderboard_html`` and per entry ``run_dir`` and ``report``."""
    from .classify.train.harness import compare as run_compare

    options = _given(pool=pool, units=units, dropout=dropout, l2=l2, optimizer=optimizer, lr=lr, epochs=epochs,
                     batch_size=batch_size, steps_per_execution=steps_per_execution, C=C, max_iter=max_iter,
                     stream_epochs=stream_epochs, seed=seed, standardize=standardize)
    return run_compare(os.fspath(store), _names(heads), _names(feature_sets) or None, cv, memory_budget_mb,
                       out=None if out is None else os.fspath(out), report=not no_report, **options)


def report(run_dir: str | os.PathLike, *, out: str | os.PathLike | None = None, split: str | None = None,
           max_images: int = 100, seed: int = 0, trust_pickle: bool = False) -> dict:
    """Write one self-contained HTML page of a run (``featcache report``): its facts, metrics,
    curves, confusion matrix, per-class scores, the images of ``split`` it gets wrong (at most
    ``max_images`` thumbnails), its most confident right answers and a map of the features
    (PCA then t-SNE, seeded by ``seed``). ``out`` defaults to ``run_dir/report.html``.

    Returns ``report`` (the path), ``run_dir``, ``head``, ``feature_set``, ``split``, ``images``,
    ``per_image``, ``mistakes``, ``mistake_thumbnails``, ``right_thumbnails``, ``map_points``,
    ``map_method``, ``notes`` (what could not be shown, and why), ``bytes``, ``stage_seconds``
    and ``seconds``. ``trust_pickle``: see :func:`upgrade`."""
    from .classify.heads.safe_arrays import trusting_pickles
    from .classify.report.run_page import write_report

    with trusting_pickles(trust_pickle):
        return write_report(os.fspath(run_dir), None if out is None else os.fspath(out), split, max_images, seed)


def search(store: str | os.PathLike, *, out: str | os.PathLike, trials: int = 30, timeout: float | None = None,
           heads: str | list[str] = "dense,logreg", feature_sets=None, cv: int | None = None, study: str | None = None,
           sampler: str = "tpe", pruner: str = "median", seed: int = 0,
           memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, log=None) -> dict:
    """Hyperparameter search with Optuna over heads x feature sets x head settings of ``store``
    (``featcache search``). ``out`` keeps the study (``study.db``), the leaderboard, the plots and
    the best trial retrained as the run directory ``out/best``; calling it again resumes the
    study until it holds ``trials`` finished trials. Trials are ranked on validation loss (or
    ``cv`` folds); only the top 3 are tested. ``pruner`` may also be an Optuna pruner object;
    ``log`` hears one line per trial.

    Returns ``store``, ``out``, ``study``, ``storage``, ``resumed``, ``objective``, ``sampler``,
    ``pruner``, ``rows``, ``trials`` (counts: complete, pruned, fail, running, finished,
    requested, ran_here, marked_failed), ``stopped``, ``best`` (trial, head, feature_set,
    params, loss, accuracy, retrained, test, run_dir; None before a trial completes),
    ``leaderboard``, ``files``, ``notes`` and ``seconds``."""
    from .classify.search.search import search as run_search

    return run_search(os.fspath(store), os.fspath(out), trials=trials, timeout=timeout, heads=heads,
                      feature_sets=feature_sets, cv=cv, study=study, sampler=sampler, pruner=pruner, seed=seed,
                      memory_budget_mb=memory_budget_mb, log=log)


def predict(run_dir: str | os.PathLike, images=(), *, top_k: int = 1, weights: str | None = None,
            batch_size: int = 32, features: str | os.PathLike | None = None, trust_pickle: bool = False) -> dict:
    """Classify image files or folders with the base and head of ``run_dir`` (``featcache predict``);
    any kind of run: a head, a fused head, a fine-tuned model or an ensemble. ``run_dir`` may
    also be an exported model (.tflite, .keras, SavedModel folder) with its card.

    Returns ``run_dir``, ``kind``, ``head``, ``model`` (a description), ``feature_set``,
    ``class_names``, ``predictions`` (per image: ``path``, ``predicted``, ``probability``,
    ``top``: [{class, probability}]) and ``failures``. ``features=STORE`` runs a head-only
    export (``export(..., head_only=True)``) over the store's rows instead of images (each
    prediction also has its ``split``). ``trust_pickle``: see :func:`upgrade`."""
    from .classify.deploy.predict import predict as run_predict
    from .classify.heads.safe_arrays import trusting_pickles

    if isinstance(images, (str, os.PathLike)):
        images = [images]
    with trusting_pickles(trust_pickle):
        return run_predict(os.fspath(run_dir), [os.fspath(i) for i in images], top_k, weights, batch_size,
                           None if features is None else os.fspath(features))


def export(run_dir: str | os.PathLike, out: str | os.PathLike, *, format: str | None = None, quantize: str = "none",
           calibration_images: int = 300, evaluate: bool = True, weights: str | None = None,
           head_only: bool = False, trust_pickle: bool = False) -> dict:
    """Write preprocessing + bases + heads of ``run_dir`` (any kind of run; every base of a fused
    head or ensemble once) as a deployable model ``out`` (``featcache export``): a .keras file,
    a TensorFlow Lite file (``quantize`` none, float16 or int8, calibrated on
    ``calibration_images`` training images) or a SavedModel folder; the format comes from
    ``format`` or ``out``'s name. Labels and a model card are written beside
    it; ``evaluate=False`` (``--no-evaluate``) skips running the exported file over the run's
    test images. ``head_only``: the head alone (.keras or .onnx), taking the cached features of
    the run's feature set(s) as input; its card names the feature set and key, and its test
    accuracy is measured on the run's cached test rows.

    Returns ``run_dir``, ``out``, ``kind``, ``format``, ``quantize``, ``input_shape``,
    ``input_dtype``, ``input``, ``inputs`` (``name``, ``shape``, ``values`` of each image input:
    one per distinct size, .keras only), ``class_names``, ``parameters``, ``bytes``, ``sha256``,
    ``labels``, ``card``, ``signatures``, ``calibration``, ``run_test_accuracy``,
    ``exported_test``, ``warnings`` and ``seconds``. ``trust_pickle``: see :func:`upgrade`."""
    from .classify.deploy.export import export as run_export
    from .classify.heads.safe_arrays import trusting_pickles

    with trusting_pickles(trust_pickle):
        return run_export(os.fspath(run_dir), os.fspath(out), weights, format=format, quantize=quantize,
                          calibration_images_count=calibration_images, evaluate=evaluate, head_only=head_only)


def finetune(run_dir: str | os.PathLike, *, out: str | os.PathLike, image_dir: str | os.PathLike | None = None,
             unfreeze: str = "top", unfreeze_from: str | None = None, blocks: int = 1, lr: float = 1e-5,
             epochs: int = 5, batch_size: int = 20, augment: str | None = None, aug_seed: int = 0,
             from_cache: str | None = None, weights: str | None = None, seed: int = 0, no_report: bool = False) -> dict:
    """Train the dense head of a stage-two run together with none, part or all of its base
    (``featcache finetune``): ``unfreeze`` is "none", "top" (the registry's top block),
    "from:LAYER" or "all" (``unfreeze_from=LAYER`` is the older spelling of "from:LAYER").
    ``image_dir`` defaults to the folder recorded in the run, and ``from_cache`` trains from
    cached boundary activations instead of images. Writes the run directory ``out`` with its
    HTML report (not with ``no_report``).

    Returns ``feature_set``, ``unfreeze``, ``source``, ``trainable_layers``,
    ``trainable_parameters``, ``before`` and ``train`` / ``validation`` / ``test`` metrics,
    ``epochs``, ``epoch_seconds``, ``seconds``, ``run_dir`` and ``report``."""
    from .classify.train.finetune import finetune as run_finetune

    return run_finetune(None if image_dir is None else os.fspath(image_dir), os.fspath(run_dir), os.fspath(out),
                        blocks=blocks, unfreeze=unfreeze, unfreeze_from=unfreeze_from, lr=lr, epochs=epochs,
                        batch_size=batch_size, augment=augment, aug_seed=aug_seed, from_cache=from_cache,
                        weights=weights, seed=seed, report=not no_report)


def ensemble(run_dirs, *, out: str | os.PathLike, weights: str = "equal", no_report: bool = False,
             trust_pickle: bool = False) -> dict:
    """Average the class probabilities of runs trained on the same images and write the run
    directory ``out`` (``featcache ensemble``) with its HTML report (not with ``no_report``);
    ``weights`` is "equal" or "fit" (non-negative, summing to 1, minimising the validation
    log loss).

    Returns ``kind``, ``run_dir``, ``weights_method``, ``weights``, ``members`` (each
    ``run_dir``, ``label``, ``kind``, ``weight`` and its ``train`` / ``validation`` / ``test``),
    the ensemble's ``train`` / ``validation`` / ``test`` (``{n, accuracy, loss}``), ``fit``
    (the optimiser's record, or None), ``warnings``, ``report`` (its path, or None) and
    ``seconds``. ``trust_pickle``: see :func:`upgrade`."""
    from .classify.heads.safe_arrays import trusting_pickles
    from .classify.train.ensemble import ensemble as run_ensemble

    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    with trusting_pickles(trust_pickle):
        return run_ensemble([os.fspath(d) for d in run_dirs], os.fspath(out), weights, report=not no_report)


def upgrade(run_dir: str | os.PathLike) -> dict:
    """Rewrite a run directory written before the safe head format (``featcache upgrade``): its
    pickled ``model.joblib`` is loaded once (the caller vouches for it by calling this) and
    written as ``model.npz`` (arrays, read with ``allow_pickle=False``); config.json then names
    the new file and its sha256 and the pickle is removed. The test split (or, without the store,
    a seeded sample of feature rows) is predicted before and after, and must agree exactly.

    Commands that load runs refuse pickled model files unless given ``trust_pickle=True``
    (``--trust-pickle``): loading a pickle can run any code it holds.

    Returns ``run_dir``, ``upgraded`` (False when there was nothing to do), ``from``, ``to``,
    ``checked_on`` (what was predicted twice), ``rows``, ``max_abs_difference`` and ``seconds``."""
    from .classify.runs.upgrade import upgrade as run_upgrade

    return run_upgrade(os.fspath(run_dir))


def demo(*, workdir: str | os.PathLike = "featcache-demo", per_class: int = 100, seed: int = 0, log=None) -> dict:
    """The whole job offline on images it draws itself (``featcache demo``); ``log`` hears each
    step.

    Returns ``workdir``, ``images``, ``store``, ``extract``, ``leaderboard``, ``best``,
    ``model``, ``plots``, ``report`` (the best run's HTML report: ``path``, ``split``, ``images``,
    ``mistakes``) and ``seconds``."""
    from .demo_job import run_demo

    return run_demo(os.fspath(workdir), per_class, seed, log=log)


def _names(value) -> list[str]:
    """Comma-separated text or a list of names."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [item.strip() for item in items if item and item.strip()]


# Options whose False is a choice (--no-standardize), not a flag left off.
_SWITCHES = ("standardize",)


def _given(**options) -> dict:
    """The options that were set: None (the head's default) and False (a flag off) are dropped."""
    return {k: v for k, v in options.items() if v is not None and (v is not False or k in _SWITCHES)}
