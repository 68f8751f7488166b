"""Stage three: the transfer strategies, a trained dense head with none, part or all of its base.

``--unfreeze none`` trains the head alone on images through the frozen base (with --augment:
the classic "feature extraction with data augmentation"); ``top`` (the default) unfreezes the
registry's top conv block; ``from:LAYER`` every layer from LAYER on; ``all`` the whole base.
The head comes from a stage-two run (never random: a random head's large gradients would wreck
the pretrained layers). The base is rebuilt unfolded in float32 so its BatchNormalization
layers exist as layers; they are frozen (``trainable = False``, which in Keras 3 also runs them
in inference mode), as is everything not unfrozen. One exception: ``all`` on a base with random
weights (a run extracted with --weights none, i.e. training from scratch) trains BN too, since
its moving statistics were never estimated. Training data is either the images
(decoded by featcache's decoder at the base's size, as extraction did) or, with ``from_cache``,
the boundary activations cached by ``featcache extract --layer BOUNDARY``: then only the top
block and the head run, and no image is decoded.

The run directory has the stage-two layout (config.json, metrics.json, history.csv, plots);
its ``model.keras`` is the whole end-to-end model (RGB 0..255 in, class probabilities out,
like ``featcache export``), loadable in Keras' safe mode.
"""
from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from ...cache.key import KeySpec
from ...cache.store import open_store
from ...errors import FeatcacheError
from .. import evaluation as reports
from ..graph.finetune_model import build_models, parse_unfreeze
from ..runs import run_dir as rundir
from ..runs.images import decode_all as _decode_all, rows_of_run as _rows_of_run

SPLITS = ("train", "validation", "test")


def load_stage_two(run_dir: str, weights: str | None = None):
    """(config, head, recipe) of a stage-two dense run, checked for fine-tuning."""
    from ..graph.base_recipe import base_recipe

    if not os.path.isdir(run_dir):
        raise FeatcacheError(f"{run_dir}: no such run directory (train a dense head first: featcache train --head dense --out ...)")
    config = rundir.read_config(run_dir)
    kind = rundir.run_kind(config)
    if kind in ("fused", "ensemble"):
        raise FeatcacheError(f"{run_dir}: a {kind} run; fine-tuning needs a dense head on one feature set "
                             "(featcache train --head dense --feature-set ...)")
    if config["head"] != "dense":
        raise FeatcacheError(f"{run_dir}: a {config['head']} run; fine-tuning needs a dense head run "
                             "(featcache train --head dense)")
    config, head = rundir.load_head(run_dir)  # sha256 checked before loading
    recipe = base_recipe(run_dir, config, weights)
    spec = recipe.spec
    if not recipe.backbone.is_network:
        raise FeatcacheError(f"{run_dir}: the pixels base has no layers to fine-tune")
    if not recipe.backbone.boundary_layer:
        raise FeatcacheError(f"{run_dir}: base {spec.backbone!r} has no single-tensor freeze boundary; "
                             "it cannot be fine-tuned by featcache")
    if spec.layer != "output":
        raise FeatcacheError(f"{run_dir}: the head was trained on layer {spec.layer!r}; fine-tuning needs a head "
                             "trained on the base's output (extract without --layer)")
    if spec.augment != "none":
        raise FeatcacheError(f"{run_dir}: trained on augmented views; fine-tune a head trained on plain features")
    return config, head, recipe


def find_boundary_set(store: str, spec: KeySpec, boundary: str, image_root: str, weights_arg: str = "none"):
    """The name of the feature set in ``store`` holding the boundary activations of ``spec``'s base."""
    want = replace(spec, layer=boundary, pooling="none", augment="none")
    if not os.path.exists(store):
        raise FeatcacheError(f"{store}: no such store")
    with open_store(store) as s:
        for name in s.feature_set_names():
            got = s[name].spec
            if replace(got, dtype=want.dtype, format_version=want.format_version) == want:
                return name
    raise FeatcacheError(
        f"{store}: no boundary activations of this base ({spec.backbone} layer {boundary}, size {spec.input_size}, "
        f"precision {spec.precision}); create them with: featcache extract {image_root or 'IMAGE_DIR'} {store} "
        f"--base {spec.backbone} --size {spec.input_size} --weights {weights_arg} --layer {boundary} "
        f"--precision {spec.precision}")


