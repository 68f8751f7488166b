"""The head interface every head kind implements (see :mod:`.registry` for the kinds).

A head is configured in its constructor (every option has a default and is validated there),
then ``build(num_classes, feature_shape)`` gives the untrained head, ``fit(train, validation,
plan)`` trains it from the store (whole or streamed, see :mod:`..rows.training`),
``predict_proba(X)`` returns (N, K) class probabilities. Keras and scikit-learn are imported
inside the methods: listing heads stays instant.
"""
from __future__ import annotations

import numpy as np

from ...errors import FeatcacheError
from ..rows.training import Plan, Rows, eval_chunk_rows

POOLS = ("none", "avg", "max")
OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd", "nadam", "adagrad")


def pool_features(x: np.ndarray, pool: str) -> np.ndarray:
    if pool == "none" or x.ndim != 4:
        return x
    return x.mean(axis=(1, 2)) if pool == "avg" else x.max(axis=(1, 2))



class Head:
    """Base class: option handling, chunked prediction, the untrained state."""

    name = ""
    DEFAULTS: dict = {}
    model_file = ""

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            flags = ", ".join("--" + u.replace("_", "-") for u in unknown)
            raise FeatcacheError(f"{flags}: not an option of the {self.name} head "
                                 f"(its options: {', '.join(sorted(self.DEFAULTS))})")
        self.config = {**self.DEFAULTS, **{k: v for k, v in options.items() if v is not None}}
        if self.config["pool"] not in POOLS:
            raise FeatcacheError(f"--pool {self.config['pool']!r}: choose from {', '.join(POOLS)}")
        self.num_classes = 0
        self.feature_shape: tuple = ()  # one shape, or a tuple of shapes for a fused head
        self.parts: list[tuple[int, ...]] = [()]  # the input shape of each feature set
        self.info: dict = {}  # what training found out (iterations, convergence, parameters...)

    @staticmethod
    def suggest(trial) -> dict:
        """This kind's options for one Optuna trial of ``featcache search`` (its search space)."""
        raise NotImplementedError

    @classmethod
    def accepts(cls, option: str) -> bool:
        return option in cls.DEFAULTS

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def fused(self) -> bool:
        """True for a head on several feature sets (features come as a list, one array per set)."""
        return len(self.parts) > 1

    def part_pool(self, shape: tuple[int, ...]) -> str:
        """Pooling only applies to spatial (H, W, C) features; pooled sets are used as they are."""
        return self.config["pool"] if len(shape) == 3 else "none"

    def effective_pool(self) -> str:
        """The pooling applied (to every spatial input of a fused head)."""
        return "none" if all(self.part_pool(shape) == "none" for shape in self.parts) else self.config["pool"]

    def settings(self) -> dict:
        """The configuration as recorded in config.json (pool as actually applied)."""
        return {**self.config, "pool": self.effective_pool()}

    def build(self, num_classes: int, feature_shape: tuple) -> None:
        """``feature_shape``: one shape, or a tuple of shapes (one per feature set) for a fused head."""
        self.num_classes = int(num_classes)
        if feature_shape and isinstance(feature_shape[0], (tuple, list)):
            self.parts = [tuple(int(d) for d in shape) for shape in feature_shape]
            self.feature_shape = tuple(self.parts)
        else:
            self.feature_shape = tuple(int(d) for d in feature_shape)
            self.parts = [self.feature_shape]

    def vectors(self, x) -> np.ndarray:
        """Pooled or flattened float32 features, (N, D); a fused head's sets side by side, in order."""
        parts = x if isinstance(x, (list, tuple)) else [x]
        vectors = []
        for part, shape in zip(parts, self.parts):
            part = pool_features(np.asarray(part, dtype=np.float32), self.part_pool(shape))
            vectors.append(part.reshape(len(part), -1))
        return vectors[0] if len(vectors) == 1 else np.concatenate(vectors, axis=1)

    def prepare(self, train: Rows, plan: Plan) -> None:
        """What the built head takes from the training rows before the untrained check and fit
        (the dense head: its input scaling). Nothing by default."""

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_rows(self, rows: Rows, plan: Plan | None = None) -> np.ndarray:
        """(N, K) probabilities for stored rows, read piece by piece (memory stays flat)."""
        if len(rows) == 0:
            return np.zeros((0, self.num_classes))
        return np.concatenate([self.predict_proba(x) for x, _ in rows.chunks(eval_chunk_rows(rows, plan))])

    def fit(self, train: Rows, validation: Rows | None, plan: Plan, run_dir: str | None = None,
            callbacks=()) -> dict:
        """Train; returns the history: {metric: [value per epoch]}. ``callbacks``: more Keras
        callbacks (e.g. search's pruning), for heads trained in epochs; others ignore them."""
        raise NotImplementedError

    def graph(self, keras, x, prefix: str = ""):
        """The trained head on Keras tensors (one, or a list for a fused head): (N, K) probabilities."""
        raise NotImplementedError

    def save(self, run_dir: str) -> str:
        raise NotImplementedError

    def load(self, path: str, num_classes: int, feature_shape) -> None:
        raise NotImplementedError


def rows_in(x) -> int:
    return len(x[0]) if isinstance(x, (list, tuple)) else len(x)


def float32(x):
    """float32 inputs for Keras: one array, or a tuple of them (multi-input model)."""
    if isinstance(x, (list, tuple)):
        return tuple(np.asarray(part, dtype=np.float32) for part in x)
    return np.asarray(x, dtype=np.float32)


def two_columns(p: np.ndarray) -> np.ndarray:
    """(N,) or (N, 1) sigmoid outputs -> (N, 2) [1 - p, p]; (N, K) with K > 1 as it is, float64."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] > 1:
        return p
    p = p.reshape(-1)
    return np.column_stack([1.0 - p, p])

