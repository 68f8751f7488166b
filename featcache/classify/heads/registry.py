"""Classifier heads on cached features, one scikit-learn-style interface.

A head is configured in its constructor (every option has a default and is validated there),
then ``build(num_classes, feature_shape)`` gives the untrained head, ``fit(train, validation,
plan)`` trains it from the store (whole or streamed, see :mod:`.data`), ``predict_proba(X)``
returns (N, K) class probabilities, and :func:`evaluate` scores any rows the same way for every
head. Keras and scikit-learn are imported inside the methods: listing heads stays instant.
"""
from __future__ import annotations

import os
import warnings

import numpy as np

from ...errors import FeatcacheError
from ..rows.training import Plan, Rows, batches_forever, eval_chunk_rows, steps

POOLS = ("none", "avg", "max")
OPTIMIZERS = ("rmsprop", "adam", "adamw", "sgd", "nadam", "adagrad")


def _pool(x: np.ndarray, pool: str) -> np.ndarray:
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

    def save(self, run_dir: str) -> str:
        raise NotImplementedError

    def load(self, path: str, num_classes: int, feature_shape) -> None:
        raise NotImplementedError


def _rows_in(x) -> int:
    return len(x[0]) if isinstance(x, (list, tuple)) else len(x)


def _float32(x):
    """float32 inputs for Keras: one array, or a tuple of them (multi-input model)."""
    if isinstance(x, (list, tuple)):
        return tuple(np.asarray(part, dtype=np.float32) for part in x)
    return np.asarray(x, dtype=np.float32)


def _two_columns(p: np.ndarray) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    return np.column_stack([1.0 - p, p])


