"""One Keras model from any run: preprocessing, frozen bases, pooling and heads.

:func:`build` is the single place that builds the end-to-end model of a run of any kind
(head, fused, finetune, ensemble; see runs.py); export.py writes and converts what it returns.
Built from built-in layers only (no Lambda), so plain ``keras.models.load_model`` loads it in
its default safe mode. Output: (N, K) class probabilities, the same as ``featcache predict``.

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

import numpy as np

from ...errors import FeatcacheError

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


def _two_class(keras, p, prefix: str = ""):
    """(N, 1) sigmoid -> (N, 2) [1 - p, p], as predict reports binary heads."""
    return _fixed_dense(keras, p, np.array([[-1.0, 1.0]]), np.array([1.0, 0.0]), prefix + "two_class")


def _logreg_layers(keras, x, head, prefix: str = ""):
    """StandardScaler + linear classifier folded into Dense layers (computed in float64). A
    fused head's inputs are pooled or flattened each, then concatenated in order."""
    from sklearn.linear_model import LogisticRegression

    parts = x if isinstance(x, (list, tuple)) else [x]
    vectors = []
    for i, (part, shape) in enumerate(zip(parts, head.parts)):
        suffix = f"_{i}" if head.fused else ""
        part = _pool(keras, part, head.part_pool(shape), f"{prefix}head_pool{suffix}")
        if len(part.shape) > 2:
            part = keras.layers.Flatten(name=f"{prefix}head_flatten{suffix}")(part)
        vectors.append(part)
    x = vectors[0] if len(vectors) == 1 else keras.layers.Concatenate(name=f"{prefix}head_concat")(vectors)
    scaler, clf = head.pipeline[0], head.pipeline[-1]
    w = clf.coef_ / scaler.scale_  # (C, F): logits = (x - mean) / scale @ coef.T + b
    b = clf.intercept_ - w @ scaler.mean_
    if w.shape[0] == 1:  # binary: sigmoid of one logit
        return _two_class(keras, _fixed_dense(keras, x, w.T, b, f"{prefix}logreg", activation="sigmoid"), prefix)
    if isinstance(clf, LogisticRegression):  # multinomial: softmax
        return _fixed_dense(keras, x, w.T, b, f"{prefix}logreg", activation="softmax")
    # SGDClassifier (streamed training) is one-vs-rest: p_k = sigmoid(z_k) / sum_j sigmoid(z_j)
    # = softmax(log sigmoid(z)), and log sigmoid(z) = -softplus(-z).
    z = _fixed_dense(keras, x, -w.T, -b, f"{prefix}logreg_neg_logits", activation="softplus")
    k = w.shape[0]
    return _fixed_dense(keras, z, -np.eye(k), np.zeros(k), f"{prefix}logreg_ovr", activation="softmax")


# -- the end-to-end model of any run ------------------------------------------------------------


def input_names(sizes: list) -> dict:
    """{ImageInput: Keras input name}: ``image`` when a run reads one image size, else
    ``image_<size>`` (``image_<size>_<resize>`` where one size comes with two resize methods)."""
    if len(sizes) == 1:
        return {sizes[0]: "image"}
    clash = {s.size for s in sizes if sum(t.size == s.size for t in sizes) > 1}
    return {s: f"image_{s.size}" + (f"_{s.resize.replace('+', '_')}" if s.size in clash else "") for s in sizes}


def _feature_tensors(keras, run, recipes: dict, images: dict, precision: str | None = None) -> dict:
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
            tensors[record["name"]] = _pool(keras, by_layer[r.layer], r.pooling, pool_name)
    return tensors


def _probabilities(keras, run, features: dict, images: dict, prefix: str = ""):
    """The (N, K) probabilities tensor of ``run`` on the given feature and image tensors."""
    if run.kind in ("head", "fused"):
        head = run.head
        x = run.head_input(features)
        if run.config["head"] == "dense":
            y = head.model(x)
            return _two_class(keras, y, prefix) if head.binary else y
        return _logreg_layers(keras, x, head, prefix)
    if run.kind == "finetune":
        return run.model(images[run.image_inputs[0]])  # saved with (N, K) outputs, images in
    if run.kind == "ensemble":
        weighted = []
        for i, (member, weight) in enumerate(zip(run.members, run.weights)):
            # Each member in a sub-model of its own, so the layer names of members never clash.
            names = [r["name"] for r in member.feature_sets]
            f_in = {n: keras.Input(tuple(features[n].shape[1:]), name=f"features_{j}") for j, n in enumerate(names)}
            i_in = {s: keras.Input((s.size, s.size, 3), name=f"image_{j}") for j, s in enumerate(member.image_inputs)}
            sub = keras.Model([*f_in.values(), *i_in.values()], _probabilities(keras, member, f_in, i_in),
                              name=f"member_{i}_{member.kind}")
            p = sub([*(features[n] for n in names), *(images[s] for s in member.image_inputs)])
            weighted.append(keras.layers.Rescaling(float(weight), name=f"weight_{i}")(p))
        return keras.layers.Add(name="weighted_average")(weighted)
    raise FeatcacheError(f"{run.run_dir}: cannot export a {run.kind} run")


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
    features = _feature_tensors(keras, run, recipes, images, precision)
    outputs = _probabilities(keras, run, features, images)
    inputs = [images[s] for s in sizes]
    model = keras.Model(inputs[0] if len(inputs) == 1 else inputs, outputs, name="featcache_" + run.kind)
    model.trainable = False
    return run, model, [(names[s], s) for s in sizes]
