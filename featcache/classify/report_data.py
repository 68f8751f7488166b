"""What a run's report needs from the run directory, its store and its images.

Everything per image goes through one function, :func:`split_probabilities` (paths, labels and
class probabilities of one split of any run directory), so a new kind of run is reported by
teaching that one function how to predict it. Anything that cannot be had (a store that moved,
images that are gone, a changed model file) raises FeatcacheError with the reason; the report
then shows what the run directory itself holds and says why the rest is missing.
"""
from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import FeatcacheError
from . import rundir

SPLITS = ("train", "validation", "test")
# The map reads the split's features whole; past this many float32 bytes it reads a seeded sample.
MAP_MAX_BYTES = 1 << 30
MAP_MAX_POINTS = 10_000


@dataclass
class SplitPredictions:
    """Per-image results of one split: row i is ``paths[i]`` (relative to ``image_root``)."""

    split: str
    class_names: list[str]
    paths: np.ndarray  # (N,) str
    labels: np.ndarray  # (N,) int64, true class index
    proba: np.ndarray  # (N, K) float64
    image_root: str | None
    source: str  # how the probabilities were computed, said in the report
    notes: list[str] = field(default_factory=list)  # caveats, said in the report

    @property
    def predicted(self) -> np.ndarray:
        return self.proba.argmax(axis=1) if len(self.proba) else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.labels)


def read_metrics(run_dir: str) -> dict:
    import json

    path = os.path.join(run_dir, rundir.METRICS)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise FeatcacheError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None


def read_history(run_dir: str) -> dict[str, list[float]]:
    """history.csv as {column: [value per epoch]} ({} when there is none)."""
    path = os.path.join(run_dir, rundir.HISTORY)
    if not os.path.isfile(path):
        return {}
    history: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "epoch" and value not in ("", None):
                    history.setdefault(key, []).append(float(value))
    return history


@contextmanager
def _feature_set(record: dict):
    """The run's feature set, opened from the store recorded in its config."""
    from ..cache.store import open_store

    store = record.get("store") or ""
    if not os.path.isfile(store):
        raise FeatcacheError(f"the run's store {store} is missing (moved or deleted); "
                             "per-image results need its cached features")
    with open_store(store) as s:
        if record["name"] not in s.feature_set_names():
            raise FeatcacheError(f"{store}: feature set {record['name']} of the run is no longer there")
        yield s[record["name"]]


def _changed_note(fs, record: dict) -> list[str]:
    if record.get("digest") and rundir.feature_set_digest(fs) != record["digest"]:
        return [f"feature set {record['name']} changed since the run was trained (images added, removed, "
                "relabelled or re-split): per-image results are for its current rows, the recorded metrics "
                "for the rows it was trained on"]
    return []


def split_probabilities(run_dir: str, split: str, config: dict | None = None) -> SplitPredictions:
    """Paths, true labels and class probabilities of every image of ``split`` in the run's
    feature set, from the run's own model. FeatcacheError (with the reason) when they cannot
    be computed."""
    from .heads import HEADS

    if split not in SPLITS:
        raise FeatcacheError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    config = config or rundir.read_config(run_dir)
    if config["head"] in HEADS:
        return _head_probabilities(run_dir, config, split)
    if config["head"] == "finetune":
        return _finetune_probabilities(run_dir, config, split)
    raise FeatcacheError(f"{run_dir}: per-image results of {config['head']!r} runs are not supported by this featcache")


def _head_probabilities(run_dir: str, config: dict, split: str) -> SplitPredictions:
    """A stage-two head (dense, logreg) on the cached features of its store."""
    from .data import Rows

    record = config["feature_set"]
    with _feature_set(record) as fs:
        notes = _changed_note(fs, record)
        config, head = rundir.load_head(run_dir)  # the model file's sha256 is checked first
        rows = Rows.of(fs, fs.rows(split), split)
        proba = head.predict_rows(rows)
        paths = fs.column("paths")[rows.rows]
        return SplitPredictions(split, list(record["class_names"]), paths, rows.labels, proba,
                                record.get("image_root") or None,
                                f"the run's {config['head']} head on the cached features of {record['store']}", notes)


