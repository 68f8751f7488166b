"""The backbone registry: every keras.applications family usable as a frozen conv base.

One table (``REGISTRY``) drives the CLI choices, the cache key and the parametrized tests.
TensorFlow/Keras is imported only inside the functions that build models, so listing the
registry stays instant.

HELPER-OWNED FILE: the interface below is fixed; fill the table.

Notes on the table (all checked against keras 3.15 ``keras/src/applications``):

* ``preprocessing`` is the mode of the family's ``preprocess_input``: "caffe" (BGR, mean
  subtraction: vgg, resnet v1), "tf" (scale to [-1, 1]: resnet v2, inception, xception,
  mobilenet v1/v2, nasnet), "torch" (scale to [0, 1] then ImageNet mean/std: densenet) or
  "none" (``preprocess_input`` returns its input unchanged because the rescaling layers are
  inside the model: efficientnet, efficientnet_v2, convnext, mobilenet_v3).  The
  pseudo-base "pixels" uses "scale01" (divide by 255).
* ``boundary_layer`` is always a layer with an explicit (stable) name whose output is the
  only tensor the rest of the network needs, so ``top_block_model`` can rebuild the part
  after it as a model with that activation as its only input.  Auto-numbered layer names
  (``add_11``, ``conv2d_85``...) are never used as exact names: the number depends on what
  else was built in the same Keras session.  (The convnext prefix "layer_normalization"
  matches its final, auto-named LayerNormalization whatever its number.)
* ``top_block`` lists name prefixes of the layers after the boundary; they never match a
  layer before it.  For most families they match every layer with weights after the
  boundary.  Two exceptions, where Keras leaves the branch convolutions unnamed
  (auto-numbered): inception_v3 (the mixed10 branches) and inception_resnet_v2 (the
  block8_10 branches); there the prefixes only name the block's named layers and
  ``top_block_model`` is the reliable way to get the whole top block.
* nasnet_mobile / nasnet_large have no single-tensor cut anywhere after the stem (every
  NASNet cell reads the outputs of the two previous cells), so they have no boundary
  (``boundary_layer=None``) and no top block (``top_block=()``): stage three does not apply.
* ``imagenet_file`` / ``imagenet_hash`` are the no-top weights file Keras' ``get_file``
  stores in ~/.keras/models/ and the hash it checks (md5, except convnext: sha256); None
  where Keras passes no hash (mobilenet, mobilenet_v2).  For mobilenet / mobilenet_v2 the
  file depends on the input size; the field holds the 224 file, and
  ``imagenet_weights_file(backbone, size)`` gives the one Keras fetches at a given size.
"""
from __future__ import annotations

import difflib
import numbers
from dataclasses import dataclass, field

from featcache.errors import FeatcacheError

PIXELS = "pixels"  # the non-network pseudo-base: the resized image itself is the feature


@dataclass(frozen=True)
class Backbone:
    name: str  # registry name used on the CLI and in the cache key, e.g. "vgg16", "mobilenet_0.25"
    constructor: str | None  # attribute of keras.applications, e.g. "VGG16" (None only for "pixels")
    module: str | None  # keras.applications submodule holding preprocess_input, e.g. "vgg16" (None: "pixels")
    default_size: int  # default square input size in pixels
    preprocessing: str  # preprocess_input flavour for the key: "caffe", "tf", "torch" or "none" (in-model)
    default_layer: str | None = None  # None: the model output with include_top=False (the last conv output)
    top_block: tuple[str, ...] = ()  # layer-name prefixes of the top conv block (unfrozen in stage three)
    boundary_layer: str | None = None  # the layer feeding the top block (freeze boundary), e.g. vgg16 "block4_pool"
    kwargs: dict = field(default_factory=dict)  # extra constructor arguments, e.g. {"alpha": 0.25}
    min_size: int = 32  # smallest input size the constructor accepts with include_top=False
    imagenet_file: str | None = None  # Keras' no-top ImageNet weights file name (as in ~/.keras/models/)
    imagenet_hash: str | None = None  # the file_hash Keras checks for that file

    @property
    def is_network(self) -> bool:
        """True for a keras.applications base; False for the "pixels" pseudo-base (constructor
        None), which has no model: the extraction code resizes the image and uses it as is."""
        return self.constructor is not None


