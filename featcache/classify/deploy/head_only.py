"""Head-only exports (``export RUN OUT --head-only``): the classifier alone, cached features in,
class probabilities out, for users who run the base elsewhere (a feature service, another
runtime) or serve features straight from the store; and ``predict --features STORE``, which
runs such an export over a store's rows.

The model is the run's own head part of the end-to-end model (``Run.probabilities_tensor``
on feature inputs: the dense head's layers, or the logistic regression folded into Dense
layers), written as .keras or .onnx. Its card names the feature set (and its key) each input
must come from; predict refuses a store whose feature set has another key.
"""
from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from ...errors import FeatcacheError
from ...version import __version__
from . import card as model_card

FORMATS = ("keras", "onnx")
CHUNK_ROWS = 4096  # rows read and predicted at a time


def input_names(count: int) -> list[str]:
    return ["features"] if count == 1 else [f"features_{i}" for i in range(count)]


def build_model(run):
    """keras.Model: the run's feature sets (one input each, their cached shape) -> (N, K) probabilities."""
    import keras

    if run.head_only_refusal:
        raise FeatcacheError(f"{run.run_dir}: --head-only: {run.head_only_refusal}")
    names = input_names(len(run.feature_sets))
    inputs = {r["name"]: keras.Input(tuple(r["feature_shape"]), name=n) for r, n in zip(run.feature_sets, names)}
    outputs = run.probabilities_tensor(keras, inputs, {})
    model = keras.Model(list(inputs.values()) if len(inputs) > 1 else next(iter(inputs.values())), outputs,
                        name="featcache_head")
    model.trainable = False
    return model


def measure(runner, run) -> dict:
    """The exported head's metrics on the run's test rows, read from its store."""
    from ..evaluation import metrics
    from ..rows.matched import read_rows
    from ..runs.cached import CachedInputs

    try:
        with CachedInputs([run]) as cache:
            where = cache.aligned.split("test")
            if not len(where):
                return {"measured": False, "reason": "the run has no test split"}
            arrays = [read_rows(cache.sets[cache.source[r["name"]]],
                                cache.aligned.rows[cache.source[r["name"]]][where]).astype(np.float32)
                      for r in run.feature_sets]
            labels = cache.aligned.labels[where]
    except FeatcacheError as exc:
        return {"measured": False, "reason": str(exc)}
    p = runner.predict_proba(arrays if len(arrays) > 1 else arrays[0])
    return {"measured": True, "split": "test", "rows": int(len(labels)), "source": "the run's cached test rows",
            **metrics(labels, p, run.class_names)}


def card(run, fmt: str, model_path: str, labels_path: str, measured: dict) -> dict:
    records = model_card.feature_set_records(run.feature_sets)
    names = run.class_names
    inputs = [{"name": n, "shape": [None, *r["feature_shape"]], "dtype": "float32", "feature_set": r["name"],
               "key": r["key"]} for n, r in zip(input_names(len(records)), records)]
    return {
        "featcache_model_card": model_card.CARD_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "featcache_version": __version__,
        "head_only": True,
        "model": {"file": os.path.basename(model_path), "format": fmt, "quantization": "none",
                  "bytes": model_card.model_bytes(model_path, fmt), "sha256": model_card.model_digest(model_path, fmt)},
        "class_names": names,
        "labels_file": os.path.basename(labels_path),
        "inputs": inputs,
        "input": {"kind": "cached features", **inputs[0],
                  "from": "the rows of feature set `feature_set` (its key: `key`), as featcache extract stores them "
                          "(float16 stores: cast to float32)"},
        "output": {"shape": [None, len(names)], "dtype": "float32",
                   "meaning": "class probabilities (summing to 1), column i is class_names[i]"},
        "run": {"dir": os.path.abspath(run.run_dir), "head": run.config["head"], "settings": run.config.get("settings"),
                "seed": run.config.get("seed"), "created": run.config.get("created")},
        "feature_sets": records,
        "run_test_metrics": model_card.run_metrics(run.run_dir),
        "exported_test": measured,
    }


def predict_stored(export_path: str, store: str, fmt: str, top_k: int = 1) -> dict:
    """A head-only export run over every active row of ``store``'s matching feature set(s)."""
    from ...cache.store import open_store
    from ..rows.matched import align, read_rows
    from .run_exported import load

    exported_card, runner = load(export_path, fmt)
    if not exported_card.get("head_only"):
        raise FeatcacheError(f"{export_path}: not a head-only export (it takes images); "
                             "predict it on image files, or export the run with --head-only")
    if not os.path.isfile(store):
        raise FeatcacheError(f"{store}: no such store")
    names = exported_card["class_names"]
    top_k = min(top_k, len(names))
    predictions = []
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(open_store(store))
        sets = []
        for spec in exported_card["inputs"]:
            if spec["feature_set"] not in s.feature_set_names():
                raise FeatcacheError(f"{store}: no feature set {spec['feature_set']}, which {export_path} takes "
                                     "(extract it with the same base and settings)")
            fs = s[spec["feature_set"]]
            if fs.spec.to_dict() != spec["key"]:
                raise FeatcacheError(f"{store}: feature set {spec['feature_set']} has another key than {export_path} "
                                     "was trained on")
            sets.append(fs)
        aligned = align(sets, strict=True, what="a fused head needs every feature set of the same images")
        for start in range(0, len(aligned), CHUNK_ROWS):
            piece = slice(start, start + CHUNK_ROWS)
            arrays = [read_rows(fs, rows[piece]).astype(np.float32) for fs, rows in zip(sets, aligned.rows)]
            proba = runner.predict_proba(arrays if len(arrays) > 1 else arrays[0])
            for path, split, p in zip(aligned.paths[piece], aligned.splits[piece], proba):
                order = np.argsort(-p, kind="stable")[:top_k]
                predictions.append({"path": str(path), "split": str(split) or None, "predicted": names[order[0]],
                                    "probability": float(p[order[0]]),
                                    "top": [{"class": names[i], "probability": float(p[i])} for i in order]})
    return {"run_dir": export_path, "kind": "exported", "head": exported_card["run"]["head"],
            "model": {"format": fmt, "head_only": True}, "feature_set": "+".join(i["feature_set"] for i in exported_card["inputs"]),
            "store": store, "class_names": names, "predictions": predictions, "failures": []}
