"""The Optuna study behind ``featcache search``: one SQLite file in the search folder.

The file is the search's state: a stopped search (Ctrl-C, ``kill -9``, a reboot) resumes by
running the same command, and several processes on one machine can work on it at once.
What makes that exact:

- Trials are started under a file lock (``search.lock``), after counting the finished
  trials (complete or pruned) and the running ones of live processes: the study ends with
  exactly ``--trials`` finished trials, however many processes share it.
- Each trial records its worker (host, pid, process start time). A trial left RUNNING by a
  process that is gone (``kill -9``) is marked FAIL by the next process that looks, so it is
  never counted as done and never blocks a resume; the check needs no timeout (Optuna's
  heartbeats would wait out a grace period) because the pid answers at once.
- The sampler is seeded per trial from (seed, trial number): a fresh search is reproducible,
  a resumed one continues instead of replaying its first proposals, and two processes never
  draw the same random start-up trials.

Optuna is imported only here and in :mod:`.search` (``featcache --help`` stays instant).
"""
from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import warnings

import numpy as np

from ...errors import FeatcacheError

STUDY_FILE = "study.db"
LOCK_FILE = "search.lock"
DEFAULT_STUDY = "search"
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "none")
# MedianPruner: prune a dense trial whose validation loss at an epoch is worse than the median
# of earlier trials at that epoch, once 5 trials have reported and after 3 epochs of warm-up
# (a low learning rate starts slowly and catches up).
MEDIAN_STARTUP_TRIALS, MEDIAN_WARMUP_EPOCHS = 5, 3
SQLITE_BUSY_SECONDS = 60  # processes sharing the file wait this long for its write lock
# Settings that define a study: resuming with other values would mix incomparable trials.
DEFINING = ("heads", "feature_sets", "cv", "sampler", "pruner", "seed")


def storage_url(out: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(out, STUDY_FILE))


@contextlib.contextmanager
def locked(out: str):
    """The search folder's lock: trial starts, stale-trial checks and writing the results."""
    import filelock

    with filelock.FileLock(os.path.join(out, LOCK_FILE)):
        yield


def check_database(path: str) -> bool:
    """True if ``path`` is an Optuna study database, False if it does not exist yet (or is
    empty); otherwise a FeatcacheError: never let Optuna create its tables in another file."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return False
    with open(path, "rb") as f:
        header = f.read(16)
    if header != b"SQLite format 3\x00":
        raise FeatcacheError(f"{path}: not an Optuna study database (not an SQLite file); "
                             "move it away or choose another --out")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise FeatcacheError(f"{path}: not an Optuna study database ({exc})") from None
    if not {"studies", "trials", "version_info"} <= tables:
        raise FeatcacheError(f"{path}: not an Optuna study database (an SQLite file without Optuna's tables); "
                             "move it away or choose another --out")
    return True


def open_study(out: str, name: str | None, settings: dict):
    """(study, resumed). Creates DIR/study.db and the study, or loads the one there after
    checking that it was made with the same defining settings."""
    import optuna

    path = os.path.join(out, STUDY_FILE)
    existed = check_database(path)
    try:
        storage = optuna.storages.RDBStorage(
            storage_url(out), engine_kwargs={"connect_args": {"timeout": SQLITE_BUSY_SECONDS}})
    except RuntimeError as exc:  # e.g. a study made by an Optuna with another schema version
        raise FeatcacheError(f"{path}: {exc}") from None
    names = [s.study_name for s in storage.get_all_studies()]
    if existed and names:
        if name is None:
            if len(names) > 1:
                raise FeatcacheError(f"{path}: holds {len(names)} studies ({', '.join(names)}); name one with --study")
            name = names[0]
        elif name not in names:
            raise FeatcacheError(f"{path}: no study named {name!r} (it holds: {', '.join(names)}); "
                                 "resume it with that --study, or choose a new --out for a new study")
    name = name or DEFAULT_STUDY
    resumed = name in names
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True)
    recorded = study.user_attrs.get("settings")
    if recorded is None:
        study.set_user_attr("settings", settings)
    else:
        changed = [k for k in DEFINING if recorded.get(k) != settings.get(k)]
        if changed:
            detail = "; ".join(f"{k}: study {_show(recorded.get(k))}, now {_show(settings.get(k))}" for k in changed)
            raise FeatcacheError(f"{path}: study {name!r} was started with other settings ({detail}); "
                                 "resume with the same options, or choose a new --out")
    return study, resumed


def _show(value) -> str:
    if isinstance(value, dict):  # feature sets: name -> digest of the images they hold
        return ",".join(f"{k}@{str(v)[:8]}" for k, v in value.items())
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def make_sampler(kind: str, seed: int, number: int):
    """The sampler for trial ``number``: seeded from (seed, number), see the module doc."""
    import optuna

    trial_seed = int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, number]).generate_state(1)[0])
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=trial_seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # group: the conditional space (dense and logreg parameters) is modelled per group of
        # parameters that occur together, not as independent one-dimensional densities.
        return optuna.samplers.TPESampler(seed=trial_seed, multivariate=True, group=True)


def make_pruner(pruner):
    """"median", "none", or an Optuna pruner object (Python callers, tests)."""
    import optuna

    if not isinstance(pruner, str):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=MEDIAN_WARMUP_EPOCHS)
    return optuna.pruners.NopPruner()


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited


def worker_record() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def worker_alive(worker: dict | None) -> bool | None:
    """Is the process that runs a trial still there? None: another machine, cannot tell."""
    if not worker:
        return False  # trials are started and stamped under the lock: no stamp = died in between
    if worker.get("host") != socket.gethostname():
        return None
    pid = int(worker["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: alive
    start = _start_time(pid)
    if os.path.exists(f"/proc/{pid}"):
        return start is not None and (worker.get("start") is None or start == worker["start"])
    return True


def fail_dead_trials(study) -> list[int]:
    """Mark FAIL the RUNNING trials whose process is gone; their numbers. Call under the lock."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if worker_alive(worker) is not False:
            continue
        try:  # the reason, for the leaderboard (no public call sets another trial's attributes)
            study._storage.set_trial_user_attr(trial._trial_id, "error", "its process ended while it ran (killed?)")
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished meanwhile
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        failed.append(trial.number)
    return failed


def count(study) -> tuple[int, int]:
    """(finished: complete or pruned, running in live processes of this machine)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
    finished = sum(t.state != TrialState.RUNNING for t in trials)
    running = sum(t.state == TrialState.RUNNING and worker_alive(t.user_attrs.get("worker")) is True for t in trials)
    return finished, running
