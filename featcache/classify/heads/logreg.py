"""The logistic-regression head: scikit-learn StandardScaler + LogisticRegression (or SGD, streamed)."""
from __future__ import annotations

import os
import warnings

import numpy as np

from ...errors import FeatcacheError
from .base import Head, rows_in


LOGREG_C = (1e-4, 1e2)  # search space of C (log-uniform), see suggest()


class LogRegHead(Head):
    """scikit-learn Pipeline(StandardScaler, LogisticRegression(lbfgs)) on flattened or pooled
    features. Streamed (over the memory budget): StandardScaler.partial_fit, then
    SGDClassifier(loss="log_loss") partial_fit passes with alpha = 1 / (C * n), the same
    objective as LogisticRegression's, since lbfgs needs all rows in memory."""

    name = "logreg"
    model_file = "model.npz"  # arrays only, read with allow_pickle=False (see :mod:`.safe_arrays`)
    DEFAULTS = {"C": 1.0, "max_iter": 1000, "pool": "none", "seed": 0, "stream_epochs": 20}

    @staticmethod
    def suggest(trial) -> dict:
        return {"C": trial.suggest_float("C", *LOGREG_C, log=True)}

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        for option, ok in (("C", c["C"] > 0), ("max_iter", c["max_iter"] >= 1), ("stream_epochs", c["stream_epochs"] >= 1)):
            if not ok:
                raise FeatcacheError(f"--{option.replace('_', '-')} {c[option]}: out of range")
        self.pipeline = None

    def predict_proba(self, x) -> np.ndarray:
        if self.pipeline is None:
            # The untrained state: zero weights, the same probability for every class.
            return np.full((rows_in(x), self.num_classes), 1.0 / self.num_classes)
        return np.asarray(self.pipeline.predict_proba(self.vectors(x)), dtype=np.float64)

    def fit(self, train, validation, plan, run_dir=None, callbacks=()) -> dict:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        c = self.config
        if plan.streaming:
            return self._fit_streaming(train, validation, plan)
        x, y = train.load()
        pipeline = Pipeline([
            ("scale", StandardScaler()),
            ("logreg", LogisticRegression(C=c["C"], max_iter=c["max_iter"], solver="lbfgs", random_state=self.seed)),
        ])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            pipeline.fit(self.vectors(x), y)
        self.pipeline = pipeline
        self.info.update(solver="lbfgs", iterations=int(np.max(pipeline[-1].n_iter_)),
                         converged=not any(issubclass(w.category, ConvergenceWarning) for w in caught))
        # lbfgs is one optimisation, not epochs: the history is one row, the end state.
        return self._history_row({}, train, validation, plan)

    def _history_row(self, history: dict, train, validation, plan) -> dict:
        from ..evaluation import score

        for prefix, rows in (("", train), ("val_", validation)):
            if rows is None or len(rows) == 0:
                continue
            scores = score(rows.labels, self.predict_rows(rows, plan), self.num_classes)
            history.setdefault(prefix + "loss", []).append(scores["loss"])
            history.setdefault(prefix + "accuracy", []).append(scores["accuracy"])
        return history

    def _fit_streaming(self, train, validation, plan) -> dict:
        from sklearn.linear_model import SGDClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import StandardScaler

        c = self.config
        scaler = StandardScaler()
        for x, _ in train.chunks(plan.chunk_rows):
            scaler.partial_fit(self.vectors(x))
        alpha = 1.0 / (c["C"] * len(train))
        sgd = SGDClassifier(loss="log_loss", alpha=alpha, random_state=self.seed)
        classes = np.arange(self.num_classes)
        self.pipeline = Pipeline([("scale", scaler), ("logreg", sgd)])
        history: dict = {}
        for epoch in range(c["stream_epochs"]):
            rng = np.random.default_rng([self.seed, epoch])
            for x, y in train.chunks(plan.chunk_rows, rng):
                sgd.partial_fit(scaler.transform(self.vectors(x)), y, classes=classes)
            self._history_row(history, train, validation, plan)
        self.info.update(solver=f"SGDClassifier(log_loss) partial_fit, {c['stream_epochs']} passes, alpha=1/(C*n)={alpha:.3g} "
                                "(streamed: lbfgs needs all rows in memory)")
        return history

    def graph(self, keras, x, prefix: str = ""):
        """This head on Keras tensors: the fitted scaler and classifier folded into Dense layers."""
        from ..graph.layers import logreg_layers

        return logreg_layers(keras, x, self, prefix)

    def save(self, run_dir) -> str:
        from .safe_arrays import save_pipeline

        path = os.path.join(run_dir, self.model_file)
        save_pipeline(self.pipeline, path)
        return path

    def load(self, path, num_classes, feature_shape) -> None:
        from .safe_arrays import is_pickle_file, load_pipeline, refuse_pickle

        Head.build(self, num_classes, feature_shape)
        if is_pickle_file(path):  # a run written before the safe format
            refuse_pickle(path, os.path.dirname(path))
            import joblib

            self.pipeline = joblib.load(path)  # trusted by the user; sha256 checked by rundir.verify_model
            return
        self.pipeline = load_pipeline(path)  # only after rundir.verify_model checked its sha256