REGISTRY: dict[str, Backbone] = {}


def _add(backbone: Backbone) -> None:
    assert backbone.name not in REGISTRY, backbone.name
    REGISTRY[backbone.name] = backbone


def _notop(stem: str) -> str:
    # the file name pattern of the older families: vgg, resnet, inception, xception, densenet
    return f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


# --- VGG: top block = block5 (3 convs + pool); 150 px as in the classic cats-vs-dogs recipe.
for _name, _ctor, _hash in (
    ("vgg16", "VGG16", "6d6bbae143d832006294945121d1f1fc"),
    ("vgg19", "VGG19", "253f8cb515780f3b799900260a226db6"),
):
    _add(Backbone(
        _name, _ctor, _name, 150, "caffe",
        top_block=("block5_",), boundary_layer="block4_pool",
        imagenet_file=_notop(_name), imagenet_hash=_hash,
    ))

# --- ResNet v1 / v2: top block = the last residual block of conv5 (+ v2's post-activation).
_RESNET_HASHES = {  # keras resnet.WEIGHTS_HASHES[...][1] (no-top)
    "resnet50": "4d473c1dd8becc155b73f8504c6f6626",
    "resnet101": "88cf7a10940856eca736dc7b7e228a21",
    "resnet152": "ee4c566cf9a93f14d82f913c2dc6dd0c",
    "resnet50v2": "fac2f116257151a9d068a22e544a4917",
    "resnet101v2": "c0ed64b8031c3730f411d2eb4eea35b5",
    "resnet152v2": "ed17cf2e0169df9d443503ef94b23b33",
}
for _v2 in (False, True):
    for _depth in (50, 101, 152):
        _stem = f"resnet{_depth}v2" if _v2 else f"resnet{_depth}"
        _add(Backbone(
            f"resnet{_depth}_v2" if _v2 else f"resnet{_depth}",
            f"ResNet{_depth}V2" if _v2 else f"ResNet{_depth}",
            "resnet_v2" if _v2 else "resnet",
            224,
            "tf" if _v2 else "caffe",
            top_block=("conv5_block3_", "post_") if _v2 else ("conv5_block3_",),
            boundary_layer="conv5_block2_out",  # v1: the block's relu; v2: the block's add
            imagenet_file=_notop(_stem), imagenet_hash=_RESNET_HASHES[_stem],
        ))

# --- Inception / Xception.
_add(Backbone(
    # top block = mixed10; its branch convs/BNs are auto-named (conv2d_85.., see module doc)
    "inception_v3", "InceptionV3", "inception_v3", 299, "tf",
    top_block=("mixed9_1", "mixed10"), boundary_layer="mixed9", min_size=75,
    imagenet_file=_notop("inception_v3"), imagenet_hash="bcbd6486424b2319ff4ef7d526e38f63",
))
_add(Backbone(
    # top block = the last block8 (its branch convs are auto-named) + conv_7b
    "inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, "tf",
    top_block=("block8_10_", "conv_7b"), boundary_layer="block8_9_ac", min_size=75,
    imagenet_file=_notop("inception_resnet_v2"), imagenet_hash="d19885ff4a710c122648d3b5c3b684e4",
))
_add(Backbone(
    # Xception's residual adds are unnamed (add_11 feeds block14), so the stable boundary is
    # inside block14: the top block is its last separable conv (2048 channels) + BN + relu.
    "xception", "Xception", "xception", 299, "tf",
    top_block=("block14_sepconv2",), boundary_layer="block14_sepconv1_act", min_size=71,
    imagenet_file=_notop("xception"), imagenet_hash="b0042744bf5b25fce3cb969f33bebb97",
))

# --- MobileNet v1: 160 px default; top block = the last depthwise-separable block.
_MOBILENET_ALPHA_TEXT = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}


