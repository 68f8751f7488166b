"""The Keras models of a fine-tune: the base with none, its top block, layers from one on, or all
of it trainable, with the stage-two head on top; and the top part of a saved fine-tuned model
(boundary activation in), which scores a run from cached boundary activations."""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import FeatcacheError


@dataclass
class Models:
    """The Keras pieces of a fine-tune: all share the same layer objects (and weights)."""

    full: object  # images (RGB 0..255) -> head output (sigmoid (N,1) or softmax (N,K))
    top: object  # boundary activation -> head output
    boundary: object  # images -> boundary activation (frozen part)
    base: object  # the unfolded base
    head: object  # the stage-two head model
    trainable: list  # names of the base layers that train
    train_bn: bool = False  # BatchNormalization trains too (--unfreeze all on a random-init base)


def _is_bn(layer) -> bool:
    import keras

    return isinstance(layer, keras.layers.BatchNormalization)


STRATEGIES = ("none", "top", "from:LAYER", "all")


def parse_unfreeze(unfreeze: str = "top", unfreeze_from: str | None = None) -> tuple[str, str | None]:
    """(mode, layer) of ``--unfreeze none|top|from:LAYER|all``; ``--unfreeze-from LAYER`` is
    the older spelling of ``from:LAYER``."""
    unfreeze = unfreeze or "top"
    if unfreeze_from is not None:
        if unfreeze not in ("top", f"from:{unfreeze_from}"):
            raise FeatcacheError(f"--unfreeze-from {unfreeze_from}: conflicts with --unfreeze {unfreeze} "
                                 "(--unfreeze-from LAYER is --unfreeze from:LAYER; give one)")
        return "from", unfreeze_from
    if unfreeze in ("none", "top", "all"):
        return unfreeze, None
    if unfreeze.startswith("from:") and unfreeze[5:]:
        return "from", unfreeze[5:]
    raise FeatcacheError(f"--unfreeze {unfreeze!r}: choose none (base frozen, head only), top (the registry's "
                         "top block), from:LAYER (every layer from LAYER on) or all (the whole base)")


def build_models(recipe, head, blocks: int = 1, unfreeze: str = "top", augment_layers=()) -> Models:
    """Base (unfolded, float32) + pooling + head, with the base layers that ``unfreeze`` names
    trainable (none; the registry's top block; every layer from:LAYER on; all) and the head.

    BatchNormalization stays frozen (inference mode, ImageNet statistics), except with
    ``all`` on a randomly initialised base (trained from scratch): there its statistics mean
    nothing yet, so BN layers train in training mode like every other layer."""
    import keras

    from ...extract.bases.backbones import top_block_model
    from ...extract.bases.feature_model import build_frozen_base
    from .layers import pool, preprocessing

    backbone, spec = recipe.backbone, recipe.spec
    mode, layer_from = parse_unfreeze(unfreeze)
    if blocks != 1:
        raise FeatcacheError(f"--blocks {blocks}: the registry names one top block per base; "
                             "use --unfreeze from:LAYER to unfreeze more")
    base = build_frozen_base(backbone, spec.input_size, recipe.weights, None, "fp32", recipe.seed, fold=False)
    names = [layer.name for layer in base.layers]
    boundary_index = names.index(backbone.boundary_layer)
    if mode == "from":
        if layer_from not in names:
            from ...extract.bases.feature_model import check_layer

            check_layer(base, layer_from)  # raises with close matches
        selected = set(names[names.index(layer_from):])
        first_trained = names.index(layer_from)
    elif mode == "all":
        selected, first_trained = set(names), 0
    elif mode == "none":
        selected, first_trained = set(), len(names)
    else:
        selected = {n for n in names[boundary_index + 1:] if n.startswith(backbone.top_block)}
        first_trained = boundary_index + 1
    train_bn = mode == "all" and recipe.spec.weights.startswith("random:")
    # Keras 3: a model whose own flag is False hides all its weights, so turn the base on and
    # then every layer off except the selected ones.
    base.trainable = True
    trainable = []
    for layer in base.layers:
        layer.trainable = layer.name in selected and (train_bn or not _is_bn(layer))
        if layer.trainable and layer.weights:
            trainable.append(layer.name)
    head_model = head.model
    head_model.trainable = True

    def tail(x):
        x = pool(keras, x, spec.pooling, "feature_pool")
        return head_model(x)

    inputs = keras.Input((spec.input_size, spec.input_size, 3), name="image")
    x = inputs
    for layer in augment_layers:  # active in training only
        x = layer(x)
    x = preprocessing(keras, x, spec.preprocessing)
    full = keras.Model(inputs, tail(base(x)), name="featcache_finetune")

    top_part = top_block_model(backbone, base)  # shares the base's layers
    if first_trained <= boundary_index:
        top_part = None  # layers below the boundary train: the cache cannot be used
    top = None
    if top_part is not None:
        b_in = keras.Input(tuple(top_part.input.shape[1:]), name="boundary")
        top = keras.Model(b_in, tail(top_part(b_in)), name="featcache_finetune_top")
    b_images = keras.Input((spec.input_size, spec.input_size, 3), name="image")
    boundary_model = keras.Model(base.inputs, base.get_layer(backbone.boundary_layer).output)
    boundary = keras.Model(b_images, boundary_model(preprocessing(keras, b_images, spec.preprocessing)))
    return Models(full, top, boundary, base, head_model, trainable, train_bn)


def top_of_saved_model(full, backbone):
    """From a saved end-to-end fine-tuned model: boundary activation in, probabilities out
    (the base's layers above the boundary, then every layer after the base)."""
    import keras

    from ...extract.bases.backbones import top_block_model

    base = next(layer for layer in full.layers if isinstance(layer, keras.Model)
                and any(inner.name == backbone.boundary_layer for inner in layer.layers))
    top = top_block_model(backbone, base)
    inputs = keras.Input(tuple(top.input.shape[1:]), name="boundary")
    x = top(inputs)
    for layer in full.layers[full.layers.index(base) + 1:]:
        x = layer(x)
    return keras.Model(inputs, x, name="featcache_finetune_top")
