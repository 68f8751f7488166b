"""One Keras model from a run: preprocessing, frozen base, pooling and head; and ``export``,
which writes it as a .keras file, a TensorFlow Lite file or a SavedModel, each with its labels
and model card.

Built from built-in layers only (no Lambda), so plain ``keras.models.load_model`` loads it in
its default safe mode. Input: (size, size, 3) float RGB images already decoded and resized,
values 0..255 (what ``predict`` gets from Pillow). Output: (N, K) class probabilities, the
same as ``featcache predict``. The converters take whatever :func:`build` returns.
"""
from __future__ import annotations

import os
import shutil
import time

import numpy as np

from ..errors import FeatcacheError
from . import rundir
from .predict import base_recipe
from .run_images import feature_set_record

CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # keras.applications imagenet_utils, caffe mode
TORCH_MEAN, TORCH_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torch mode


def _fixed_dense(keras, x, kernel, bias, name, activation=None):
    """A frozen Dense layer with given weights: how fixed linear maps are written without Lambda."""
    layer = keras.layers.Dense(kernel.shape[1], activation=activation, name=name, trainable=False)
    y = layer(x)
    layer.set_weights([np.asarray(kernel, np.float32), np.asarray(bias, np.float32)])
    return y


def preprocessing(keras, x, flavour: str):
    """keras.applications preprocess_input modes as layers (inputs: RGB 0..255)."""
    if flavour == "tf":  # x / 127.5 - 1
        return keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess_tf")(x)
    if flavour == "caffe":  # RGB -> BGR, minus the ImageNet mean: one fixed 3x3 map on the channel axis
        return _fixed_dense(keras, x, np.eye(3)[::-1], -np.array(CAFFE_MEAN_BGR), "preprocess_caffe")
    if flavour == "torch":  # x / 255, then (x - mean) / std
        x = keras.layers.Rescaling(1 / 255.0, name="preprocess_scale")(x)
        return keras.layers.Normalization(mean=TORCH_MEAN, variance=np.square(TORCH_STD).tolist(),
                                          name="preprocess_torch")(x)
    if flavour == "scale01":  # the pixels base
        return keras.layers.Rescaling(1 / 255.0, name="preprocess_scale01")(x)
    if flavour == "none":  # the rescaling layers are inside the base
        return x
    raise FeatcacheError(f"preprocessing {flavour!r}: cannot be exported")


def _pool(keras, x, pooling: str, name: str):
    if pooling == "none" or len(x.shape) != 4:
        return x
    layer = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
    return layer(name=name)(x)


def _two_class(keras, p):
    """(N, 1) sigmoid -> (N, 2) [1 - p, p], as predict reports binary heads."""
    return _fixed_dense(keras, p, np.array([[-1.0, 1.0]]), np.array([1.0, 0.0]), "two_class")


def _logreg_layers(keras, x, head):
    """StandardScaler + linear classifier folded into Dense layers (computed in float64)."""
    from sklearn.linear_model import LogisticRegression

    x = _pool(keras, x, head.effective_pool(), "head_pool")
    if len(x.shape) > 2:
        x = keras.layers.Flatten(name="head_flatten")(x)
    scaler, clf = head.pipeline[0], head.pipeline[-1]
    w = clf.coef_ / scaler.scale_  # (C, F): logits = (x - mean) / scale @ coef.T + b
    b = clf.intercept_ - w @ scaler.mean_
    if w.shape[0] == 1:  # binary: sigmoid of one logit
        return _two_class(keras, _fixed_dense(keras, x, w.T, b, "logreg", activation="sigmoid"))
    if isinstance(clf, LogisticRegression):  # multinomial: softmax
        return _fixed_dense(keras, x, w.T, b, "logreg", activation="softmax")
    # SGDClassifier (streamed training) is one-vs-rest: p_k = sigmoid(z_k) / sum_j sigmoid(z_j)
    # = softmax(log sigmoid(z)), and log sigmoid(z) = -softplus(-z).
    z = _fixed_dense(keras, x, -w.T, -b, "logreg_neg_logits", activation="softplus")
    k = w.shape[0]
    return _fixed_dense(keras, z, -np.eye(k), np.zeros(k), "logreg_ovr", activation="softmax")


