"""The out-of-fold model of ``audit --run RUN_DIR``: the run's head kind and settings (any head of
the registry that trains on cached features: dense, logreg, knn), refitted on each fold of the
audit's vectors. Runs that are not one head on one feature set (fused, finetune, ensemble) are
refused in one line: their model is not a head that can be refitted on the vectors alone."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..classify.heads.registry import HEADS, make_head
from ..classify.rows.training import _Chunked, plan
from ..errors import FeatcacheError

# Settings about watching a training run, not about its model: they need a validation split or
# a run directory, which a fold has not, so the folds train without them.
MONITORING = ("early_stopping", "reduce_lr", "checkpoint", "csv_log", "tensorboard")


@dataclass
class ArrayRows(_Chunked):
    """Rows of an in-memory (N, D) array, in the shape the heads train from (see rows.training)."""

    x: np.ndarray
    labels: np.ndarray
    name: str = "fold"
    rows: np.ndarray = field(init=False)
    views: None = None

    def __post_init__(self):
        self.rows = np.arange(len(self.labels))

    @property
    def row_bytes(self) -> int:
        return int(self.x.shape[1]) * 4

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return self.x[rows]


class HeadModel:
    """A head of the registry behind the scikit-learn interface out_of_fold uses (fit,
    predict_proba, classes_), trained whole in memory (the audit holds the vectors already)."""

    def __init__(self, kind: str, settings: dict, num_classes: int):
        self.kind, self.num_classes = kind, num_classes
        self.settings = {k: v for k, v in settings.items() if k in HEADS[kind].DEFAULTS}
        for k in MONITORING:
            if k in self.settings:
                self.settings[k] = HEADS[kind].DEFAULTS[k]
        self.classes_ = np.arange(num_classes)
        self.head = None

    def fit(self, x: np.ndarray, y: np.ndarray) -> "HeadModel":
        head = make_head(self.kind, **self.settings)
        head.build(self.num_classes, (x.shape[1],))
        rows = ArrayRows(np.asarray(x, np.float32), np.asarray(y, np.int64))
        whole = plan(rows, None, budget_mb=float("inf"))
        head.prepare(rows, whole)
        head.fit(rows, None, whole)
        self.head = head
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return self.head.predict_proba(np.asarray(x, np.float32))


def run_model(run_dir: str):
    """(num_classes -> a factory of the run's refittable model, a sentence naming it); the run is
    checked here, before the store is read."""
    from ..classify.runs.run_dir import read_config, run_kind

    config = read_config(run_dir)
    kind, head = run_kind(config), config.get("head")
    if kind != "head" or head not in HEADS:
        raise FeatcacheError(f"--run {run_dir}: a {head} {kind} run; the audit's folds refit one head on cached "
                             f"features ({', '.join(HEADS)} runs)")
    settings = dict(config.get("settings") or {})
    shown = ", ".join(f"{k}={settings[k]}" for k in sorted(settings) if k not in MONITORING)
    return (lambda k: lambda: HeadModel(head, settings, k)), f"the {head} head of {run_dir} ({shown})"