def _mobilenet_file(alpha: float, rows: int) -> str:
    return f"mobilenet_{_MOBILENET_ALPHA_TEXT[alpha]}_{rows}_tf_no_top.h5"


for _alpha in (1.0, 0.75, 0.5, 0.25):
    _add(Backbone(
        "mobilenet" if _alpha == 1.0 else f"mobilenet_{_alpha:g}", "MobileNet", "mobilenet", 160, "tf",
        top_block=("conv_dw_13", "conv_pw_13"), boundary_layer="conv_pw_12_relu",
        kwargs={"alpha": _alpha}, imagenet_file=_mobilenet_file(_alpha, 224),
    ))

# --- MobileNet v2: 160 px default; top block = block_16 + the 1x1 Conv_1 (out_relu is a
# weightless activation after it).


def _mobilenet_v2_file(alpha: float, rows: int) -> str:
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"


for _alpha in (1.0, 0.35, 0.5, 0.75, 1.3, 1.4):
    _add(Backbone(
        "mobilenet_v2" if _alpha == 1.0 else f"mobilenet_v2_{_alpha:g}", "MobileNetV2", "mobilenet_v2", 160, "tf",
        top_block=("block_16_", "Conv_1"), boundary_layer="block_15_add",
        kwargs={"alpha": _alpha}, imagenet_file=_mobilenet_v2_file(_alpha, 224),
    ))

# --- MobileNet v3 (rescaling inside the model): top block = the last inverted-residual
# block + the 1x1 conv_1 (its activations are unnamed but weightless).
for _kind, _last, _hash in (
    ("small", 10, "d3e8ec802a04aa4fc771ee12a9a9b836"),
    ("large", 14, "07fb09a5933dd0c8eaafa16978110389"),
):
    _add(Backbone(
        f"mobilenet_v3_{_kind}", f"MobileNetV3{_kind.title()}", "mobilenet_v3", 224, "none",
        top_block=(f"expanded_conv_{_last}_", "conv_1"), boundary_layer=f"expanded_conv_{_last - 1}_add",
        imagenet_file=f"weights_mobilenet_v3_{_kind}_224_1.0_float_no_top_v2.h5", imagenet_hash=_hash,
    ))

# --- DenseNet: top block = the last dense layer of conv5 + the final bn/relu.
for _depth, _last, _hash in (
    (121, 16, "30ee3e1110167f948a6b9946edeeb738"),
    (169, 32, "b8c4d4c20dd625c148057b9ff1c1176b"),
    (201, 32, "c13680b51ded0fb44dff2d8f86ac8bb1"),
):
    _add(Backbone(
        f"densenet{_depth}", f"DenseNet{_depth}", "densenet", 224, "torch",
        top_block=(f"conv5_block{_last}_", "bn", "relu"), boundary_layer=f"conv5_block{_last - 1}_concat",
        imagenet_file=_notop(f"densenet{_depth}"), imagenet_hash=_hash,
    ))

# --- NASNet: no single-tensor boundary after the stem (see module doc), so no top block.
for _kind, _size, _hash in (
    ("mobile", 224, "1ed92395b5b598bdda52abe5c0dbfd63"),
    ("large", 331, "d81d89dc07e6e56530c4e77faddd61b5"),
):
    _add(Backbone(
        f"nasnet_{_kind}", f"NASNet{_kind.title()}", "nasnet", _size, "tf",
        imagenet_file=f"nasnet_{_kind}_no_top.h5", imagenet_hash=_hash,
    ))