def build(run_dir: str, weights: str | None = None, precision: str | None = None):
    """The end-to-end keras.Model of a run (not saved). ``precision`` rebuilds the base in
    another compute precision than the extraction's (the converters want fp32)."""
    import keras

    from ..extract.model import build_frozen_base

    config = rundir.read_config(run_dir)
    if config["head"] == "finetune":  # the run's model.keras is already end to end
        path = rundir.verify_model(run_dir, config)
        model = keras.saving.load_model(path, safe_mode=True, compile=False)
        model.trainable = False
        return config, model
    config, head = rundir.load_head(run_dir)
    recipe = base_recipe(run_dir, config, weights)
    spec = recipe.spec
    inputs = keras.Input((spec.input_size, spec.input_size, 3), name="image")
    x = preprocessing(keras, inputs, spec.preprocessing)
    if recipe.backbone.is_network:
        base = build_frozen_base(recipe.backbone, spec.input_size, recipe.weights, recipe.layer,
                                 precision or spec.precision, recipe.seed)
        x = base(x)
    x = _pool(keras, x, spec.pooling, "feature_pool")
    if config["head"] == "dense":
        x = head.model(x)
        if head.binary:
            x = _two_class(keras, x)
    else:
        x = _logreg_layers(keras, x, head)
    model = keras.Model(inputs, x, name="featcache_" + config["head"])
    model.trainable = False
    return config, model


# -- writing an export ----------------------------------------------------------------------------

FORMATS = ("keras", "tflite", "savedmodel")
SUFFIX_FORMATS = {".keras": "keras", ".tflite": "tflite", "": "savedmodel"}
DEFAULT_CALIBRATION_IMAGES = 300


def export_format(out: str, fmt: str | None) -> str:
    """The format asked for, or the one OUT's name implies (.keras, .tflite, no extension: a
    SavedModel folder), checked against each other."""
    suffix = os.path.splitext(out.rstrip("/" + os.sep))[1].lower()
    if fmt is None:
        if suffix not in SUFFIX_FORMATS:
            raise FeatcacheError(f"{out}: cannot tell the format from the name; end it in .keras or .tflite, or give "
                                 "--format savedmodel (a SavedModel is a folder)")
        return SUFFIX_FORMATS[suffix]
    if fmt not in FORMATS:
        raise FeatcacheError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    if fmt in ("keras", "tflite") and suffix != "." + fmt:
        raise FeatcacheError(f"{out}: the exported file name must end in .{fmt}")
    if fmt == "savedmodel" and suffix in (".keras", ".tflite"):
        raise FeatcacheError(f"{out}: a SavedModel is a folder; name it without the {suffix} extension")
    return fmt


def _check_targets(paths) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise FeatcacheError(f"{path}: exists; choose another file name (exports are never overwritten)")
    parent = os.path.dirname(os.path.abspath(paths[0]))
    if not os.path.isdir(parent):
        raise FeatcacheError(f"{paths[0]}: folder {parent} does not exist")


def calibration_images(config: dict, size: int, resize: str, count: int, seed: int = 0):
    """(images, record): ``count`` training images of the run's store, drawn with ``seed``,
    decoded as extract decoded them."""
    from .run_images import decode_paths, split_images

    if count < 1:
        raise FeatcacheError(f"--calibration-images {count}: must be at least 1")
    try:
        paths, _ = split_images(config, "train")
    except FeatcacheError as exc:
        raise FeatcacheError(f"--quantize int8: calibration needs the run's training images: {exc}") from None
    if not paths:
        raise FeatcacheError("--quantize int8: the run's training split is empty; nothing to calibrate on")
    chosen = np.sort(np.random.default_rng(seed).choice(len(paths), min(count, len(paths)), replace=False))
    images, good, failures = decode_paths([paths[i] for i in chosen], size, resize)
    if not len(good):
        first = failures[0]
        raise FeatcacheError(f"--quantize int8: none of the {len(chosen)} calibration images could be read "
                             f"(first: {first['path']}: {first['reason']})")
    return images, {"split": "train", "requested": count, "images": int(len(good)), "unreadable": len(failures),
                    "seed": seed, "decoded_like_extract": True, "input_range_pinned": [0, 255]}


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _write_model(model, fmt: str, out: str, config: dict, quantize: str, calibration, run_dir: str) -> dict:
    """Write the model file or folder at ``out`` (through a temporary name beside it)."""
    from . import deploy_savedmodel, deploy_tflite

    record = feature_set_record(config)
    spec = record["key"]
    parent = os.path.dirname(os.path.abspath(out))
    if fmt == "savedmodel":
        import tempfile

        tmp = tempfile.mkdtemp(prefix=".featcache-export-", dir=parent)
        os.rmdir(tmp)  # the SavedModel writer creates it
        try:
            deploy_savedmodel.write(model, tmp, record["class_names"], spec["input_size"], spec["resize"])
            os.rename(tmp, out)
        finally:
            _remove(tmp)
        return deploy_savedmodel.signatures_record()
    tmp = out + ".partial"
    try:
        if fmt == "keras":
            model.save(tmp + ".keras")  # Keras wants the extension
            os.rename(tmp + ".keras", tmp)
        else:
            content = deploy_tflite.convert(model, quantize, calibration, what=run_dir)
            with open(tmp, "wb") as f:
                f.write(content)
        os.rename(tmp, out)
    finally:
        _remove(tmp)
        _remove(tmp + ".keras")
    return {}


