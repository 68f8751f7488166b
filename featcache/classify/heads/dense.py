"""The dense head: Keras Flatten (or global pooling) -> Dense(relu) -> Dropout -> sigmoid/softmax."""
from __future__ import annotations

import os

import numpy as np

from ...errors import FeatcacheError
from ..rows.training import batches_forever, steps
from .base import OPTIMIZERS, Head, float32, two_columns


# Search space of `featcache search` (Optuna), see suggest().
DENSE_UNITS = (32, 512)  # log-uniform
DENSE_DROPOUT = (0.0, 0.6)
DENSE_L2 = (1e-6, 1e-2)  # log-uniform
DENSE_OPTIMIZERS = ("adam", "rmsprop", "adamw")
DENSE_LR = (1e-5, 1e-2)  # log-uniform
DENSE_BATCH_SIZES = (16, 32, 64, 128)
DENSE_EPOCHS = (5, 30, 5)  # (low, high, step): the most epochs; early stopping ends most trials sooner
EARLY_STOPPING = 3  # patience in epochs; the best epoch's weights are kept
CONSTANT_VARIANCE = 1e-6  # of the largest feature variance: below it a feature counts as constant


class DenseHead(Head):
    """Keras Flatten (or global pooling) -> standardize -> Dense(units, relu) -> Dropout -> sigmoid/softmax.

    It starts at chance: pooled ReLU features are unscaled by nature (means of 0.5 to several
    units over thousands of inputs), and with a Glorot-initialised output the untrained head's
    loss was 3.2 x ln K on the demo. ``standardize`` (on by default) puts a layer holding the
    mean and variance of the training rows' (pooled or flattened) features in front
    (computed before training, in a stream when the rows do not fit the budget; alone it brought
    the demo to 1.6 x ln K), and the output layer starts at zero (exactly ln K). The statistics
    live inside the model, so every export (.keras, .tflite, SavedModel, ONNX, head-only)
    carries them."""

    name = "dense"
    model_file = "model.keras"
    DEFAULTS = {
        "units": 256, "dropout": 0.5, "l2": 0.0, "optimizer": "rmsprop", "lr": 2e-5,
        "epochs": 30, "batch_size": 20, "pool": "none", "seed": 0, "standardize": True,
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

    @staticmethod
    def suggest(trial) -> dict:
        return dict(
            units=trial.suggest_int("units", *DENSE_UNITS, log=True),
            dropout=trial.suggest_float("dropout", *DENSE_DROPOUT),
            l2=trial.suggest_float("l2", *DENSE_L2, log=True),
            optimizer=trial.suggest_categorical("optimizer", DENSE_OPTIMIZERS),
            lr=trial.suggest_float("lr", *DENSE_LR, log=True),
            batch_size=trial.suggest_categorical("batch_size", DENSE_BATCH_SIZES),
            epochs=trial.suggest_int("epochs", DENSE_EPOCHS[0], DENSE_EPOCHS[1], step=DENSE_EPOCHS[2]),
            early_stopping=EARLY_STOPPING,
        )

    @property
    def binary(self) -> bool:
        return self.num_classes == 2

    def build(self, num_classes, feature_shape) -> None:
        super().build(num_classes, feature_shape)
        self._build_model(None)

    def prepare(self, train, plan) -> None:
        """The input scaling: mean and variance of the training rows' vectors (float64 sums)."""
        if not self.config["standardize"]:
            return
        count, total, squares = 0, 0.0, 0.0
        for x, _ in train.chunks(plan.chunk_rows):
            v = self.vectors(x).astype(np.float64)
            count += len(v)
            total = total + v.sum(axis=0)
            squares = squares + np.square(v).sum(axis=0)
        if not count:
            return
        mean = total / count
        variance = np.maximum(squares / count - np.square(mean), 0.0)
        # A feature (near) constant on the training rows, e.g. a ReLU unit that never fired, is
        # left unscaled as scikit-learn's StandardScaler does: dividing by its ~0 spread would
        # blow up the first other row where it fires.
        variance[variance <= CONSTANT_VARIANCE * max(float(variance.max()), 1e-30)] = 1.0
        self._build_model((mean, variance))
        self.info["standardized"] = {"rows": int(count), "features": int(len(mean))}

    def _build_model(self, statistics) -> None:
        """The Keras model; ``statistics``: (mean, variance) of the inputs, or None before
        prepare() (then the standardize layer is the identity)."""
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
        if c["standardize"]:
            # (x - mean) / std as a Rescaling with per-feature scale and offset: constants in the
            # model's config, which every converter (TFLite, tf2onnx) folds; a Normalization
            # layer's statistics became graph inputs in the ONNX export.
            if statistics is None:
                scale, offset = 1.0, 0.0
            else:
                mean, variance = statistics
                std = np.sqrt(variance)
                scale, offset = (1.0 / std).astype(np.float32).tolist(), (-mean / std).astype(np.float32).tolist()
            x = keras.layers.Rescaling(scale=scale, offset=offset, name="standardize")(x)
        regularizer = keras.regularizers.L2(c["l2"]) if c["l2"] else None
        x = keras.layers.Dense(c["units"], activation="relu", kernel_regularizer=regularizer, name="hidden")(x)
        x = keras.layers.Dropout(c["dropout"], seed=self.seed, name="dropout")(x)
        # The output layer starts at zero: every class 1/K, the untrained loss exactly ln K, whatever
        # the inputs; the hidden layer gets its gradient from the second step on.
        if self.binary:
            outputs = keras.layers.Dense(1, activation="sigmoid", kernel_initializer="zeros", name="output")(x)
        else:
            outputs = keras.layers.Dense(self.num_classes, activation="softmax", kernel_initializer="zeros",
                                         name="output")(x)
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
        p = np.asarray(self.model.predict_on_batch(float32(x)), dtype=np.float64)
        return two_columns(p) if self.binary else p

    def graph(self, keras, x, prefix: str = ""):
        """This head on Keras tensors: (N, K) probabilities (a binary head's sigmoid as two columns)."""
        from ..graph.layers import two_class

        y = self.model(x)
        return two_class(keras, y, prefix) if self.binary else y

    def save(self, run_dir) -> str:
        path = os.path.join(run_dir, self.model_file)
        self.model.save(path)
        return path

    def load(self, path, num_classes, feature_shape) -> None:
        import keras

        Head.build(self, num_classes, feature_shape)
        self.model = keras.saving.load_model(path, safe_mode=True, compile=False)