# --- EfficientNet B0-B7 (rescaling/normalisation inside the model): top block = the last
# block of stage 7 + top_conv/top_bn/top_activation; the boundary is the previous block's
# output (its add, or block7a_project_bn where block7a has no residual).
for _v, _size, _last, _boundary, _hash in (
    (0, 224, "block7a", "block6d_add", "50bc09e76180e00e4465e1a485ddc09d"),
    (1, 240, "block7b", "block7a_project_bn", "74c4e6b3e1f6a1eea24c589628592432"),
    (2, 260, "block7b", "block7a_project_bn", "111f8e2ac8aa800a7a99e3239f7bfb39"),
    (3, 300, "block7b", "block7a_project_bn", "af6d107764bb5b1abb91932881670226"),
    (4, 380, "block7b", "block7a_project_bn", "ebc24e6d6c33eaebbd558eafbeedf1ba"),
    (5, 456, "block7c", "block7b_add", "38879255a25d3c92d5e44e04ae6cec6f"),
    (6, 528, "block7c", "block7b_add", "9ecce42647a20130c1f39a5d4cb75743"),
    (7, 600, "block7d", "block7c_add", "cbcfe4450ddf6f3ad90b1b398090fe4a"),
):
    _add(Backbone(
        f"efficientnet_b{_v}", f"EfficientNetB{_v}", "efficientnet", _size, "none",
        top_block=(f"{_last}_", "top_"), boundary_layer=_boundary,
        imagenet_file=f"efficientnetb{_v}_notop.h5", imagenet_hash=_hash,
    ))

# --- EfficientNetV2 (rescaling inside the model): top block = the last block of the last
# stage + top_*; the boundary is the previous block's add.
for _v, _ctor, _size, _last, _boundary, _hash in (
    ("b0", "B0", 224, "block6h", "block6g_add", "893217f2bb855e2983157299931e43ff"),
    ("b1", "B1", 240, "block6i", "block6h_add", "0e80663031ca32d657f9caa404b6ec37"),
    ("b2", "B2", 260, "block6j", "block6i_add", "1dfe2e7a5d45b6632553a8961ea609eb"),
    ("b3", "B3", 300, "block6l", "block6k_add", "f6abf7b5849ac99a89b50dd3fd532856"),
    ("s", "S", 384, "block6o", "block6n_add", "af0682fb74e8c54910f2d4393339c070"),
    ("m", "M", 480, "block7e", "block7d_add", "1b8dc055df72dde80d614482840fe342"),
    ("l", "L", 480, "block7g", "block7f_add", "b0b66b5c863aef5b46e8608fe1711615"),
):
    _add(Backbone(
        f"efficientnet_v2_{_v}", f"EfficientNetV2{_ctor}", "efficientnet_v2", _size, "none",
        top_block=(f"{_last}_", "top_"), boundary_layer=_boundary,
        imagenet_file=f"efficientnetv2-{_v}_notop.h5", imagenet_hash=_hash,
    ))

