"""The run directory: everything needed to reuse, check and reproduce a trained head.

Layout::

    config.json        kind, head and settings, seed, feature-set key/name/digest, store path,
                       weights argument, class names, model file and its sha256
    model.keras        dense head (loaded with safe_mode=True)  | model.npz  logreg head as arrays
    metrics.json       untrained/train/validation/test metrics, flags, timings
    history.csv        one row per epoch (logreg with lbfgs: one row)
    curves.png         loss and accuracy, train vs validation (heads with >= 2 epochs)
    confusion_matrix.png
    best.keras         with --checkpoint: the best model by validation loss
    report.html        the self-contained HTML report (report/run_page.py; --no-report skips it)

All but the report are written by :func:`write_run`, for every kind.

Kinds of run (``config["kind"]``; runs written before kinds existed have none, see
:func:`run_kind`): ``head`` (one head on one feature set: ``feature_set``), ``fused`` (one head
on several feature sets of the same images: ``feature_sets``), ``finetune`` (an end-to-end
model: ``feature_set`` is the stage-two set whose images and splits it used) and ``ensemble``
(weighted members, no model file of its own; see ensemble.py). Every kind has
``metrics.json`` with per-split metrics; :mod:`.runs` loads any kind.

The model file's sha256 is checked before any load (swapped or corrupted files are refused). No
file featcache loads from a run can run code: ``.keras`` files load in Keras' safe mode and
scikit-learn heads are arrays read with ``allow_pickle=False`` (heads/safe_arrays.py). A
``model.joblib`` (a pickle, from before that format) loads only when the user trusts it
(``--trust-pickle``); ``featcache upgrade`` rewrites it (runs/upgrade.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from ...version import __version__
from ...cache.store import FeatureSet
from ...errors import FeatcacheError

CONFIG, METRICS, HISTORY = "config.json", "metrics.json", "history.csv"
CURVES, CONFUSION = "curves.png", "confusion_matrix.png"
RUN_FORMAT = 1


def prepare(out: str) -> str:
    """Create the run directory; runs are never overwritten."""
    out = os.fspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FeatcacheError(f"{out}: exists and is not an empty folder; choose a new --out (runs are never overwritten)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise FeatcacheError(f"{out}: cannot create the run folder ({exc.strerror})") from None
    return out


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def feature_set_digest(fs: FeatureSet) -> str:
    """sha256 of what the head was trained on: the key, the class names and each active row's
    (image digest, label, split). Cheap (no feature bytes read) and sufficient: the key plus an
    image's digest determine its features, which is the cache's own invariant; hashing a large
    store file would take minutes and change with every unrelated feature set added to it."""
    rows = fs.rows()
    lines = sorted(f"{d} {label} {s}" for d, label, s in
                   zip(fs.column("digests")[rows], fs.column("labels")[rows], fs.column("splits")[rows]))
    head = json.dumps({"key": fs.spec.to_dict(), "class_names": fs.class_names}, sort_keys=True)
    return hashlib.sha256("\n".join([head, *lines]).encode()).hexdigest()


def feature_set_record(fs: FeatureSet, store_path: str) -> dict:
    attrs = fs.attrs
    return {
        "name": fs.name,
        "key": fs.spec.to_dict(),
        "digest": feature_set_digest(fs),
        "class_names": fs.class_names,
        "feature_shape": list(fs.feature_shape),
        "store": os.path.abspath(store_path),
        "image_root": str(attrs.get("image_root", "")),
        # The key holds the weights' hash only; predict/export need the argument that built the base.
        "weights_arg": str(attrs["weights_arg"]) if "weights_arg" in attrs else None,
        "rows": {split: int(len(fs.rows(split))) for split in ("train", "validation", "test")},
    }


def _default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_default)
        f.write("\n")
    os.replace(tmp, path)


def created() -> dict:
    return {"run_format": RUN_FORMAT, "featcache_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_run(out: str, config: dict, metrics: dict, history: dict, title: str | None = None,
              confusion_title: str = "{title}, {split} split", model_path: str | None = None) -> None:
    """The one writer of a run directory, for every kind: config.json (with :func:`created`, and
    the model file's name and sha256 when there is one), metrics.json, history.csv, and with a
    ``title`` curves.png and the confusion matrix of the test split (validation when test is
    empty), titled ``confusion_title``."""
    from ..evaluation import plot_confusion, plot_curves, write_history

    from ...cache.exclude import excluded_paths

    config = {**created(), **config}
    if excluded_paths():  # --exclude: the rows left out, so reports and ensembles leave them out too
        config["excluded"] = {"paths": sorted(excluded_paths()), "count": len(excluded_paths())}
    if model_path:
        config["model"] = {"file": os.path.basename(model_path), "sha256": sha256_file(model_path),
                           **config.get("model", {})}
    write_json(os.path.join(out, CONFIG), config)
    write_json(os.path.join(out, METRICS), metrics)
    write_history(history, os.path.join(out, HISTORY))
    if title is None:
        return
    plot_curves(history, os.path.join(out, CURVES), title)
    shown = "test" if metrics.get("test", {}).get("n") else "validation"
    if metrics.get(shown, {}).get("n"):
        plot_confusion(metrics[shown]["confusion_matrix"], class_names(config), os.path.join(out, CONFUSION),
                       confusion_title.format(title=title, split=shown))


def head_config(head, feature_set: dict | list[dict], plan: dict) -> dict:
    """config.json of a head run (without the model entry, see :func:`write_run`): one
    feature-set record, or a list of them (a fused head)."""
    fused = isinstance(feature_set, list)
    return {
        "kind": "fused" if fused else "head",
        "head": head.name,
        "settings": head.settings(),
        "seed": head.seed,
        "training": {**plan, **head.info},
        **({"feature_sets": feature_set, "class_names": feature_set[0]["class_names"]} if fused
           else {"feature_set": feature_set}),
    }


def run_kind(config: dict) -> str:
    """head, fused, finetune or ensemble (runs written before kinds were recorded: from the head)."""
    return config.get("kind") or ("finetune" if config.get("head") == "finetune" else "head")


def feature_records(config: dict) -> list[dict]:
    """The feature-set records of a run: the one it was trained on, or every one (fused heads,
    ensembles: each distinct set of the members)."""
    return config["feature_sets"] if "feature_sets" in config else [config["feature_set"]]


def excluded(config: dict) -> list[str]:
    """The relative paths a run was trained without (``--exclude``)."""
    return list((config.get("excluded") or {}).get("paths", []))


def class_names(config: dict) -> list[str]:
    return config.get("class_names") or feature_records(config)[0]["class_names"]


def read_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise FeatcacheError(f"{run_dir}: not a run directory (no {CONFIG}; make one with `featcache train --out`)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise FeatcacheError(f"{path}: cannot read ({exc})") from None
    if not isinstance(config, dict) or "head" not in config or (
            "model" not in config and run_kind(config) != "ensemble"):
        raise FeatcacheError(f"{path}: not a featcache run config (no head/model entries)")
    if int(config.get("run_format", 0)) > RUN_FORMAT:
        raise FeatcacheError(f"{path}: run format {config['run_format']} is newer than this featcache; upgrade it")
    return config


def verify_model(run_dir: str, config: dict) -> str:
    """The model file's path, after checking its sha256 against config.json. Refuses otherwise."""
    name = os.path.basename(config["model"]["file"])
    path = os.path.join(run_dir, name)
    if not os.path.isfile(path):
        raise FeatcacheError(f"{path}: model file missing")
    actual, expected = sha256_file(path), config["model"].get("sha256")
    if actual != expected:
        raise FeatcacheError(
            f"{path}: sha256 {actual} does not match {expected} recorded in {CONFIG}; "
            "refusing to load a changed model file (it may have been tampered with)")
    return path


def load_head(run_dir: str, config: dict | None = None):
    """(config, head) of a head or fused run, the model file verified before it is loaded."""
    from ..heads.registry import make_head

    config = config or read_config(run_dir)
    kind = run_kind(config)
    if kind not in ("head", "fused"):
        raise FeatcacheError(f"{run_dir}: a {kind} run, not a head trained on cached features")
    path = verify_model(run_dir, config)
    head = make_head(config["head"], **config["settings"])
    records = feature_records(config)
    shapes = [tuple(r["feature_shape"]) for r in records]
    head.load(path, len(class_names(config)), tuple(shapes) if kind == "fused" else shapes[0])
    return config, head