def _boundary_data(store: str, name: str, digests) -> np.ndarray:
    with open_store(store) as s:
        fs = s[name]
        rows = fs.rows()
        by_digest = dict(zip(fs.column("digests")[rows], rows))
        missing = [d for d in digests if d not in by_digest]
        if missing:
            raise FeatcacheError(f"{store}: feature set {name} lacks {len(missing)} of the run's images; "
                                 "run the extract command again to add them")
        want = np.array([by_digest[d] for d in digests], np.int64)
        order = np.argsort(want)
        x = np.empty((len(want),) + fs.feature_shape, np.float32)
        x[order] = fs.read(want[order]).astype(np.float32)
        return x


class _EpochTimes:
    def __new__(cls):
        import keras

        class Timer(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.seconds = []

            def on_epoch_begin(self, epoch, logs=None):
                self._t = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.seconds.append(time.perf_counter() - self._t)

        return Timer()


def _proba(model, x, binary: bool, batch: int = 64) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, 2 if binary else 1))
    p = np.asarray(model.predict(x, batch_size=batch, verbose=0), np.float64)
    if binary:
        p = p.reshape(-1)
        return np.column_stack([1 - p, p])
    return p


def finetune(image_dir: str | None, run_dir: str, out: str, blocks: int = 1, unfreeze: str = "top",
             unfreeze_from: str | None = None, lr: float = 1e-5, epochs: int = 5, batch_size: int = 20,
             augment: str | None = None, aug_seed: int = 0, from_cache: str | None = None, weights: str | None = None,
             seed: int = 0, report: bool = True) -> dict:
    """Train the run's dense head with the part of its base that ``unfreeze`` names (none, top,
    from:LAYER, all; ``unfreeze_from`` is the older spelling of from:LAYER); writes the run
    directory ``out`` and, unless ``report`` is False, its HTML report ``out/report.html``."""
    import keras

    from ...extract.images.augment import make_layers, parse_recipe

    started = time.perf_counter()
    mode, layer_from = parse_unfreeze(unfreeze, unfreeze_from)
    unfreeze = f"from:{layer_from}" if mode == "from" else mode
    config, head, recipe = load_stage_two(run_dir, weights)
    spec, backbone = recipe.spec, recipe.backbone
    if lr <= 0 or epochs < 1 or batch_size < 1:
        raise FeatcacheError("--lr, --epochs, --batch-size: must be positive")
    recipe_aug = parse_recipe(augment) if augment else {}
    if from_cache and recipe_aug:
        raise FeatcacheError("--augment: image augmentation cannot run from cached boundary activations; "
                             "leave out --from-cache (or --augment)")
    record = config["feature_set"]
    image_dir = image_dir or record.get("image_root")
    paths, digests, labels, splits = _rows_of_run(config)
    boundary_name = None
    if from_cache:
        boundary_name = find_boundary_set(from_cache, spec, backbone.boundary_layer, record.get("image_root", ""),
                                          record.get("weights_arg") or "none")
    elif not image_dir or not os.path.isdir(image_dir):
        raise FeatcacheError(f"{image_dir}: image folder not found (give IMAGE_DIR)")
    out = rundir.prepare(out)

    keras.utils.set_random_seed(seed)
    models = build_models(recipe, head, blocks, unfreeze, make_layers(recipe_aug, aug_seed) if recipe_aug else ())
    if from_cache and models.top is None:
        raise FeatcacheError(f"--unfreeze {unfreeze}: trains layers at or below the boundary "
                             f"{backbone.boundary_layer}; the cache holds activations above it (leave out --from-cache)")
    model = models.top if from_cache else models.full
    k = len(record["class_names"])
    binary = k == 2
    data_started = time.perf_counter()
    if from_cache:
        x = _boundary_data(from_cache, boundary_name, digests)
    else:
        x = _decode_all(image_dir, paths, spec.input_size, spec.resize)
    data_seconds = time.perf_counter() - data_started
    part = {s: np.flatnonzero(splits == s) for s in SPLITS}
    y = labels.astype(np.float32 if binary else np.int32)

    # Counted now: freezing the saved model at the end turns every shared layer off.
    trainable_weights = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    before = {s: reports.score(labels[i], _proba(model, x[i], binary), k) for s, i in part.items() if len(i)}
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=lr),
                  loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy", metrics=["accuracy"])
    timer = _EpochTimes()
    fit_args = {}
    if len(part["validation"]):
        fit_args["validation_data"] = (x[part["validation"]], y[part["validation"]])
    if not len(part["train"]):
        raise FeatcacheError(f"{run_dir}: the training split is empty")
    t0, c0 = time.perf_counter(), time.process_time()
    history = model.fit(x[part["train"]], y[part["train"]], batch_size=batch_size, epochs=epochs, shuffle=True,
                        callbacks=[timer], verbose=0, **fit_args)
    fit_seconds, fit_cpu = time.perf_counter() - t0, time.process_time() - c0
    history = {key: [float(v) for v in values] for key, values in history.history.items()}
    names = record["class_names"]
    probas = {s: _proba(model, x[i], binary) for s, i in part.items() if len(i)}
    evaluated = {s: reports.metrics(labels[part[s]], p, names) for s, p in probas.items()}

    # The saved model: end to end (images in), binary as (N, 2) like `featcache export`.
    from ..graph.layers import two_class

    final = models.full
    if binary:
        final = keras.Model(final.inputs, two_class(keras, final.output), name="featcache_finetune")
    final.trainable = False
    model_path = os.path.join(out, "model.keras")
    final.save(model_path)
    val_acc = evaluated.get("validation", {}).get("accuracy")
    overfitting = reports.overfitting(history, evaluated["train"]["accuracy"], val_acc)
    settings = {"unfreeze": unfreeze, "blocks": blocks, "unfreeze_from": layer_from,
                "batchnorm": "trained (random-init base, all layers)" if models.train_bn else "frozen (inference mode)",
                "lr": lr, "epochs": epochs,
                "batch_size": batch_size, "optimizer": "rmsprop", "augment": recipe_aug or None,
                "aug_seed": aug_seed if recipe_aug else None, "seed": seed,
                "source": "cache" if from_cache else "images"}
    config_out = {
        "kind": "finetune", "head": "finetune", "settings": settings, "seed": seed,
        "stage_two_run": os.path.abspath(run_dir),
        "stage_two_settings": config["settings"], "feature_set": record,
        "image_root": os.path.abspath(image_dir) if image_dir else None,
        "boundary": {"layer": backbone.boundary_layer, "store": os.path.abspath(from_cache) if from_cache else None,
                     "feature_set": boundary_name},
        "trainable_layers": models.trainable, "trainable_parameters": trainable_weights,
        "model": {"input": "RGB float 0..255, decoded and resized (Pillow, " + spec.resize + ")"},
    }
    metrics_out = {
        "kind": "finetune", "head": "finetune", "feature_set": record["name"], "class_names": names,
        "before": before, **evaluated,
        "overfitting": overfitting, "fit_seconds": fit_seconds, "fit_cpu_seconds": fit_cpu,
        "epoch_seconds": timer.seconds, "data_seconds": data_seconds,
    }
    title = f"fine-tuned {spec.backbone} (--unfreeze {unfreeze}, from {settings['source']})"
    rundir.write_run(out, config_out, metrics_out, history, title, model_path=model_path)

    report_path = None
    if report:  # from the probabilities just computed: no second pass over the images
        from ..report.run_data import SplitPredictions
        from ..report.run_page import write_report

        shown = "test" if len(part["test"]) else "validation"
        given = None
        if shown in probas:
            source = (f"the fine-tuned top block and head on the cached boundary activations of {from_cache}"
                      if from_cache else f"the fine-tuned model on the images of {image_dir}")
            given = SplitPredictions(shown, list(names), paths[part[shown]], labels[part[shown]], probas[shown],
                                     image_dir, source)
        report_path = write_report(out, split=shown, predictions=given)["report"]

    return {
        "run_dir": out, "stage_two_run": run_dir, "unfreeze": unfreeze, "batchnorm": settings["batchnorm"],
        "source": settings["source"], "feature_set": record["name"],
        "boundary_feature_set": boundary_name, "trainable_layers": models.trainable,
        "trainable_parameters": trainable_weights, "before": before,
        **{s: reports.summary(evaluated.get(s)) for s in SPLITS}, "overfitting": overfitting,
        "epochs": epochs, "epoch_seconds": [round(t, 3) for t in timer.seconds],
        "seconds": round(fit_seconds, 3), "data_seconds": round(data_seconds, 3),
        "report": report_path, "seconds_total": round(time.perf_counter() - started, 3),
    }