# --- ConvNeXt (normalisation inside the model): the residual adds are unnamed ops, so the
# top block is the whole last stage (3 blocks) + the final (auto-named) LayerNormalization
# that include_top=False appends; the boundary is the last downsampling block.
for _v, _hash in (  # sha256 hashes
    ("tiny", "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
    ("small", "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab"),
    ("base", "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45"),
    ("large", "96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd"),
    ("xlarge", "de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05"),
):
    _add(Backbone(
        f"convnext_{_v}", f"ConvNeXt{_v.title().replace('Xl', 'XL')}", "convnext", 224, "none",
        top_block=(f"convnext_{_v}_stage_3_", "layer_normalization"),
        boundary_layer=f"convnext_{_v}_downsampling_block_2",
        imagenet_file=f"convnext_{_v}_notop.h5", imagenet_hash=_hash,
    ))

# --- pixels: not a network; the image resized to size x size, divided by 255, is the feature.
_add(Backbone(PIXELS, None, None, 32, "scale01", top_block=(), min_size=1))


def get_backbone(name: str) -> Backbone:
    """The registry entry called ``name``; FeatcacheError (with a suggestion) if unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        pass
    suggestion = _closest_name(name)
    hint = f"; did you mean {suggestion!r}?" if suggestion else ""
    raise FeatcacheError(f"unknown base {name!r}{hint} (featcache bases lists all)")


def _closest_name(name: str) -> str | None:
    key = str(name).lower()
    candidates = difflib.get_close_matches(key, list(REGISTRY), n=5, cutoff=0.6)
    if not candidates:
        return None
    # best ratio first; on a tie prefer a transposition of the same letters ("vgg61" ->
    # "vgg16", not "vgg19"), then the registry order
    order = list(REGISTRY)
    return min(candidates, key=lambda c: (
        -difflib.SequenceMatcher(None, key, c).ratio(), sorted(c) != sorted(key), order.index(c)))


def check_size(backbone: Backbone, size: int) -> None:
    """FeatcacheError unless ``size`` is an input size ``backbone`` accepts."""
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < backbone.min_size:
        raise FeatcacheError(
            f"base {backbone.name!r} needs an input size of at least {backbone.min_size} pixels; "
            f"got {size!r}")


def build_keras_base(backbone: Backbone, size: int, weights):
    """The frozen keras.applications conv base (include_top=False) for size x size x 3 input.

    ``weights`` goes to Keras unchanged: None (random init), "imagenet" (downloads
    ``imagenet_weights_file(backbone, size)`` unless it is in ~/.keras/models/) or a path to
    a weights file.  ValueError for "pixels" (no network: the extraction code handles it);
    FeatcacheError for a size below ``backbone.min_size``.
    """
    if not backbone.is_network:
        raise ValueError(f"base {backbone.name!r} is not a network; there is no Keras model to build")
    check_size(backbone, size)
    import keras  # lazy: importing this module must not import TensorFlow

    from .placeholder_init import placeholder_weights, unset_weights

    constructor = getattr(keras.applications, backbone.constructor)

    def build():
        return constructor(include_top=False, weights=weights, input_shape=(int(size), int(size), 3), **backbone.kwargs)

    if weights is None:  # random init: the initializers are the weights
        model = build()
    else:  # every weight comes from the file: skip the initializers (on JAX each one compiles)
        with placeholder_weights():
            model = build()
        unset = unset_weights(model)
        if unset:
            raise FeatcacheError(f"{weights}: loading it as {backbone.name} weights left {len(unset)} of "
                                 f"{len(model.weights)} weights unset ({', '.join(unset[:3])}, ...)")
    model.trainable = False
    return model


def imagenet_weights_file(backbone: Backbone, size: int) -> tuple[str | None, str | None]:
    """(file name, hash) of the no-top ImageNet weights Keras fetches for ``size``.

    Equals (imagenet_file, imagenet_hash) except for mobilenet / mobilenet_v2, whose Keras
    weights exist per input size (v1: 128/160/192/224, v2: 96/128/160/192/224; other sizes
    load the 224 file), so e.g. mobilenet at its 160 default fetches the 160 file.
    """
    if backbone.constructor == "MobileNet":
        rows = size if size in (128, 160, 192, 224) else 224
        return _mobilenet_file(backbone.kwargs["alpha"], rows), None
    if backbone.constructor == "MobileNetV2":
        rows = size if size in (96, 128, 160, 192, 224) else 224
        return _mobilenet_v2_file(backbone.kwargs["alpha"], rows), None
    return backbone.imagenet_file, backbone.imagenet_hash


def top_block_model(backbone: Backbone, base):
    """The part of ``base`` (from ``build_keras_base``) after ``boundary_layer``, as a
    keras.Model whose only input is the boundary activation and whose output is the base's.

    Its layers are the base's own layer objects (shared weights), frozen like the base: to
    fine-tune, set ``layer.trainable = True`` on each of ``model.layers`` (a bare
    ``model.trainable = True`` does nothing in Keras 3.15, since the new model's own flag
    already reads True); the base as a whole stays frozen.  FeatcacheError if the base has
    no boundary (nasnet).
    """
    if not backbone.boundary_layer:
        raise FeatcacheError(
            f"base {backbone.name!r} has no single-tensor freeze boundary; "
            "it cannot be split into a frozen part and a top block")
    import keras

    boundary = base.get_layer(backbone.boundary_layer).output
    return keras.Model(boundary, base.output, name=f"{base.name}_top_block")
