"""Any run end to end on new images: decode and resize with Pillow exactly as extraction did,
run every frozen base the run reads (rebuilt from the recorded keys and weights), then the
run's heads (or its fine-tuned model, or its weighted members: see runs.py). An exported model
(.tflite, .keras, SavedModel folder) runs as deployed, with the size, resize and class names of
its card."""
from __future__ import annotations

import os

import numpy as np

from ...errors import FeatcacheError
from ...extract.images.decode import DecodeError, decode_image, read_bytes
from ...extract.images.discover import IMAGE_EXTENSIONS


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


def feature_models(run, recipes: dict) -> dict:
    """{feature-set name: (FeatureModel, storage dtype, ImageInput)}: one model per distinct
    base, layer and pooling, shared by feature sets that differ only in storage dtype."""
    from ...extract.bases.feature_model import FeatureModel
    from ..runs.kinds import ImageInput

    built, out = {}, {}
    for record in run.feature_sets:
        recipe = recipes[record["name"]]
        spec = recipe.spec
        if recipe.compute_spec not in built:
            built[recipe.compute_spec] = FeatureModel(recipe.backbone, spec.input_size, recipe.weights, recipe.layer,
                                                      spec.pooling, spec.precision, recipe.seed)
        out[record["name"]] = (built[recipe.compute_spec], spec.dtype, ImageInput(spec.input_size, spec.resize))
    return out


class _Exported:
    """An exported model with its card, behind the same two calls predict makes on a run."""

    def __init__(self, path: str, fmt: str, weights: str | None):
        from .run_exported import load
        from ..runs.kinds import ImageInput

        if weights:
            raise FeatcacheError(f"--weights: {path} is an exported model; its base is inside it")
        card, self.runner = load(path, fmt)
        if card.get("head_only"):
            raise FeatcacheError(f"{path}: a head-only export takes cached features, not images: "
                                 "featcache predict EXPORT --features STORE")
        self.class_names = card["class_names"]
        self.inputs = [ImageInput(int(i["size"]), str(i["resize"])) for i in card.get("inputs") or [card["input"]]]
        source = (card.get("feature_sets") or [{}])[0]
        self.about = {"kind": "exported", "head": card.get("run", {}).get("head"), "feature_set": source.get("name"),
                      "model": {"format": fmt, "quantization": card.get("model", {}).get("quantization")}}

    def proba(self, features, images):
        arrays = [images[i] for i in self.inputs]
        return self.runner.predict_proba(arrays[0] if len(arrays) == 1 else arrays)


def predict(run_dir: str, inputs, top_k: int = 1, weights: str | None = None, batch_size: int = 32,
            features: str | None = None) -> dict:
    """Class probabilities for images, from any kind of run (head, fused, fine-tuned, ensemble)
    or an exported model (.tflite, .keras, SavedModel folder). Returns {class_names,
    predictions: [{path, predicted, probability, top: [{class, probability}]}], failures:
    [{path, reason}]}."""
    from .run_exported import format_of
    from ..graph.base_recipe import recipes_for
    from ..runs.kinds import load_run

    run_dir = os.fspath(run_dir)
    if top_k < 1:
        raise FeatcacheError(f"--top-k {top_k}: must be at least 1")
    fmt = format_of(run_dir)
    if features is not None:  # a head-only export over a store's rows
        from .head_only import predict_stored

        if fmt is None:
            raise FeatcacheError(f"--features: {run_dir} is not an exported model; export the run with --head-only")
        if inputs:
            raise FeatcacheError("--features STORE predicts the store's rows; give no image files with it")
        return predict_stored(run_dir, features, fmt, top_k)
    if not inputs:
        raise FeatcacheError("no images given (files or folders; or --features STORE for a head-only export)")
    if fmt is not None:
        run = _Exported(run_dir, fmt, weights)
        models, sizes, about = {}, sorted(set(run.inputs)), run.about
    else:
        run = load_run(run_dir)
        models = feature_models(run, recipes_for(run.feature_sets, run_dir, weights))
        sizes = run.decoded_inputs
        about = {"kind": run.kind, "head": run.config["head"], "model": run.label,
                 "feature_set": "+".join(r["name"] for r in run.feature_sets) or run.row_sets[0]["name"]}
    names = run.class_names
    top_k = min(top_k, len(names))
    paths = list_images(inputs)
    predictions, failures = [], []
    for start in range(0, len(paths), batch_size):
        good, images = [], {size: [] for size in sizes}
        for path in paths[start : start + batch_size]:
            try:
                data = read_bytes(path)
                decoded = {size: decode_image(data, size.size, size.resize) for size in sizes}
            except DecodeError as exc:
                failures.append({"path": path, "reason": str(exc)})
                continue
            good.append(path)
            for size, image in decoded.items():
                images[size].append(image)
        if not good:
            continue
        images = {size: np.stack(batch) for size, batch in images.items()}
        # Round to the storage dtype like the cache did, so each head sees what it was trained on.
        features = {name: model(images[size]).astype(dtype) for name, (model, dtype, size) in models.items()}
        proba = run.proba(features, images)
        for path, p in zip(good, proba):
            order = np.argsort(-p, kind="stable")[:top_k]
            predictions.append({
                "path": path, "predicted": names[order[0]], "probability": float(p[order[0]]),
                "top": [{"class": names[i], "probability": float(p[i])} for i in order],
            })
    return {"run_dir": run_dir, **about, "class_names": names, "predictions": predictions, "failures": failures}