class DenseHead(Head):
    """Keras Flatten (or global pooling) -> Dense(units, relu) -> Dropout -> sigmoid/softmax."""

    name = "dense"
    model_file = "model.keras"
    DEFAULTS = {
        "units": 256, "dropout": 0.5, "l2": 0.0, "optimizer": "rmsprop", "lr": 2e-5,
        "epochs": 30, "batch_size": 20, "pool": "none", "seed": 0,
        # Batches run per compiled call: the same updates in the same order (checked: equal
        # histories), far less Keras per-step overhead on CPU.
        "steps_per_execution": 32,
        # Keras callbacks (0/False/None = off).
        "early_stopping": 0, "reduce_lr": 0, "checkpoint": False, "csv_log": False, "tensorboard": None,
    }

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        if c["optimizer"] not in OPTIMIZERS:
            raise FeatcacheError(f"--optimizer {c['optimizer']!r}: choose from {', '.join(OPTIMIZERS)}")
        checks = [("units", c["units"] >= 1), ("dropout", 0 <= c["dropout"] < 1), ("l2", c["l2"] >= 0),
                  ("lr", c["lr"] > 0), ("epochs", c["epochs"] >= 1), ("batch_size", c["batch_size"] >= 1),
                  ("steps_per_execution", c["steps_per_execution"] >= 1),
                  ("early_stopping", c["early_stopping"] >= 0), ("reduce_lr", c["reduce_lr"] >= 0)]
        for option, ok in checks:
            if not ok:
                raise FeatcacheError(f"--{option.replace('_', '-')} {c[option]}: out of range")
        self.model = None

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def build(self, num_classes, feature_shape) -> None:
        super().build(num_classes, feature_shape)
        import keras

        c = self.config
        keras.utils.set_random_seed(self.seed)  # same init, dropout masks and shuffles every run
        if self.fused:  # the functional API: one input per feature set, each pooled or flattened, joined
            inputs = [keras.Input(shape, name=f"features_{i}") for i, shape in enumerate(self.parts)]
            x = keras.layers.Concatenate(name="fuse")([
                self._vector(keras, part, shape, f"_{i}") for i, (part, shape) in enumerate(zip(inputs, self.parts))])
        else:
            inputs = keras.Input(self.feature_shape, name="features")
            x = self._vector(keras, inputs, self.feature_shape, "")
        regularizer = keras.regularizers.L2(c["l2"]) if c["l2"] else None
        x = keras.layers.Dense(c["units"], activation="relu", kernel_regularizer=regularizer, name="hidden")(x)
        x = keras.layers.Dropout(c["dropout"], seed=self.seed, name="dropout")(x)
        if self.binary:
            outputs = keras.layers.Dense(1, activation="sigmoid", name="output")(x)
        else:
            outputs = keras.layers.Dense(self.num_classes, activation="softmax", name="output")(x)
        self.model = keras.Model(inputs, outputs, name="dense_head")
        self._compile()

    def _vector(self, keras, x, shape, suffix: str):
        """One input as a vector: pooled (--pool) or flattened."""
        pool = self.part_pool(shape)
        if pool != "none":
            layer = keras.layers.GlobalAveragePooling2D if pool == "avg" else keras.layers.GlobalMaxPooling2D
            return layer(name="pool" + suffix)(x)
        if len(shape) > 1:
            return keras.layers.Flatten(name="flatten" + suffix)(x)
        return x

    def _compile(self) -> None:
        import keras

        c = self.config
        optimizer = {
            "rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam, "adamw": keras.optimizers.AdamW,
            "sgd": keras.optimizers.SGD, "nadam": keras.optimizers.Nadam, "adagrad": keras.optimizers.Adagrad,
        }[c["optimizer"]](learning_rate=c["lr"])
        loss = "binary_crossentropy" if self.binary else "sparse_categorical_crossentropy"
        metrics = ["accuracy"]
        if c["l2"]:
            # With a penalty, Keras' loss is log loss + L2: record the log loss alone as well
            # (what the heads are scored on, and what search prunes on).
            metrics.append((keras.metrics.BinaryCrossentropy if self.binary
                            else keras.metrics.SparseCategoricalCrossentropy)(name="log_loss"))
        self.model.compile(optimizer=optimizer, loss=loss, metrics=metrics,
                           steps_per_execution=c["steps_per_execution"])

    def _targets(self, y: np.ndarray) -> np.ndarray:
        # Binary targets as (N, 1) like the sigmoid output: the loss would align the ranks
        # itself, the log_loss metric does not.
        return y.astype(np.float32).reshape(-1, 1) if self.binary else y.astype(np.int32)

    def _callbacks(self, run_dir: str | None, has_validation: bool) -> list:
        import keras

        c = self.config
        needs_validation = [f for f in ("early_stopping", "reduce_lr", "checkpoint") if c[f]]
        if needs_validation and not has_validation:
            flags = ", ".join("--" + f.replace("_", "-") for f in needs_validation)
            raise FeatcacheError(f"{flags}: needs a validation split, and this feature set has no validation rows")
        callbacks = []
        if c["early_stopping"]:
            callbacks.append(keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=c["early_stopping"], restore_best_weights=True))
        if c["reduce_lr"]:
            callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", patience=c["reduce_lr"]))
        if c["checkpoint"]:
            if run_dir is None:
                raise FeatcacheError("--checkpoint: needs a run directory (--out)")
            callbacks.append(keras.callbacks.ModelCheckpoint(
                os.path.join(run_dir, "best.keras"), monitor="val_loss", save_best_only=True))
        if c["csv_log"]:
            if run_dir is None:
                raise FeatcacheError("--csv-log: needs a run directory (--out)")
            callbacks.append(keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv")))
        if c["tensorboard"]:
            try:
                import tensorboard  # noqa: F401  (Keras' callback needs its summary writers)
            except ImportError:
                raise FeatcacheError("--tensorboard: the tensorboard package is not installed "
                                     "(pip install tensorboard)") from None
            callbacks.append(keras.callbacks.TensorBoard(log_dir=c["tensorboard"]))
        return callbacks

    def fit(self, train, validation, plan, run_dir=None, callbacks=()) -> dict:
        c = self.config
        has_validation = validation is not None and len(validation) > 0
        callbacks = self._callbacks(run_dir, has_validation) + list(callbacks)
        batch = c["batch_size"]
        if train.views is not None:
            # Cached augmentation: one view per image per epoch (see extract/augment.py).
            from ..rows.training import view_batches_forever

            fit_args = dict(x=self._with_targets(view_batches_forever(train, batch, self.seed)),
                            steps_per_epoch=-(-len(train) // batch), shuffle=False)
            if has_validation:
                vx, vy = validation.load()
                fit_args.update(validation_data=(vx, self._targets(vy)), validation_batch_size=max(batch, 256))
            self.info["views_per_image"] = int(train.views.shape[1])
        elif plan.streaming:
            # Endless generators with explicit steps: Keras keeps one iterator across epochs,
            # and the generator itself reshuffles at each epoch boundary.
            fit_args = dict(x=self._with_targets(batches_forever(train, batch, plan.chunk_rows, self.seed, True)),
                            steps_per_epoch=steps(train, batch, plan.chunk_rows), shuffle=False)
            if has_validation:
                val_batch = min(max(batch, 256), plan.chunk_rows)
                fit_args.update(
                    validation_data=self._with_targets(batches_forever(validation, val_batch, plan.chunk_rows, 0, False)),
                    validation_steps=steps(validation, val_batch, plan.chunk_rows))
        else:
            x, y = train.load()
            fit_args = dict(x=x, y=self._targets(y), batch_size=batch, shuffle=True)
            if has_validation:
                vx, vy = validation.load()
                # A bigger validation batch only cuts per-call overhead; the numbers are the same.
                fit_args.update(validation_data=(vx, self._targets(vy)), validation_batch_size=max(batch, 256))
        self._generator_error = None
        try:
            history = self.model.fit(epochs=c["epochs"], callbacks=callbacks, verbose=0, **fit_args)
        except Exception:
            if self._generator_error is not None:  # e.g. a damaged chunk of the store, as itself
                raise self._generator_error from None
            raise
        if c["checkpoint"] and os.path.exists(os.path.join(run_dir, "best.keras")):
            import keras

            # The run's model is the best one by validation loss, not the last epoch's.
            self.model = keras.saving.load_model(os.path.join(run_dir, "best.keras"), safe_mode=True)
            self.info["selected"] = "best validation loss (--checkpoint)"
        self.info["parameters"] = int(self.model.count_params())
        self.info["epochs_run"] = len(history.history.get("loss", []))
        return {k: [float(v) for v in values] for k, values in history.history.items()}

    def _with_targets(self, batches):
        # Keras runs a generator inside TensorFlow, which turns its exceptions into its own
        # errors: a FeatcacheError is kept for fit() to raise as itself.
        try:
            for x, y in batches:
                yield (tuple(x) if isinstance(x, list) else x), self._targets(y)
        except FeatcacheError as exc:
            self._generator_error = exc
            raise

    def predict_proba(self, x) -> np.ndarray:
        p = np.asarray(self.model.predict_on_batch(_float32(x)), dtype=np.float64)
        return _two_columns(p) if self.binary else p

    def save(self, run_dir) -> str:
        path = os.path.join(run_dir, self.model_file)
        self.model.save(path)
        return path

    def load(self, path, num_classes, feature_shape) -> None:
        import keras

        Head.build(self, num_classes, feature_shape)
        self.model = keras.saving.load_model(path, safe_mode=True, compile=False)


class LogRegHead(Head):
    """scikit-learn Pipeline(StandardScaler, LogisticRegression(lbfgs)) on flattened or pooled
    features. Streamed (over the memory budget): StandardScaler.partial_fit, then
    SGDClassifier(loss="log_loss") partial_fit passes with alpha = 1 / (C * n), the same
    objective as LogisticRegression's, since lbfgs needs all rows in memory."""

    name = "logreg"
    model_file = "model.joblib"
    DEFAULTS = {"C": 1.0, "max_iter": 1000, "pool": "none", "seed": 0, "stream_epochs": 20}

    def __init__(self, **options):
        super().__init__(**options)
        c = self.config
        for option, ok in (("C", c["C"] > 0), ("max_iter", c["max_iter"] >= 1), ("stream_epochs", c["stream_epochs"] >= 1)):
            if not ok:
                raise FeatcacheError(f"--{option.replace('_', '-')} {c[option]}: out of range")
        self.pipeline = None

    def _prepare(self, x) -> np.ndarray:
        """Pooled or flattened features; a fused head's sets side by side, in order."""
        parts = x if isinstance(x, (list, tuple)) else [x]
        vectors = []
        for part, shape in zip(parts, self.parts):
            part = _pool(np.asarray(part, dtype=np.float32), self.part_pool(shape))
            vectors.append(part.reshape(len(part), -1))
        return vectors[0] if len(vectors) == 1 else np.concatenate(vectors, axis=1)

    def predict_proba(self, x) -> np.ndarray:
        if self.pipeline is None:
            # The untrained state: zero weights, the same probability for every class.
            return np.full((_rows_in(x), self.num_classes), 1.0 / self.num_classes)
        return np.asarray(self.pipeline.predict_proba(self._prepare(x)), dtype=np.float64)

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
            pipeline.fit(self._prepare(x), y)
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
            scaler.partial_fit(self._prepare(x))
        alpha = 1.0 / (c["C"] * len(train))
        sgd = SGDClassifier(loss="log_loss", alpha=alpha, random_state=self.seed)
        classes = np.arange(self.num_classes)
        self.pipeline = Pipeline([("scale", scaler), ("logreg", sgd)])
        history: dict = {}
        for epoch in range(c["stream_epochs"]):
            rng = np.random.default_rng([self.seed, epoch])
            for x, y in train.chunks(plan.chunk_rows, rng):
                sgd.partial_fit(scaler.transform(self._prepare(x)), y, classes=classes)
            self._history_row(history, train, validation, plan)
        self.info.update(solver=f"SGDClassifier(log_loss) partial_fit, {c['stream_epochs']} passes, alpha=1/(C*n)={alpha:.3g} "
                                "(streamed: lbfgs needs all rows in memory)")
        return history

    def save(self, run_dir) -> str:
        import joblib

        path = os.path.join(run_dir, self.model_file)
        joblib.dump(self.pipeline, path)
        return path

    def load(self, path, num_classes, feature_shape) -> None:
        import joblib

        Head.build(self, num_classes, feature_shape)
        self.pipeline = joblib.load(path)  # only after rundir.verify_model checked its sha256


HEADS = {"dense": DenseHead, "logreg": LogRegHead}


def make_head(name: str, **options) -> Head:
    if name not in HEADS:
        raise FeatcacheError(f"--head {name!r}: choose from {', '.join(HEADS)}")
    return HEADS[name](**options)
