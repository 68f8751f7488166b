"""The backbone registry: every entry builds (weights=None, no network), runs, and its
top-block / boundary names match the real Keras layers.

The heaviest builds are skipped unless FEATCACHE_SLOW_TESTS=1 (each takes several seconds
on a 2-core machine); the default run builds one or more members of every family.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from featcache.errors import FeatcacheError
from featcache.extract.bases import backbones as B
from featcache.extract.bases.preprocessing import preprocess_function

REPO = pathlib.Path(__file__).resolve().parents[1]
RUN_SLOW = os.environ.get("FEATCACHE_SLOW_TESTS") == "1"

# The heavy builds (>= ~4 s of CPU each on this 2-core machine: many layers or tens to
# hundreds of millions of weights), skipped unless FEATCACHE_SLOW_TESTS=1.  Every family keeps
# at least one fast member in the default run (resnet50/_v2, densenet121, nasnet_mobile,
# efficientnet_b0-b2, efficientnet_v2_b0-b2, convnext_tiny).
SLOW = {
    "resnet101", "resnet152", "resnet101_v2", "resnet152_v2", "inception_resnet_v2",
    "densenet169", "densenet201", "nasnet_large",
    "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_b3", "efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l",
    "convnext_small", "convnext_base", "convnext_large", "convnext_xlarge",
}

# Output channels with include_top=False (independent of the registry, from the papers/Keras).
CHANNELS = {
    "vgg16": 512, "vgg19": 512,
    "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
    "resnet50_v2": 2048, "resnet101_v2": 2048, "resnet152_v2": 2048,
    "inception_v3": 2048, "inception_resnet_v2": 1536, "xception": 2048,
    "mobilenet": 1024, "mobilenet_0.75": 768, "mobilenet_0.5": 512, "mobilenet_0.25": 256,
    "mobilenet_v2": 1280, "mobilenet_v2_0.35": 1280, "mobilenet_v2_0.5": 1280, "mobilenet_v2_0.75": 1280,
    "mobilenet_v2_1.3": 1664, "mobilenet_v2_1.4": 1792,
    "mobilenet_v3_small": 576, "mobilenet_v3_large": 960,
    "densenet121": 1024, "densenet169": 1664, "densenet201": 1920,
    "nasnet_mobile": 1056, "nasnet_large": 4032,
    "efficientnet_b0": 1280, "efficientnet_b1": 1280, "efficientnet_b2": 1408, "efficientnet_b3": 1536,
    "efficientnet_b4": 1792, "efficientnet_b5": 2048, "efficientnet_b6": 2304, "efficientnet_b7": 2560,
    "efficientnet_v2_b0": 1280, "efficientnet_v2_b1": 1280, "efficientnet_v2_b2": 1408,
    "efficientnet_v2_b3": 1536, "efficientnet_v2_s": 1280, "efficientnet_v2_m": 1280, "efficientnet_v2_l": 1280,
    "convnext_tiny": 768, "convnext_small": 768, "convnext_base": 1024, "convnext_large": 1536,
    "convnext_xlarge": 2048,
}

# Families whose top block has auto-numbered (unnamed) weighted layers that no stable
# prefix can match; for them only top_block_model() gives the whole top block.
PREFIXES_PARTIAL = {"inception_v3", "inception_resnet_v2"}
# Families with no single-tensor boundary after the stem.
NO_BOUNDARY = {"nasnet_mobile", "nasnet_large"}

NETWORKS = [name for name, b in B.REGISTRY.items() if b.is_network]


def _network_params():
    for name in NETWORKS:
        marks = ()
        if name in SLOW:
            marks = pytest.mark.skipif(not RUN_SLOW, reason="slow build; set FEATCACHE_SLOW_TESTS=1")
        yield pytest.param(name, marks=marks, id=name)


@pytest.fixture
def keras():
    keras = pytest.importorskip("keras")
    keras.backend.clear_session()  # frees the previous test's model (it runs gc.collect itself)
    return keras


def _image(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(1, size, size, 3), dtype=np.uint8)


def _test_size(backbone: B.Backbone) -> int:
    return max(backbone.min_size, 64)


# ---------------------------------------------------------------- the table itself


def test_registry_covers_every_family():
    assert len(B.REGISTRY) == 49 and set(CHANNELS) == set(NETWORKS)
    assert SLOW <= set(NETWORKS) and PREFIXES_PARTIAL <= set(NETWORKS)
    assert B.PIXELS in B.REGISTRY and list(B.REGISTRY)[0] == "vgg16"


@pytest.mark.parametrize("name", list(B.REGISTRY))
def test_entry_fields(name):
    b = B.REGISTRY[name]
    assert b.name == name and b.default_layer is None
    assert b.min_size <= b.default_size
    assert isinstance(b.top_block, tuple) and all(isinstance(p, str) and p for p in b.top_block)
    if not b.is_network:
        return
    assert b.preprocessing in {"caffe", "tf", "torch", "none"}
    assert bool(b.top_block) == (b.boundary_layer is not None) == (name not in NO_BOUNDARY)
    assert b.imagenet_file and b.imagenet_file.endswith(".h5")
    if b.constructor in ("MobileNet", "MobileNetV2"):
        assert b.imagenet_hash is None and "_224_" in b.imagenet_file and b.default_size == 160
    else:
        assert b.imagenet_hash and len(b.imagenet_hash) in (32, 64)


def test_default_sizes_and_minimums():
    sizes = {n: b.default_size for n, b in B.REGISTRY.items()}
    assert sizes["vgg16"] == sizes["vgg19"] == 150
    assert all(sizes[n] == 160 for n in NETWORKS if n.startswith(("mobilenet_0", "mobilenet_v2")))
    assert sizes["mobilenet"] == 160 and sizes["mobilenet_v3_small"] == 224
    assert sizes["inception_v3"] == sizes["xception"] == 299 and sizes["nasnet_large"] == 331
    assert sizes["efficientnet_b7"] == 600 and sizes["efficientnet_v2_s"] == 384
    assert B.REGISTRY["inception_v3"].min_size == B.REGISTRY["inception_resnet_v2"].min_size == 75
    assert B.REGISTRY["xception"].min_size == 71 and B.REGISTRY["resnet50"].min_size == 32


def test_imagenet_hashes_are_the_ones_in_keras_source():
    keras = pytest.importorskip("keras")
    src_dir = pathlib.Path(keras.__file__).parent / "src" / "applications"
    source = "".join(p.read_text() for p in src_dir.glob("*.py"))
    for b in B.REGISTRY.values():
        if b.imagenet_hash:
            assert f'"{b.imagenet_hash}"' in source, b.name


# ---------------------------------------------------------------- lookup


def test_get_backbone_known_and_unknown():
    assert B.get_backbone("mobilenet_0.25").kwargs == {"alpha": 0.25}
    with pytest.raises(FeatcacheError) as err:
        B.get_backbone("vgg61")
    assert str(err.value) == "unknown base 'vgg61'; did you mean 'vgg16'? (featcache bases lists all)"
    with pytest.raises(FeatcacheError, match=r"did you mean 'resnet50_v2'\?"):
        B.get_backbone("resnet50v2")
    with pytest.raises(FeatcacheError) as err:
        B.get_backbone("zzzz")
    assert str(err.value) == "unknown base 'zzzz' (featcache bases lists all)"


def test_import_does_not_import_tensorflow():
    code = "import featcache.extract.bases.backbones, sys; assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env, timeout=60)


# ---------------------------------------------------------------- pixels and sizes


def test_pixels_pseudo_base():
    px = B.get_backbone("pixels")
    assert not px.is_network and px.constructor is None and px.module is None
    assert px.default_size == 32 and px.preprocessing == "scale01" and px.top_block == ()
    with pytest.raises(ValueError):
        B.build_keras_base(px, 32, None)
    out = preprocess_function(px)(np.array([[0, 51, 255]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], rtol=1e-6)


def test_size_below_minimum_is_a_user_error():
    with pytest.raises(FeatcacheError, match=r"'xception'.*at least 71.*got 70"):
        B.build_keras_base(B.get_backbone("xception"), 70, None)
    with pytest.raises(FeatcacheError, match=r"'vgg16'.*at least 32.*got 16"):
        B.build_keras_base(B.get_backbone("vgg16"), 16, None)


# ---------------------------------------------------------------- preprocessing


def test_preprocessing_flavour_matches_keras_preprocess_input():
    pytest.importorskip("keras")
    img = np.array([[[[0, 128, 255]]]], dtype=np.uint8)
    for b in B.REGISTRY.values():
        if not b.is_network:
            continue
        fn = preprocess_function(b)
        x = img.astype(np.float32)
        y = np.asarray(fn(x.copy()), dtype=np.float64)[0, 0, 0]
        expected = {
            "none": [0.0, 128.0, 255.0],
            "tf": [-1.0, 128 / 127.5 - 1, 1.0],
            "torch": [(0 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (1 - 0.406) / 0.225],
            "caffe": [255 - 103.939, 128 - 116.779, 0 - 123.68],  # RGB -> BGR, mean subtracted
        }[b.preprocessing]
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4, err_msg=b.name)


# ---------------------------------------------------------------- weights file names


@pytest.mark.parametrize("name, size", [  # cheap builds, one per file-name pattern kind
    ("vgg16", 150), ("mobilenet_0.25", 160), ("mobilenet_0.25", 224), ("mobilenet_0.25", 150),
    ("mobilenet_v2_0.35", 96), ("mobilenet_v3_small", 64),
])
@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")
def test_imagenet_file_is_what_keras_fetches(keras, monkeypatch, name, size):
    """Intercept Keras' download: the file name and hash it asks for are the registry's."""
    from keras.src.utils import file_utils

    class Fetched(Exception):
        pass

    def fake_get_file(fname=None, origin=None, **kwargs):
        raise Fetched(fname, kwargs.get("file_hash"))

    monkeypatch.setattr(file_utils, "get_file", fake_get_file)
    b = B.get_backbone(name)
    with pytest.raises(Fetched) as fetched:
        B.build_keras_base(b, size, "imagenet")
    assert fetched.value.args == B.imagenet_weights_file(b, size)
    if size == 224 or b.constructor not in ("MobileNet", "MobileNetV2"):
        assert fetched.value.args == (b.imagenet_file, b.imagenet_hash)


# ---------------------------------------------------------------- every network builds and runs


@pytest.mark.parametrize("name", list(_network_params()))
def test_network_builds_runs_and_splits(keras, name):
    b = B.get_backbone(name)
    size = _test_size(b)
    base = B.build_keras_base(b, size, None)
    assert not base.trainable and not base.trainable_weights
    names = [layer.name for layer in base.layers]
    x = np.asarray(preprocess_function(b)(_image(size)), dtype=np.float32)

    for prefix in b.top_block:
        assert any(n.startswith(prefix) for n in names), f"{name}: no layer starts with {prefix!r}"
    if b.boundary_layer is None:
        y = np.asarray(base(x, training=False))
    else:
        boundary = base.get_layer(b.boundary_layer).output
        both = keras.Model(base.input, [boundary, base.output])
        z, y = (np.asarray(t) for t in both(x, training=False))
        # the part after the boundary rebuilds from the boundary activation alone
        top = B.top_block_model(b, base)
        np.testing.assert_allclose(np.asarray(top(z, training=False)), y, rtol=1e-4, atol=1e-4)
        top_names = {layer.name for layer in top.layers}
        matched = {n for n in names if n.startswith(b.top_block)}
        assert matched <= top_names, f"{name}: prefixes match layers before the boundary"
        if name not in PREFIXES_PARTIAL:
            weighted = {layer.name for layer in top.layers if layer.weights}
            assert weighted <= matched, f"{name}: top-block layers missed by the prefixes"
    assert y.ndim == 4 and y.shape[0] == 1 and y.shape[-1] == CHANNELS[name]
    assert tuple(base.output.shape) == (None, *y.shape[1:])
    assert np.isfinite(y).all()


def test_nasnet_has_no_boundary():
    b = B.get_backbone("nasnet_mobile")
    with pytest.raises(FeatcacheError, match="no single-tensor freeze boundary"):
        B.top_block_model(b, object())


# ---------------------------------------------------------------- exact shapes


def test_vgg16_shapes_at_150(keras):
    b = B.get_backbone("vgg16")
    base = B.build_keras_base(b, b.default_size, None)
    assert tuple(base.output.shape) == (None, 4, 4, 512)
    assert tuple(base.get_layer(b.boundary_layer).output.shape) == (None, 9, 9, 512)
    top = B.top_block_model(b, base)
    assert [layer.name for layer in top.layers[1:]] == [
        "block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]
    # the top block shares the base's layers: unfreezing them is what stage three does
    assert top.get_layer("block5_conv1") is base.get_layer("block5_conv1")
    assert not base.trainable_weights and not top.trainable_weights
    for layer in top.layers:  # (``top.trainable = True`` alone is a no-op: the flag already reads True)
        layer.trainable = True
    assert len(top.trainable_weights) == 6 and not base.trainable_weights


def test_mobilenet_v2_shape_at_160(keras):
    b = B.get_backbone("mobilenet_v2")
    base = B.build_keras_base(b, b.default_size, None)
    assert tuple(base.output.shape) == (None, 5, 5, 1280)
    assert tuple(base.get_layer(b.boundary_layer).output.shape) == (None, 5, 5, 160)


# ---------------------------------------------------------------- built from a weights file

# The cheap member of each kind of weighted layer: Conv2D, BN + DepthwiseConv2D, hard-swish
# squeeze-excite, Normalization (with an integer count), LayerNormalization + LayerScale.
FILE_BUILDS = {"vgg16", "mobilenet_v2_0.35", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"}


def _file_build_params():
    for name in NETWORKS:
        marks = () if name in FILE_BUILDS else pytest.mark.skipif(
            not RUN_SLOW, reason="one member per layer kind runs by default; set FEATCACHE_SLOW_TESTS=1")
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_file_build_params()))
def test_a_base_built_from_a_weights_file_holds_exactly_its_weights(keras, tmp_path, name):
    """Built from a file, the base skips its initializers (placeholders, then the load): every
    weight is the file's, none is left a placeholder, and the features are the source model's."""
    b = B.get_backbone(name)
    size = _test_size(b)
    source = B.build_keras_base(b, size, None)
    path = tmp_path / "base.weights.h5"
    source.save_weights(path)
    loaded = B.build_keras_base(b, size, str(path))
    assert len(loaded.weights) == len(source.weights)
    for theirs, ours in zip(source.weights, loaded.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ours), keras.ops.convert_to_numpy(theirs), err_msg=ours.path)
    x = np.asarray(preprocess_function(b)(_image(size)), dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x, training=False)), np.asarray(source(x, training=False)))


def test_a_load_that_leaves_weights_unset_is_refused_naming_the_file(keras, tmp_path, monkeypatch):
    b = B.get_backbone("mobilenet_v2_0.35")
    path = tmp_path / "w.weights.h5"
    B.build_keras_base(b, 96, None).save_weights(path)
    monkeypatch.setattr(keras.Model, "load_weights", lambda self, *args, **kwargs: None)  # loads nothing
    with pytest.raises(FeatcacheError) as refused:
        B.build_keras_base(b, 96, str(path))
    assert str(refused.value).startswith(f"{path}: loading it as mobilenet_v2_0.35 weights left ")
    assert "weights unset (Conv1/kernel" in str(refused.value)


def test_placeholders_stay_inside_their_block_and_thread(keras):
    import threading

    from featcache.extract.bases.placeholder_init import placeholder_weights, unset_weights

    def dense_model():
        inputs = keras.Input((3,))
        return keras.Model(inputs, keras.layers.Dense(4)(inputs))

    built_elsewhere = []
    with placeholder_weights():
        inside = dense_model()
        thread = threading.Thread(target=lambda: built_elsewhere.append(dense_model()))
        thread.start()
        thread.join()
    assert unset_weights(inside) == [w.path for w in inside.weights]  # kernel and bias: placeholders
    for model in (built_elsewhere[0], dense_model()):  # another thread, and after the block
        assert unset_weights(model) == []
        assert np.abs(np.asarray(model.weights[0])).sum() > 0  # glorot, not zeros
    inside.set_weights([np.ones((3, 4)), np.zeros(4)])
    assert unset_weights(inside) == []
    assert keras.layers.Layer.add_weight.__module__.startswith("keras")  # the wrapper is gone


@pytest.mark.parametrize("flavour", sorted({b.preprocessing for b in B.REGISTRY.values()}))
def test_preprocessing_layers_equal_the_extraction_function(flavour):
    """The one module that knows each preprocess_input: its Keras layers (what export builds)
    give what extraction's function gives, for every flavour in the registry."""
    import keras

    from featcache.extract.bases.preprocessing import preprocessing

    backbone = next(b for b in B.REGISTRY.values() if b.preprocessing == flavour)
    x = np.random.default_rng(0).integers(0, 256, (2, 5, 5, 3)).astype(np.float32)
    image = keras.Input((5, 5, 3))
    layers = keras.Model(image, preprocessing(keras, image, flavour))
    np.testing.assert_allclose(np.asarray(layers(x)), np.asarray(preprocess_function(backbone)(x.copy())),
                               rtol=1e-5, atol=1e-4)
