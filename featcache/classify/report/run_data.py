"""What a run's report needs from the run directory, its store and its images.

Everything per image goes through one function, :func:`split_predictions` (paths, labels and
class probabilities of one split of any run directory, from runs/cached.py), so a new kind of
run is reported once its kind (runs/kinds.py) can score cached rows. Anything that cannot be had (a store that moved,
images that are gone, a changed model file) raises FeatcacheError with the reason; the report
then shows what the run directory itself holds and says why the rest is missing.
"""
from __future__ import annotations

import contextlib
import csv
import os
from dataclasses import dataclass, field

import numpy as np

from ...errors import FeatcacheError
from ..runs import run_dir as rundir

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


def split_predictions(run_dir: str, split: str) -> SplitPredictions:
    """Paths, true labels and class probabilities of every image of ``split``, from the run's
    own model, for any kind of run (:func:`..runs.cached.split_probabilities` does the work).
    FeatcacheError (with the reason) when they cannot be computed."""
    from ..runs.cached import split_probabilities
    from ..runs.kinds import load_run

    run = load_run(run_dir)  # model files' sha256 checked before loading
    p = split_probabilities(run_dir, split, run)
    return SplitPredictions(split, list(run.class_names), p.paths, p.labels, p.proba, run.image_root or None,
                            run.source, p.notes)


def map_features(config: dict, predictions: SplitPredictions, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """The cached features the head saw, of the predicted images, flattened to (M, D) float32
    (a fused head's sets side by side): (features, index of each row in ``predictions``, note).
    M = N unless the split is too big to map whole (then a seeded sample, said in the note)."""
    from ..heads.base import pool_features
    from ..runs.cached import open_recorded_set
    from ..runs.kinds import kind_of

    if kind_of(config).map_refusal:
        raise FeatcacheError(kind_of(config).map_refusal)
    records = rundir.feature_records(config)
    settings = config.get("stage_two_settings") or config.get("settings") or {}
    pool = settings.get("pool", "none")
    parts, index, note = [], None, ""
    for record in records:
        with contextlib.ExitStack() as stack:
            fs = open_recorded_set(stack, record, "being reported", "its cached features")
            rows = fs.rows(predictions.split)
            by_path = dict(zip(fs.column("paths")[rows], rows))
            missing = [p for p in predictions.paths if p not in by_path]
            if missing:
                raise FeatcacheError(f"{len(missing)} images of the split are not in feature set {record['name']} "
                                     f"(first: {missing[0]})")
            want = np.array([by_path[p] for p in predictions.paths], np.int64)
            if index is None:
                index = np.arange(len(want))
                row_bytes = sum(int(np.prod(r["feature_shape"])) for r in records) * 4
                limit = int(min(MAP_MAX_POINTS, max(1, MAP_MAX_BYTES // max(row_bytes, 1))))
                if len(want) > limit:
                    index = np.sort(np.random.default_rng(seed).choice(len(want), limit, replace=False))
                    note = f"a seeded sample of {limit} of the split's {len(want)} images"
            order = np.argsort(want[index])
            x = np.empty((len(index),) + fs.feature_shape, np.float32)
            x[order] = fs.read(want[index][order])
        if x.ndim == 4 and pool in ("avg", "max"):
            x = pool_features(x, pool)
        parts.append(x.reshape(len(x), -1))
    return (parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)), index, note
