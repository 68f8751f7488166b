"""One Keras model from any run: preprocessing, frozen bases, pooling and heads.

:func:`build` is the single place that builds the end-to-end model of a run of any kind
(head, fused, finetune, ensemble; see runs/kinds.py); deploy/export.py writes and converts what it returns.
Built from built-in layers only (:mod:`.layers`), so plain ``keras.models.load_model`` loads
it in its default safe mode; each run kind adds its own part (``Run.probabilities_tensor``).
Output: (N, K) class probabilities, the same as ``featcache predict``.

Inputs: (size, size, 3) float RGB images already decoded and resized, values 0..255 (what
``predict`` gets from Pillow), one input per distinct (size, resize) among the feature sets
the run reads: named ``image`` when there is one (every single-base run), else
``image_<size>`` in increasing size. Resizing stays outside the model on purpose: Pillow's
antialiased resize is what the features were cached from, and no Keras layer reproduces it
exactly, so one input per size keeps the model equal to ``predict``. Every distinct base
network (backbone, weights, size, resize, preprocessing, precision) is built once, as a
sub-model named ``base_<backbone>_<size>`` with one output per cached layer; ensemble members
are sub-models ``member_<i>_<kind>`` whose outputs are scaled by their weights
(``Rescaling``) and summed (``Add``).
"""
from __future__ import annotations

from .layers import pool, preprocessing


def input_names(sizes: list) -> dict:
    """{ImageInput: Keras input name}: ``image`` when a run reads one image size, else
    ``image_<size>`` (``image_<size>_<resize>`` where one size comes with two resize methods)."""
    if len(sizes) == 1:
        return {sizes[0]: "image"}
    clash = {s.size for s in sizes if sum(t.size == s.size for t in sizes) > 1}
    return {s: f"image_{s.size}" + (f"_{s.resize.replace('+', '_')}" if s.size in clash else "") for s in sizes}


def feature_tensors(keras, run, recipes: dict, images: dict, precision: str | None = None) -> dict:
    """{feature-set name: tensor}: each distinct base network built once (one sub-model with
    its preprocessing and an output per cached layer), then each set's extraction pooling.
    ``precision`` overrides the extraction's compute precision (the converters want fp32)."""
    from ...extract.bases.feature_model import build_frozen_base
    from ..runs.kinds import ImageInput

    groups: dict[tuple, list[dict]] = {}
    for record in run.feature_sets:
        groups.setdefault(recipes[record["name"]].network, []).append(record)
    tensors, used = {}, set()
    for records in groups.values():
        recipe = recipes[records[0]["name"]]
        spec = recipe.spec
        layers = list(dict.fromkeys(recipes[r["name"]].spec.layer for r in records))
        image = keras.Input((spec.input_size, spec.input_size, 3), name="image")
        x = preprocessing(keras, image, spec.preprocessing)
        if recipe.backbone.is_network:
            base = build_frozen_base(recipe.backbone, spec.input_size, recipe.weights, layers,
                                     precision or spec.precision,
                                     recipe.seed)
            outputs = base(x)
            outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        else:  # pixels: the preprocessed image is the feature
            outputs = [x]
        name = f"base_{spec.backbone}_{spec.input_size}".replace(".", "_")
        while name in used:
            name += "_"
        used.add(name)
        block = keras.Model(image, outputs, name=name)
        out = block(images[ImageInput(spec.input_size, spec.resize)])
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        by_layer = dict(zip(layers, out))
        for record in records:
            r = recipes[record["name"]].spec
            pool_name = "feature_pool" if len(run.feature_sets) == 1 else f"feature_pool_{len(tensors)}"
            tensors[record["name"]] = pool(keras, by_layer[r.layer], r.pooling, pool_name)
    return tensors


def build(run_dir: str, weights: str | None = None, precision: str | None = None, run=None):
    """(run, keras.Model, [(input name, ImageInput)]) of any run: images in (one input per
    distinct (size, resize) the run reads, named by :func:`input_names`), class probabilities
    out. Not saved. ``precision`` rebuilds the frozen bases in another compute precision than
    the extraction's (fine-tuned models keep theirs); ``run``: the run, if already loaded."""
    import keras

    from .base_recipe import recipes_for
    from ..runs.kinds import load_run

    run = run or load_run(run_dir)
    recipes = recipes_for(run.feature_sets, run_dir, weights)
    sizes = run.decoded_inputs
    names = input_names(sizes)
    images = {s: keras.Input((s.size, s.size, 3), name=names[s]) for s in sizes}
    features = feature_tensors(keras, run, recipes, images, precision)
    outputs = run.probabilities_tensor(keras, features, images)
    inputs = [images[s] for s in sizes]
    model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name="featcache_" + run.kind)
    model.trainable = False
    return run, model, [(names[s], s) for s in sizes]
