"""``featcache search``: hyperparameter search over the heads and feature sets of a store.

Optuna proposes a head, a feature set and the head's settings (a define-by-run, conditional
space: dense parameters only for dense trials, pooling only for spatial features); each trial
is trained by the same harness as ``compare`` on the same images and scored on the validation
split (or by K-fold cross-validation of train+validation). The objective is the validation
log loss, minimised: it is smooth where accuracy moves in steps of 1/N and ties, which both
TPE and the pruner need, and it is the loss dense trials are pruned on, epoch by epoch.

The test split is never read while searching: only the top trials are retrained (same seed)
and tested at the end, the best one as an ordinary run directory, ``DIR/best``. The study
lives in ``DIR/study.db`` (see :mod:`.study` for resuming and sharing it).
"""
from __future__ import annotations

import contextlib
import math
import os
import time

from ...cache.store import open_store
from ...cache.layout import SPLITS
from ...errors import FeatcacheError
from ..rows import training as data
from ..train import harness
from . import leaderboard
from ..runs import run_dir as rundir
from . import study as studies
from ..heads.base import POOLS
from ..heads.registry import HEADS

# The space; its defaults are sized so that 30 trials on 2,000 cached images take a few
# minutes on 2 CPU cores (docs/search.md).
SCORED = ("train", "validation")  # trials never see the test split


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search: the trial in progress is marked failed, the study is kept."""

    exit_status = 130


def _names(value, option: str) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value or [])
    items = [i.strip() for i in items if i and i.strip()]
    if len(set(items)) != len(items):
        raise FeatcacheError(f"{option} {','.join(items)}: a name is given twice")
    return items


def search(store: str, out: str, trials: int = 30, timeout: float | None = None, heads="dense,logreg",
           feature_sets=None, cv: int | None = None, study: str | None = None, sampler: str = "tpe",
           pruner="median", seed: int = 0, memory_budget_mb: float = data.DEFAULT_MEMORY_BUDGET_MB,
           log=None) -> dict:
    """Search heads x feature sets x head settings of STORE; DIR (``out``) keeps the study,
    the leaderboard, the plots and the best run. Running it again resumes the study until it
    holds ``trials`` finished (complete or pruned) trials. Returns what ``--json`` prints.

    ``pruner``: "median", "none", or an Optuna pruner; ``log``: called with progress lines."""
    started = time.perf_counter()
    log = log or (lambda text: None)
    # Sorted: the study's categorical choices must not depend on the order options were typed in.
    heads = sorted(_names(heads, "--heads"))
    names = sorted(_names(feature_sets, "--feature-sets")) if feature_sets else None
    _check_options(trials, timeout, heads, cv, sampler, pruner)
    with open_store(store) as s:
        space = _space(s, store, names, heads, cv, seed)
        out = _search_folder(out)
        settings = {"store": os.path.abspath(store), "heads": heads, "feature_sets": space["digests"], "cv": cv,
                    "sampler": sampler, "pruner": pruner if isinstance(pruner, str) else type(pruner).__name__,
                    "seed": seed, "objective": _objective_name(cv)}
        with _quiet():
            with studies.locked(out):
                st, resumed = studies.open_study(out, study, settings)
            st.pruner = studies.make_pruner(pruner)
            run = _optimize(st, space, trials, timeout, cv, sampler, seed, memory_budget_mb, out, log)
    with _quiet(), studies.locked(out):
        results = leaderboard.finish(st, out, store, cv, memory_budget_mb, log)
    return {
        "store": store, "out": out, "study": st.study_name, "storage": studies.storage_url(out), "resumed": resumed,
        "objective": _objective_name(cv),
        "sampler": {"kind": sampler, "seed": seed, "per_trial_seed": "SeedSequence([seed, trial number])"},
        "pruner": settings["pruner"], "rows": space["counts"], "rows_left_out": space["dropped"],
        "trials": {**results["counts"], "requested": trials, "ran_here": len(run["ran"]),
                   "marked_failed": run["marked_failed"]},
        "stopped": run["stopped"], **{k: v for k, v in results.items() if k != "counts"},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _check_options(trials, timeout, heads, cv, sampler, pruner) -> None:
    if trials is None or trials < 1:
        raise FeatcacheError(f"--trials {trials}: must be at least 1")
    if timeout is not None and timeout <= 0:
        raise FeatcacheError(f"--timeout {timeout:g}: must be more than 0 seconds")
    if not heads:
        raise FeatcacheError("--heads: name at least one head")
    for name in heads:
        if name not in HEADS:
            raise FeatcacheError(f"--heads: unknown head {name!r}; choose from {', '.join(HEADS)}")
    if cv is not None and cv < 2:
        raise FeatcacheError(f"--cv {cv}: needs at least 2 folds")
    if sampler not in studies.SAMPLERS:
        raise FeatcacheError(f"--sampler {sampler!r}: choose from {', '.join(studies.SAMPLERS)}")
    if isinstance(pruner, str) and pruner not in studies.PRUNERS:
        raise FeatcacheError(f"--pruner {pruner!r}: choose from {', '.join(studies.PRUNERS)}")


def _objective_name(cv: int | None) -> str:
    return f"cv{cv} loss (mean validation log loss of {cv} folds)" if cv else "validation loss (log loss)"


def _space(s, store: str, names: list[str] | None, heads: list[str], cv: int | None, seed: int) -> dict:
    """The feature sets to search and their common rows, checked before any trial runs."""
    # Named sets must be labelled; by default every labelled set (unlabeled ones cannot train).
    sets = {fs.name: fs for fs in harness.labelled_sets(s, store, names, "search")}
    names = list(sets)
    per_set, dropped = harness.common_rows(list(sets.values()), "search")
    rows = dict(zip(names, per_set))
    for name, fs in sets.items():
        harness.check_training_rows(data.Rows.of(fs, rows[name]["train"], "train"), fs.class_names, f"{store}: {name}")
        if cv:
            harness.cv_folds(fs, rows[name], cv, seed)  # refuses folds without every class
        elif len(rows[name]["validation"]) == 0:
            raise FeatcacheError(f"{store}: {name} has no validation rows; search ranks trials on the validation "
                                 "split: extract with one, or use --cv K")
    return {"sets": sets, "rows": rows, "dropped": dropped, "heads": heads, "seed": seed,
            "digests": {name: rundir.feature_set_digest(fs) for name, fs in sets.items()},
            "counts": {split: int(len(per_set[0][split])) for split in SPLITS}}


def _search_folder(out: str) -> str:
    out = os.fspath(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise FeatcacheError(f"{out}: cannot create the search folder ({exc.strerror or exc})") from None
    if not os.path.exists(os.path.join(out, studies.STUDY_FILE)):
        others = sorted(set(os.listdir(out)) - {studies.LOCK_FILE})
        if others:
            raise FeatcacheError(f"{out}: exists and holds no search ({studies.STUDY_FILE} missing, "
                                 f"other files: {', '.join(others[:3])}); choose a new --out")
    return out


@contextlib.contextmanager
def _quiet():
    """Optuna logs every trial at INFO, and TensorFlow warns that a new head per trial traces
    new functions (it must): featcache prints its own lines. Both restored afterwards."""
    import logging

    import optuna

    level, tf_logger = optuna.logging.get_verbosity(), logging.getLogger("tensorflow")
    tf_level = tf_logger.level
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tf_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)
        tf_logger.setLevel(tf_level)


def suggest(trial, space: dict) -> tuple[str, str, dict]:
    """(head, feature set, head options) of one trial: the conditional search space."""
    heads, sets = space["heads"], space["sets"]
    head = trial.suggest_categorical("head", heads) if len(heads) > 1 else heads[0]
    name = trial.suggest_categorical("feature_set", list(sets)) if len(sets) > 1 else next(iter(sets))
    options = {"seed": space["seed"]}
    if len(sets[name].feature_shape) == 3:  # (H, W, C) features: flatten them or pool them
        options["pool"] = trial.suggest_categorical("pool", POOLS)
    options.update(HEADS[head].suggest(trial))  # each head kind knows its own search space
    return head, name, options


def _pruning(trial):
    """callbacks(fold) for the harness: report each epoch's validation log loss (the objective's
    measure: without the L2 penalty), stop when the pruner says so. Folds report at their own steps (fold x most epochs + epoch), so every
    trial's fold k, epoch e is compared with the same fold and epoch of other trials."""
    import keras
    import optuna

    from ..heads import dense

    stride = dense.DENSE_EPOCHS[1]  # the most epochs of a dense trial

    class ReportValidationLoss(keras.callbacks.Callback):
        def __init__(self, fold):
            super().__init__()
            self.fold = fold

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            loss = logs.get("val_log_loss", logs.get("val_loss"))  # without the L2 penalty (heads.py)
            if loss is None:
                return
            trial.report(float(loss), (self.fold or 0) * stride + epoch)
            if trial.should_prune():
                where = f"epoch {epoch + 1}" + (f" of fold {self.fold + 1}" if self.fold is not None else "")
                raise optuna.TrialPruned(f"pruned at {where} (validation loss {float(loss):.4f})")

    return lambda fold: [ReportValidationLoss(fold)]


