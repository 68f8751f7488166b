"""Stages two and three: heads trained, compared, searched, fine-tuned and ensembled, and their reports."""
from __future__ import annotations

import os

from ..classify.rows import DEFAULT_MEMORY_BUDGET_MB
from .options import exclude_file, given_options, name_list


def train(store: str | os.PathLike, *, out: str | os.PathLike, feature_set: str | None = None,
          feature_sets=None, base: str | None = None, head: str = "dense", pool: str | None = None, units: int | None = None,
          dropout: float | None = None, l2: float | None = None, optimizer: str | None = None,
          lr: float | None = None, epochs: int | None = None, batch_size: int | None = None,
          steps_per_execution: int | None = None, C: float | None = None, max_iter: int | None = None,
          stream_epochs: int | None = None, seed: int | None = None, standardize: bool | None = None,
          neighbors: int | None = None, metric: str | None = None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, early_stopping: int | None = None,
          checkpoint: bool = False, reduce_lr: int | None = None, csv_log: bool = False,
          tensorboard: str | None = None, no_report: bool = False, exclude: str | os.PathLike | None = None) -> dict:
    """Train one head on one feature set of ``store`` and write the run directory ``out``
    (``featcache train``) with its HTML report ``out/report.html`` (not with ``no_report``).
    Options left at None take the head's default (see the head table in docs/train-and-compare.md); an option the
    chosen head does not take raises. ``feature_sets`` (two or more names, comma-separated text
    or a list) trains one fused head on all of them instead. ``exclude``: a file of relative image
    paths to leave out (``featcache audit``'s exclude.txt); the run records them.

    Returns ``kind`` ("head" or "fused"), ``head``, ``feature_set``, ``untrained`` (the check before training), ``train`` /
    ``validation`` / ``test`` (each ``{n, accuracy, loss}``), ``overfitting``, ``streaming``,
    ``seconds``, ``cpu_seconds``, ``seconds_total``, ``run_dir`` and ``report`` (its path, or None)."""
    from ..classify.train.harness import train as run_train

    options = given_options(pool=pool, units=units, dropout=dropout, l2=l2, optimizer=optimizer, lr=lr, epochs=epochs,
                     batch_size=batch_size, steps_per_execution=steps_per_execution, C=C, max_iter=max_iter,
                     stream_epochs=stream_epochs, seed=seed, early_stopping=early_stopping, checkpoint=checkpoint,
                     reduce_lr=reduce_lr, csv_log=csv_log, tensorboard=tensorboard, standardize=standardize,
                     neighbors=neighbors, metric=metric)
    with exclude_file(exclude):
        return run_train(os.fspath(store), feature_set, base, head, os.fspath(out), memory_budget_mb,
                         report=not no_report, feature_sets=name_list(feature_sets) if feature_sets is not None else None,
                         **options)

def compare(store: str | os.PathLike, *, heads: str | list[str] = "dense,logreg", feature_sets=None,
            cv: int | None = None, pool: str | None = None, units: int | None = None, dropout: float | None = None,
            l2: float | None = None, optimizer: str | None = None, lr: float | None = None,
            epochs: int | None = None, batch_size: int | None = None, steps_per_execution: int | None = None,
            C: float | None = None, max_iter: int | None = None, stream_epochs: int | None = None,
            seed: int | None = None, standardize: bool | None = None, neighbors: int | None = None,
            metric: str | None = None, memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
            out: str | os.PathLike | None = None, no_report: bool = False,
            exclude: str | os.PathLike | None = None) -> dict:
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
    from ..classify.train.harness import compare as run_compare

    options = given_options(pool=pool, units=units, dropout=dropout, l2=l2, optimizer=optimizer, lr=lr, epochs=epochs,
                     batch_size=batch_size, steps_per_execution=steps_per_execution, C=C, max_iter=max_iter,
                     stream_epochs=stream_epochs, seed=seed, standardize=standardize, neighbors=neighbors,
                     metric=metric)
    with exclude_file(exclude):
        return run_compare(os.fspath(store), name_list(heads), name_list(feature_sets) or None, cv, memory_budget_mb,
                           out=None if out is None else os.fspath(out), report=not no_report, **options)

def search(store: str | os.PathLike, *, out: str | os.PathLike, trials: int = 30, timeout: float | None = None,
           heads: str | list[str] = "dense,logreg", feature_sets=None, cv: int | None = None, study: str | None = None,
           sampler: str = "tpe", pruner: str = "median", seed: int = 0,
           memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB, log=None, exclude: str | os.PathLike | None = None) -> dict:
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
    from ..classify.search.search import search as run_search

    with exclude_file(exclude):
        return run_search(os.fspath(store), os.fspath(out), trials=trials, timeout=timeout, heads=heads,
                          feature_sets=feature_sets, cv=cv, study=study, sampler=sampler, pruner=pruner, seed=seed,
                          memory_budget_mb=memory_budget_mb, log=log)

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
    from ..classify.train.finetune import finetune as run_finetune

    return run_finetune(None if image_dir is None else os.fspath(image_dir), os.fspath(run_dir), os.fspath(out),
                        blocks=blocks, unfreeze=unfreeze, unfreeze_from=unfreeze_from, lr=lr, epochs=epochs,
                        batch_size=batch_size, augment=augment, aug_seed=aug_seed, from_cache=from_cache,
                        weights=weights, seed=seed, report=not no_report)

def ensemble(run_dirs, *, out: str | os.PathLike, weights: str = "equal", no_report: bool = False,
             trust_pickle: bool = False, exclude: str | os.PathLike | None = None) -> dict:
    """Average the class probabilities of runs trained on the same images and write the run
    directory ``out`` (``featcache ensemble``) with its HTML report (not with ``no_report``);
    ``weights`` is "equal" or "fit" (non-negative, summing to 1, minimising the validation
    log loss).

    Returns ``kind``, ``run_dir``, ``weights_method``, ``weights``, ``members`` (each
    ``run_dir``, ``label``, ``kind``, ``weight`` and its ``train`` / ``validation`` / ``test``),
    the ensemble's ``train`` / ``validation`` / ``test`` (``{n, accuracy, loss}``), ``fit``
    (the optimiser's record, or None), ``warnings``, ``report`` (its path, or None) and
    ``seconds``. ``trust_pickle``: see :func:`upgrade`."""
    from ..classify.heads.safe_arrays import trusting_pickles
    from ..classify.train.ensemble import ensemble as run_ensemble

    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    with trusting_pickles(trust_pickle), exclude_file(exclude):
        return run_ensemble([os.fspath(d) for d in run_dirs], os.fspath(out), weights, report=not no_report)

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
    from ..classify.heads.safe_arrays import trusting_pickles
    from ..classify.report.run_page import write_report

    with trusting_pickles(trust_pickle):
        return write_report(os.fspath(run_dir), None if out is None else os.fspath(out), split, max_images, seed)