def export(run_dir: str, out: str, weights: str | None = None, format: str | None = None, quantize: str = "none",
           calibration_images_count: int = DEFAULT_CALIBRATION_IMAGES, evaluate: bool = True) -> dict:
    """Write the run as a deployable model ``out`` (format from --format or the name), its
    labels and its model card; measure the written file on the run's test split."""
    from . import deployed, model_card
    from .deploy_tflite import QUANTIZATIONS

    started = time.perf_counter()
    out = os.fspath(out).rstrip("/" + os.sep) or os.fspath(out)
    fmt = export_format(out, format)
    if quantize not in QUANTIZATIONS:
        raise FeatcacheError(f"--quantize {quantize!r}: choose from {', '.join(QUANTIZATIONS)}")
    if quantize != "none" and fmt != "tflite":
        raise FeatcacheError(f"--quantize {quantize}: only for TensorFlow Lite exports (.tflite)")
    card_path, labels_path = model_card.companion_paths(out, fmt)
    _check_targets([out] + ([card_path, labels_path] if fmt != "savedmodel" else []))
    if not os.path.isdir(run_dir):
        raise FeatcacheError(f"{run_dir}: no such run directory")

    # .keras keeps the extraction's compute precision (bit-for-bit the features the head saw);
    # the deployment formats get a float32 base: TensorFlow Lite has no bf16/fp16 mixed kernels.
    config, model = build(run_dir, weights, precision=None if fmt == "keras" else "fp32")
    record = feature_set_record(config)
    spec = record["key"]
    size, resize, names = spec["input_size"], spec["resize"], record["class_names"]
    calibration, conversion = None, {"format": fmt, "quantization": quantize}
    if quantize == "int8":
        calibration, conversion["calibration"] = calibration_images(config, size, resize, calibration_images_count)
    written = [out]
    try:
        signatures = _write_model(model, fmt, out, config, quantize, calibration, run_dir)
        written += [labels_path, card_path]
        model_card.write_labels(labels_path, names)
        if evaluate:
            runner = deployed.load_runner(out, fmt)
            measured = deployed.measure(runner, config, size, resize, names,
                                        reference=model if quantize != "none" else None)
        else:
            measured = {"measured": False, "reason": "export --no-evaluate"}
        # Fine-tuned models were trained with a float32 base whatever the extraction's precision.
        as_extracted = fmt == "keras" and config["head"] != "finetune"
        precision = {"features_extracted": spec["precision"], "exported_base": spec["precision"] if as_extracted else "fp32"}
        card = model_card.build(run_dir=run_dir, config=config, fmt=fmt, quantize=quantize, model_path=out,
                                labels_path=labels_path, size=size, resize=resize, preprocessing=spec["preprocessing"],
                                precision=precision, conversion=conversion, signatures=signatures or None,
                                measured=measured)
        model_card.write(card_path, card)
    except BaseException:
        for path in written:  # no half export: the model without its card and labels
            _remove(path)
        raise
    warnings = []
    reference = measured.get("float_model")
    if reference and measured["accuracy"] < reference["accuracy"] - 0.01:
        warnings.append(f"{quantize} accuracy {measured['accuracy']:.4f} is more than 1 point below the float "
                        f"model's {reference['accuracy']:.4f} on the same {measured['n']} test images")
    if evaluate and not measured["measured"]:
        warnings.append(f"the exported file's test accuracy was not measured: {measured['reason']}")
    dtype = card["input"]["dtype"]
    return {
        "run_dir": run_dir, "out": out, "format": fmt, "quantize": quantize,
        "input_shape": [size, size, 3], "input_dtype": dtype,
        "input": f"RGB {'float' if dtype == 'float32' else dtype} 0..255, decoded and resized (Pillow, {resize})",
        "class_names": names, "parameters": int(model.count_params()),
        "bytes": card["model"]["bytes"], "sha256": card["model"]["sha256"],
        "labels": labels_path, "card": card_path, "signatures": sorted(signatures) if signatures else None,
        "calibration": conversion.get("calibration"),
        "run_test_accuracy": (card["run_test_metrics"] or {}).get("accuracy"),
        "exported_test": {k: v for k, v in measured.items() if k not in ("confusion_matrix", "per_class")},
        "warnings": warnings, "seconds": round(time.perf_counter() - started, 3),
    }
