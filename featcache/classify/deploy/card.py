"""The model card: a small JSON file beside every export, and the labels file.

It says what a deployment needs to feed the model and read its output (class names, input
size, dtype, range, channel order, how images are decoded and resized), where the model came
from (the run, its feature-set key(s) and weights identity) and how good it is: the run's
test metrics and the test accuracy of the exported file itself, measured by running it.

Beside a file OUT: ``OUT.card.json`` and ``OUT.labels.txt`` (one class name per line, line i
is output column i). Inside a SavedModel folder: ``model_card.json`` and ``labels.txt``.
"""
from __future__ import annotations

import json
import os
import time

from ...version import __version__
from ...errors import FeatcacheError
from ..runs import run_dir as rundir

CARD_FORMAT = 1
IN_FOLDER = ("model_card.json", "labels.txt")

DECODING = ("Pillow, as featcache extract decodes: EXIF orientation applied, the first frame of animated "
            "images, alpha composited on white, 16-bit images scaled to 8 bits, converted to RGB, then resized "
            "to size x size (the aspect ratio is not kept, no crop)")
PREPROCESS_IN_MODEL = {
    "tf": "x / 127.5 - 1 (keras.applications 'tf' mode)",
    "caffe": "RGB -> BGR, minus the ImageNet mean (keras.applications 'caffe' mode)",
    "torch": "x / 255, minus the ImageNet mean, divided by its std (keras.applications 'torch' mode)",
    "scale01": "x / 255",
    "none": "none outside the base (the base's own rescaling layers are inside it)",
}


def companion_paths(out: str, fmt: str) -> tuple[str, str]:
    """(card, labels) paths of an export."""
    if fmt == "savedmodel":
        return os.path.join(out, IN_FOLDER[0]), os.path.join(out, IN_FOLDER[1])
    return out + ".card.json", out + ".labels.txt"


def write_labels(path: str, class_names: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(name + "\n" for name in class_names))


def model_input(fmt: str, quantize: str, size: int, resize: str) -> dict:
    return {
        "shape": [None, size, size, 3], "layout": "NHWC (batch, height, width, channels)", "channels": "RGB",
        "dtype": "uint8" if quantize == "int8" else "float32", "range": [0, 255],
        "size": size, "resize": resize, "decoding": DECODING,
        "batch": "any (a .tflite file's batch dimension is resized by the interpreter)" if fmt == "tflite" else "any",
    }


def feature_set_records(records: list[dict]) -> list[dict]:
    """What the card says of the feature sets a run reads (or, for a fine-tuned run, was made from)."""
    keep = ("name", "key", "digest", "class_names", "feature_shape", "store", "image_root", "weights_arg", "rows")
    return [{k: r.get(k) for k in keep} for r in records]


def run_metrics(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, rundir.METRICS)
    try:
        with open(path) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        return None
    return metrics.get("test")


def build(*, run_dir: str, config: dict, records: list[dict], inputs: list[dict], fmt: str, quantize: str, model_path: str, labels_path: str,
          size: int, resize: str, preprocessing: str, precision: dict, conversion: dict, signatures: dict | None,
          measured: dict) -> dict:
    records = feature_set_records(records)
    names = rundir.class_names(config)
    card = {
        "featcache_model_card": CARD_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "featcache_version": __version__,
        "model": {"file": os.path.basename(os.path.normpath(model_path)), "format": fmt, "quantization": quantize,
                  "bytes": model_bytes(model_path, fmt),
                  "sha256": model_digest(model_path, fmt)},
        "class_names": names,
        "labels_file": os.path.basename(labels_path),
        "input": model_input(fmt, quantize, size, resize),
        # Every image input by name (a .keras export of a run reading several sizes has one per
        # size, in this order); ``input`` describes the first.
        "inputs": inputs,
        "output": {"shape": [None, len(names)], "dtype": "float32",
                   "meaning": "class probabilities (summing to 1), column i is class_names[i]"},
        "preprocessing": {"outside_the_model": f"decode to RGB and resize to {size}x{size} with Pillow's {resize} "
                                               "filter, as featcache extract does (input.decoding)",
                          "inside_the_model": "; ".join(PREPROCESS_IN_MODEL.get(p, p) for p in preprocessing.split("+"))},
        "conversion": conversion,
        "precision": precision,
        "run": {"dir": os.path.abspath(run_dir), "head": config["head"], "settings": config.get("settings"),
                "seed": config.get("seed"), "created": config.get("created")},
        "feature_sets": records,
        "weights": [{"identity": r["key"]["weights"], "argument": r.get("weights_arg")} for r in records],
        "run_test_metrics": run_metrics(run_dir),
        "exported_test": measured,
    }
    if signatures:
        card["signatures"] = signatures
    return card


def model_bytes(path: str, fmt: str) -> int:
    if fmt != "savedmodel":
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(path) for n in files
               if n not in IN_FOLDER)


def model_digest(path: str, fmt: str) -> str:
    """sha256 of the file; of a SavedModel folder, sha256 over its files' relative paths and
    sha256s (sorted), the card and labels left out."""
    if fmt != "savedmodel":
        return rundir.sha256_file(path)
    import hashlib

    lines = []
    for folder, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            rel = os.path.relpath(os.path.join(folder, name), path).replace(os.sep, "/")
            if rel not in IN_FOLDER:
                lines.append(f"{rundir.sha256_file(os.path.join(folder, name))}  {rel}")
    return hashlib.sha256("\n".join(sorted(lines, key=lambda l: l[66:])).encode()).hexdigest()


def write(path: str, card: dict) -> None:
    rundir.write_json(path, card)


def read(model_path: str, fmt: str) -> dict:
    """The card of an exported model, checked for what predict needs."""
    path, _ = companion_paths(model_path, fmt)
    if not os.path.isfile(path):
        raise FeatcacheError(f"{model_path}: its model card {path} is missing (it holds the class names and how "
                             "images are decoded; export again, or copy it along with the model)")
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
        names = card["class_names"]
        if not card.get("head_only"):  # an image model: how its images are decoded
            int(card["input"]["size"]), str(card["input"]["resize"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FeatcacheError(f"{path}: not a featcache model card ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(names, list) or not names:
        raise FeatcacheError(f"{path}: no class names")
    if int(card.get("featcache_model_card", 0)) > CARD_FORMAT:
        raise FeatcacheError(f"{path}: model card format {card['featcache_model_card']} is newer than this featcache; upgrade it")
    return card
