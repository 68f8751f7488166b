"""The run directory: everything needed to reuse, check and reproduce a trained head.

Layout::

    config.json        head and settings, seed, feature-set key/name/digest, store path,
                       weights argument, class names, model file and its sha256
    model.keras        dense head (loaded with safe_mode=True)  | model.joblib  logreg pipeline
    metrics.json       untrained/train/validation/test metrics, flags, timings
    history.csv        one row per epoch (logreg with lbfgs: one row)
    curves.png         loss and accuracy, train vs validation (heads with >= 2 epochs)
    confusion_matrix.png
    best.keras         with --checkpoint: the best model by validation loss
    report.html        the self-contained HTML report (report_html.py; --no-report skips it)

The model file's sha256 is checked before any load: a joblib file is a pickle, and loading a
changed one would run whatever it contains. (The check guards against swapped, corrupted or
tampered model files; someone who can also edit config.json is not stopped by it: load run
directories you trust.)
"""
from __future__ import annotations

import hashlib
import json
import os
import time

import numpy as np

from .. import __version__
from ..cache.store import FeatureSet
from ..errors import FeatcacheError

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


def config_record(head, feature_set: dict, plan: dict, model_path: str) -> dict:
    return {
        "run_format": RUN_FORMAT,
        "featcache_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "head": head.name,
        "settings": head.settings(),
        "seed": head.seed,
        "training": {**plan, **head.info},
        "feature_set": feature_set,
        "model": {"file": os.path.basename(model_path), "sha256": sha256_file(model_path)},
    }


def read_config(run_dir: str) -> dict:
    path = os.path.join(run_dir, CONFIG)
    if not os.path.isfile(path):
        raise FeatcacheError(f"{run_dir}: not a run directory (no {CONFIG}; make one with `featcache train --out`)")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise FeatcacheError(f"{path}: cannot read ({exc})") from None
    if not isinstance(config, dict) or "model" not in config or "head" not in config:
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


def load_head(run_dir: str):
    """(config, head) of a run directory, the model file verified before it is loaded."""
    from .heads import make_head

    config = read_config(run_dir)
    path = verify_model(run_dir, config)
    head = make_head(config["head"], **config["settings"])
    fs = config["feature_set"]
    head.load(path, len(fs["class_names"]), tuple(fs["feature_shape"]))
    return config, head
