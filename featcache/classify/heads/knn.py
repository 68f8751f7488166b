"""The k-nearest-neighbour head: the training rows' vectors kept as they are, a query's class
probabilities the (distance-weighted) votes of its k nearest (scikit-learn
KNeighborsClassifier). A baseline beside dense and logreg in ``compare``: what the features
alone separate, with nothing learned; and the head behind "images like this one"."""
from __future__ import annotations

import os

import numpy as np

from ...errors import FeatcacheError
from .base import Head

METRICS = ("cosine", "euclidean")
SEARCH_NEIGHBORS = (1, 50)  # log-uniform


class KNNHead(Head):
    name = "knn"
    model_file = "model.npz"  # the training vectors and labels (allow_pickle=False), refitted on load
    DEFAULTS = {"neighbors": 5, "metric": "cosine", "vote": "distance", "pool": "none", "seed": 0}

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        if c["neighbors"] < 1:
            raise FeatcacheError(f"--neighbors {c['neighbors']}: out of range")
        if c["metric"] not in METRICS:
            raise FeatcacheError(f"--metric {c['metric']!r}: choose from {', '.join(METRICS)}")
        if c["vote"] not in ("distance", "uniform"):
            raise FeatcacheError(f"knn vote {c['vote']!r}: distance or uniform")
        self.model = None
        self._train = None  # (vectors, labels) kept for save()

    @staticmethod
    def suggest(trial) -> dict:
        return {"neighbors": trial.suggest_int("neighbors", *SEARCH_NEIGHBORS, log=True),
                "metric": trial.suggest_categorical("metric", METRICS)}

    def _fit_arrays(self, x: np.ndarray, y: np.ndarray) -> None:
        from sklearn.neighbors import KNeighborsClassifier

        c = self.config
        self.model = KNeighborsClassifier(n_neighbors=min(c["neighbors"], len(x)), metric=c["metric"],
                                          weights=c["vote"], algorithm="brute")
        self.model.fit(x, y)
        self._train = (x, y)

    def fit(self, train, validation, plan, run_dir=None, callbacks=()) -> dict:
        from ..evaluation import score

        x, y = train.load()  # every row is the model: all of them in memory, whatever the budget
        self._fit_arrays(self.vectors(x), y)
        self.info.update(rows_kept=int(len(y)))
        history: dict = {}
        for prefix, rows in (("", train), ("val_", validation)):
            if rows is not None and len(rows):
                scores = score(rows.labels, self.predict_rows(rows, plan), self.num_classes)
                history[prefix + "loss"], history[prefix + "accuracy"] = [scores["loss"]], [scores["accuracy"]]
        return history

    def predict_proba(self, x) -> np.ndarray:
        n = len(x[0]) if isinstance(x, (list, tuple)) else len(x)
        if self.model is None:  # untrained: every class alike
            return np.full((n, self.num_classes), 1.0 / self.num_classes)
        p = np.zeros((n, self.num_classes))
        p[:, self.model.classes_] = self.model.predict_proba(self.vectors(x))
        return p

    def graph(self, keras, x, prefix: str = ""):
        raise FeatcacheError("a knn head keeps its training rows, not layers: it runs in featcache (predict), "
                             "not as an exported model")

    def save(self, run_dir) -> str:
        path = os.path.join(run_dir, self.model_file)
        x, y = self._train
        tmp = path + ".tmp.npz"
        np.savez(tmp, vectors=x.astype(np.float32), labels=y.astype(np.int64))
        os.replace(tmp, path)
        return path

    def load(self, path, num_classes, feature_shape) -> None:
        Head.build(self, num_classes, feature_shape)
        try:
            with np.load(path, allow_pickle=False) as f:
                x, y = f["vectors"], f["labels"]
        except (OSError, ValueError, KeyError) as exc:
            raise FeatcacheError(f"{path}: not a featcache knn head file ({exc})") from None
        self._fit_arrays(x, y)