def _objective(trial, space: dict, cv: int | None, budget_mb: float) -> float:
    head, name, options = suggest(trial, space)
    for key, value in (("head", head), ("feature_set", name), ("options", options)):
        trial.set_user_attr(key, value)
    fs, rows = space["sets"][name], space["rows"][name]
    try:
        entry = harness.score_head(head, options, fs, rows, budget_mb, cv, scored=SCORED, views=True,
                                   callbacks=_pruning(trial) if head == "dense" else None)
    finally:
        if head == "dense":
            import keras

            keras.backend.clear_session()  # one graph per trial would pile up over a study
    trial.set_user_attr("result", entry)
    return entry["cv"]["loss_mean"] if cv else entry["validation"]["loss"]


def _optimize(st, space, trials, timeout, cv, sampler, seed, budget_mb, out, log) -> dict:
    """Optuna's ask-and-tell loop; trials start under the folder's lock (see :mod:`.study`)."""
    import optuna
    from optuna.trial import TrialState

    started = time.monotonic()
    worker = studies.worker_record()
    ran, marked_failed = [], []
    while True:
        if timeout is not None and time.monotonic() - started >= timeout:
            stopped = "timeout"
            break
        with studies.locked(out):
            marked_failed += studies.fail_dead_trials(st)
            finished, running = studies.count(st)
            if finished + running >= trials:
                stopped = "trials"
                break
            # Trials are numbered in the order they are created; under the lock that is now.
            number = len(st.get_trials(deepcopy=False))
            st.sampler = studies.make_sampler(sampler, seed, number)
            trial = st.ask()
            trial.set_user_attr("worker", worker)
        try:
            value = _objective(trial, space, cv, budget_mb)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned", str(exc))
            st.tell(trial, state=TrialState.PRUNED)
        except KeyboardInterrupt:
            trial.set_user_attr("error", "interrupted (Ctrl-C)")
            st.tell(trial, state=TrialState.FAIL)
            done, _ = studies.count(st)
            raise SearchInterrupted(f"interrupted: {done} of {trials} trials finished in "
                                    f"{os.path.join(out, studies.STUDY_FILE)}; run the same command again to resume") from None
        except BaseException as exc:
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            st.tell(trial, state=TrialState.FAIL)
            raise
        else:
            if math.isfinite(value):
                st.tell(trial, value)
            else:  # a diverged head: the study goes on without it
                trial.set_user_attr("error", f"validation loss is {value} (diverged)")
                st.tell(trial, state=TrialState.FAIL)
        ran.append(trial.number)
        log(leaderboard.trial_line(st.get_trials(deepcopy=False)[trial.number], studies.count(st)[0], trials))
    return {"ran": ran, "stopped": stopped, "marked_failed": marked_failed}
