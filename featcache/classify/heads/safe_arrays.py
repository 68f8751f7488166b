"""A fitted scikit-learn head as plain arrays: nothing featcache loads can run code.

A logistic-regression run used to keep its Pipeline as ``model.joblib``, a pickle: loading one
runs whatever it contains, and the sha256 in config.json stops a swapped file, not someone who
edits both. Now the head is its arrays in an ``.npz`` file (numpy's zip of ``.npy`` arrays),
read with ``allow_pickle=False``: a file that holds anything but plain numeric or text arrays
is refused by numpy itself. Chosen over skops (a dependency whose safe loading is a list of
trusted types to keep right) and safetensors (no text arrays for the estimator's name): the
head is a handful of arrays, and numpy already reads them safely.

The estimators are rebuilt from those arrays (StandardScaler: mean_, scale_, var_,
n_samples_seen_; LogisticRegression or, for streamed training, SGDClassifier(log_loss): coef_,
intercept_, classes_, n_iter_ and the constructor's parameters), so ``predict_proba`` is
computed by scikit-learn exactly as before, bit for bit.

Pickles written before this format load only when the user says so (``--trust-pickle``,
``trust_pickle=True``; see :func:`trusting_pickles`), and ``featcache upgrade RUN_DIR`` rewrites
them in this format.
"""
from __future__ import annotations

import contextlib
import contextvars
import json
import os

import numpy as np

from ...errors import FeatcacheError

FORMAT = 1
PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
# Whether the caller said it trusts pickled run files (the CLI's --trust-pickle, the API's
# trust_pickle=True): set for the duration of one command by trusting_pickles().
_TRUST_PICKLE = contextvars.ContextVar("featcache_trust_pickle", default=False)

_SCALER = ("mean_", "scale_", "var_", "n_samples_seen_")
_CLASSIFIER = ("coef_", "intercept_", "classes_", "n_iter_")


@contextlib.contextmanager
def trusting_pickles(trust: bool):
    """Within this block, pickled model files (written before the safe format) may be loaded."""
    token = _TRUST_PICKLE.set(bool(trust))
    try:
        yield
    finally:
        _TRUST_PICKLE.reset(token)


def is_pickle_file(path: str) -> bool:
    return os.path.basename(path).endswith(PICKLE_SUFFIXES)


def refuse_pickle(path: str, run_dir: str) -> None:
    """FeatcacheError unless the caller trusts pickles: loading one could run code."""
    if not _TRUST_PICKLE.get():
        raise FeatcacheError(
            f"{path}: a pickled model (written by an older featcache); loading it could run any code it holds. "
            f"If you trust where it came from, pass --trust-pickle (trust_pickle=True), or convert it once with "
            f"`featcache upgrade {run_dir}`")


def save_pipeline(pipeline, path: str) -> None:
    """Write a fitted Pipeline(StandardScaler, LogisticRegression | SGDClassifier) as arrays."""
    scaler, clf = pipeline[0], pipeline[-1]
    meta = {"format": FORMAT, "steps": [name for name, _ in pipeline.steps],
            "scaler": {"class": type(scaler).__name__, "params": scaler.get_params()},
            "classifier": {"class": type(clf).__name__, "params": _json_params(clf.get_params())}}
    arrays = {f"scaler.{a}": np.asarray(getattr(scaler, a)) for a in _SCALER if getattr(scaler, a, None) is not None}
    arrays.update({f"classifier.{a}": np.asarray(getattr(clf, a)) for a in _CLASSIFIER})
    tmp = path + ".tmp.npz"  # np.savez adds .npz to names without it
    np.savez(tmp, meta=np.array(json.dumps(meta, sort_keys=True)), **arrays)
    os.replace(tmp, path)


def _json_params(params: dict) -> dict:
    """Constructor parameters that JSON keeps (the estimator's own defaults stand for the rest)."""
    return {k: v for k, v in params.items() if v is None or isinstance(v, (bool, int, float, str))}


def load_pipeline(path: str):
    """The Pipeline that :func:`save_pipeline` wrote; FeatcacheError for anything else."""
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    classes = {"LogisticRegression": LogisticRegression, "SGDClassifier": SGDClassifier}
    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"][()]))
            arrays = {k: f[k] for k in f.files if k != "meta"}
    except (OSError, ValueError, KeyError) as exc:
        raise FeatcacheError(f"{path}: not a featcache head file ({exc})") from None
    if meta.get("format", 0) > FORMAT:
        raise FeatcacheError(f"{path}: head format {meta['format']} is newer than this featcache; upgrade featcache")
    if meta["scaler"]["class"] != "StandardScaler" or meta["classifier"]["class"] not in classes:
        raise FeatcacheError(f"{path}: unknown estimators {meta['scaler']['class']}, {meta['classifier']['class']}")
    scaler = StandardScaler(**meta["scaler"]["params"])
    clf = classes[meta["classifier"]["class"]](**meta["classifier"]["params"])
    for estimator, prefix in ((scaler, "scaler."), (clf, "classifier.")):
        for key, value in arrays.items():
            if key.startswith(prefix):
                setattr(estimator, key[len(prefix):], value)
    n_features = int(arrays["classifier.coef_"].shape[1])
    scaler.n_features_in_ = clf.n_features_in_ = n_features
    return Pipeline(list(zip(meta["steps"], (scaler, clf))))
