"""Using and shipping runs: predict, export, upgrade; the demo; auditing the data."""
from __future__ import annotations

import os


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
    from ..classify.deploy.predict import predict as run_predict
    from ..classify.heads.safe_arrays import trusting_pickles

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
    from ..classify.deploy.export import export as run_export
    from ..classify.heads.safe_arrays import trusting_pickles

    with trusting_pickles(trust_pickle):
        return run_export(os.fspath(run_dir), os.fspath(out), weights, format=format, quantize=quantize,
                          calibration_images_count=calibration_images, evaluate=evaluate, head_only=head_only)

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
    from ..classify.runs.upgrade import upgrade as run_upgrade

    return run_upgrade(os.fspath(run_dir))

def demo(*, workdir: str | os.PathLike = "featcache-demo", per_class: int = 100, seed: int = 0, log=None) -> dict:
    """The whole job offline on images it draws itself (``featcache demo``); ``log`` hears each
    step.

    Returns ``workdir``, ``images``, ``store``, ``extract``, ``leaderboard``, ``best``,
    ``model``, ``plots``, ``report`` (the best run's HTML report: ``path``, ``split``, ``images``,
    ``mistakes``) and ``seconds``."""
    from ..demo_job import run_demo

    return run_demo(os.fspath(workdir), per_class, seed, log=log)

def audit(store: str | os.PathLike, *, feature_set: str | None = None, base: str | None = None,
          out: str | os.PathLike | None = None, folds: int = 5, run: str | os.PathLike | None = None,
          threshold: float | None = None, seed: int = 0) -> dict:
    """Audit one feature set of ``store`` from its cached features (``featcache audit``): label
    issues (confident learning on ``folds``-fold out-of-fold probabilities of a logistic regression,
    or of the head kind and settings of the run ``run``: dense, logreg or knn), exact and near duplicates (cosine similarity of
    the avg-pooled features >= ``threshold``; default per base family), leaks (duplicate groups
    across train and validation/test), outliers (k-nearest-neighbour distance) and per-class
    counts. With ``out``: audit.json, CSV files, exclude.txt and audit.html in that new folder.

    Returns ``feature_set``, ``rows``, ``seconds``, ``label_issues`` (path, split, given, suggested,
    score), ``duplicates`` (paths, splits, similarity, exact), ``leaks`` (paths, splits,
    similarity), ``leak_share``, ``outliers`` (path, split, score), ``per_class``,
    ``confused_pairs``, ``settings``, ``notes`` and with ``out`` the ``files``."""
    from ..auditing.job import audit as run_audit

    return run_audit(os.fspath(store), feature_set, base, None if out is None else os.fspath(out), folds,
                     None if run is None else os.fspath(run), threshold, seed)

def similar(store: str | os.PathLike, queries, *, k: int = 5, feature_set: str | None = None,
            base: str | None = None, weights: str | None = None) -> dict:
    """The ``k`` stored images most like each query (``featcache similar``): a query is a stored
    image's relative path or any image file (extracted on the fly with the feature set's own
    base and settings; ``weights`` if its weights file moved).

    Returns ``feature_set``, ``k``, ``results`` (per query: ``query``, ``stored``, ``neighbors``:
    path, split, label, similarity) and ``seconds``."""
    from ..auditing.similar import similar as run_similar

    if isinstance(queries, (str, os.PathLike)):
        queries = [queries]
    return run_similar(os.fspath(store), [os.fspath(q) for q in queries], k, feature_set, base, weights)