def _finetune_probabilities(run_dir: str, config: dict, split: str) -> SplitPredictions:
    """A fine-tuned model: the top block + head on the cached boundary activations when the
    run trained from them, else the whole model on the decoded images."""
    import keras

    from ..cache.key import KeySpec
    from ..extract.backbones import get_backbone
    from .finetune import _boundary_data, _decode_all, _proba, _rows_of_run

    record = config["feature_set"]
    if not os.path.isfile(record.get("store") or ""):
        raise FeatcacheError(f"the store {record.get('store')} of the stage-two run is missing (moved or deleted); "
                             "per-image results need its list of images and splits")
    paths, digests, labels, splits = _rows_of_run(config)
    keep = splits == split
    paths, digests, labels = paths[keep], digests[keep], labels[keep]
    model_path = rundir.verify_model(run_dir, config)
    full = keras.saving.load_model(model_path, safe_mode=True, compile=False)
    spec = KeySpec(**record["key"])
    boundary = config.get("boundary") or {}
    image_root = config.get("image_root") or record.get("image_root") or None
    notes = []
    if boundary.get("store") and os.path.isfile(boundary["store"]):
        x = _boundary_data(boundary["store"], boundary["feature_set"], digests)
        model = _top_model(full, get_backbone(spec.backbone))
        source = f"the fine-tuned top block and head on the cached boundary activations of {boundary['store']}"
    else:
        if boundary.get("store"):
            notes.append(f"the boundary store {boundary['store']} the run trained from is missing; "
                         "the images were decoded instead")
        if not image_root or not os.path.isdir(image_root):
            raise FeatcacheError(f"the image folder {image_root} of the run is missing (moved or deleted); "
                                 "per-image results of a fine-tuned model need its images")
        x = _decode_all(image_root, paths, spec.input_size, spec.resize)
        model = full
        source = f"the fine-tuned model on the images of {image_root}"
    proba = _proba(model, x, False) if len(x) else np.zeros((0, len(record["class_names"])))
    return SplitPredictions(split, list(record["class_names"]), paths, labels, proba, image_root, source, notes)


def _top_model(full, backbone):
    """From a saved end-to-end fine-tuned model: boundary activation in, probabilities out
    (the base's layers above the boundary, then every layer after the base)."""
    import keras

    from ..extract.backbones import top_block_model

    base = next(layer for layer in full.layers if isinstance(layer, keras.Model)
                and any(inner.name == backbone.boundary_layer for inner in layer.layers))
    top = top_block_model(backbone, base)
    inputs = keras.Input(tuple(top.input.shape[1:]), name="boundary")
    x = top(inputs)
    for layer in full.layers[full.layers.index(base) + 1:]:
        x = layer(x)
    return keras.Model(inputs, x, name="featcache_finetune_top")


def map_features(config: dict, predictions: SplitPredictions, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """The cached features the head saw, of the predicted images, flattened to (M, D) float32:
    (features, index of each row in ``predictions``, note). M = N unless the split is too big
    to map whole (then a seeded sample, said in the note)."""
    from .heads import _pool

    record = config["feature_set"]
    settings = config.get("stage_two_settings") or config.get("settings") or {}
    with _feature_set(record) as fs:
        rows = fs.rows(predictions.split)
        by_path = dict(zip(fs.column("paths")[rows], rows))
        missing = [p for p in predictions.paths if p not in by_path]
        if missing:
            raise FeatcacheError(f"{len(missing)} images of the split are not in feature set {record['name']} "
                                 f"(first: {missing[0]})")
        want = np.array([by_path[p] for p in predictions.paths], np.int64)
        index = np.arange(len(want))
        row_bytes = int(np.prod(fs.feature_shape)) * 4
        note = ""
        limit = int(min(MAP_MAX_POINTS, max(1, MAP_MAX_BYTES // max(row_bytes, 1))))
        if len(want) > limit:
            index = np.sort(np.random.default_rng(seed).choice(len(want), limit, replace=False))
            note = f"a seeded sample of {limit} of the split's {len(want)} images"
        order = np.argsort(want[index])
        x = np.empty((len(index),) + fs.feature_shape, np.float32)
        x[order] = fs.read(want[index][order])
    pool = settings.get("pool", "none")
    if x.ndim == 4 and pool in ("avg", "max"):
        x = _pool(x, pool)
    return x.reshape(len(x), -1), index, note
