"""Base + head end to end on new images: decode and resize with Pillow exactly as extraction
did, run the frozen base (rebuilt from the run's recorded key and weights), then the head.
Other run kinds (fine-tuned) run their end-to-end model; an exported model (.tflite, .keras,
SavedModel folder) runs as deployed, with the size, resize and class names of its card."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..cache.key import KeySpec
from ..errors import FeatcacheError
from ..extract.backbones import Backbone, get_backbone
from ..extract.decode import DecodeError, decode_image, read_bytes
from ..extract.discover import IMAGE_EXTENSIONS
from ..extract.weights import WeightsSource, resolve_weights
from . import rundir


@dataclass(frozen=True)
class BaseRecipe:
    """What rebuilds the frozen base a run's features came from."""

    backbone: Backbone
    spec: KeySpec
    weights: WeightsSource
    seed: int

    @property
    def layer(self) -> str | None:
        return None if self.spec.layer == "output" else self.spec.layer


def base_recipe(run_dir: str, config: dict, weights: str | None = None) -> BaseRecipe:
    """Rebuild the base's weights source and check it is the one the features were made with.

    ``weights`` overrides the recorded weights argument (a moved file, or a store written
    before the argument was recorded)."""
    record = config["feature_set"]
    spec = KeySpec(**record["key"])
    backbone = get_backbone(spec.backbone)
    identity = spec.weights
    seed = int(identity.split("=", 1)[1]) if identity.startswith("random:seed=") else 0
    if not backbone.is_network:
        return BaseRecipe(backbone, spec, resolve_weights(backbone, None, seed), seed)
    arg = weights or record.get("weights_arg")
    if arg is None:
        if identity.startswith("imagenet:"):
            arg = "imagenet"
        elif identity.startswith("random:"):
            arg = "none"
        else:
            raise FeatcacheError(f"{run_dir}: the features were extracted with a weights file ({identity}) whose "
                                 "path was not recorded; pass --weights PATH to that file")
    try:
        source = resolve_weights(backbone, arg, seed)
    except FeatcacheError as exc:
        raise FeatcacheError(f"{exc} (needed to rebuild the base of {run_dir}; pass --weights PATH if it moved)") from None
    if source.identity != identity:
        raise FeatcacheError(f"{arg}: these weights ({source.identity}) are not the ones the features were "
                             f"extracted with ({identity}); pass --weights with the original file")
    return BaseRecipe(backbone, spec, source, seed)


def list_images(inputs) -> list[str]:
    """Files as given, folders walked recursively (image extensions only, sorted)."""
    paths = []
    for item in inputs:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = []
            for dirpath, dirnames, filenames in os.walk(item):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, n) for n in sorted(filenames)
                          if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
            if not found:
                raise FeatcacheError(f"{item}: no images in this folder")
            paths += found
        elif os.path.exists(item):
            paths.append(item)
        else:
            raise FeatcacheError(f"{item}: no such file or folder")
    return paths


def _classifier(run_dir: str, weights: str | None):
    """(proba(images uint8) -> (N, K), class names, size, resize, description) of a run
    directory or of an exported model."""
    from .deployed import format_of

    fmt = format_of(run_dir)
    if fmt is not None:  # an exported .tflite / .keras file or SavedModel folder, with its card
        from .deployed import load

        if weights:
            raise FeatcacheError(f"--weights: {run_dir} is an exported model; its base is inside it")
        card, runner = load(run_dir, fmt)
        source = (card.get("feature_sets") or [{}])[0]
        about = {"head": card.get("run", {}).get("head"), "feature_set": source.get("name"),
                 "model": {"format": fmt, "quantization": card.get("model", {}).get("quantization")}}
        return runner.predict_proba, card["class_names"], card["input"]["size"], card["input"]["resize"], about
    config = rundir.read_config(run_dir)
    record = config["feature_set"]
    spec = KeySpec(**record["key"])
    about = {"head": config["head"], "feature_set": record["name"]}
    if config["head"] not in ("dense", "logreg"):  # other run kinds: the end-to-end model
        from .export import build

        _, model = build(run_dir, weights)
        return (lambda x: np.asarray(model.predict_on_batch(x.astype(np.float32)), np.float64),
                record["class_names"], spec.input_size, spec.resize, about)
    from ..extract.model import FeatureModel

    config, head = rundir.load_head(run_dir)
    recipe = base_recipe(run_dir, config, weights)
    model = FeatureModel(recipe.backbone, spec.input_size, recipe.weights, recipe.layer, spec.pooling,
                         spec.precision, recipe.seed)
    # Round to the storage dtype like the cache did, so the head sees what it was trained on.
    return (lambda x: head.predict_proba(model(x).astype(spec.dtype)), record["class_names"], spec.input_size,
            spec.resize, about)


def predict(run_dir: str, inputs, top_k: int = 1, weights: str | None = None, batch_size: int = 32) -> dict:
    """Class probabilities for images, from a run directory or an exported model (.tflite,
    .keras, SavedModel folder). Returns {class_names, predictions: [{path, predicted,
    probability, top: [{class, probability}]}], failures: [{path, reason}]}."""
    if top_k < 1:
        raise FeatcacheError(f"--top-k {top_k}: must be at least 1")
    proba, names, size, resize, about = _classifier(os.fspath(run_dir), weights)
    top_k = min(top_k, len(names))
    paths = list_images(inputs)
    predictions, failures = [], []
    for start in range(0, len(paths), batch_size):
        good, images = [], []
        for path in paths[start : start + batch_size]:
            try:
                images.append(decode_image(read_bytes(path), size, resize))
                good.append(path)
            except DecodeError as exc:
                failures.append({"path": path, "reason": str(exc)})
        if not good:
            continue
        for path, p in zip(good, proba(np.stack(images))):
            order = np.argsort(-p, kind="stable")[:top_k]
            predictions.append({
                "path": path, "predicted": names[order[0]], "probability": float(p[order[0]]),
                "top": [{"class": names[i], "probability": float(p[i])} for i in order],
            })
    return {"run_dir": run_dir, **about, "class_names": names, "predictions": predictions, "failures": failures}
