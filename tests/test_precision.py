"""Reduced precision: fidelity to float32 on real weights, the `auto` rule, BatchNorm folding.

Fidelity is measured the way the issue states it: mean cosine similarity of each image's
cached features (the whole feature map) to the float32 features, and the accuracy of a small
logistic-regression head on pooled features, trained and tested in each precision on real
cats-vs-dogs photos (200 train, 500 test). Thresholds are per base and honest: where bf16
misses 0.999 the test pins the level measured, and asserts that `auto` does not choose bf16
for that base.
"""
import subprocess
import sys

import numpy as np
import pytest

from conftest import CATS_DOGS, MOBILENET_025, MOBILENET_V2, REPO, shared_file, write_tree
from featcache import open_store
from featcache.errors import FeatcacheError
from featcache.extract.bases import feature_model as M
from featcache.extract.bases.backbones import get_backbone
from featcache.extract.images.decode import decode_image
from featcache.extract.pipeline import ExtractConfig, extract, key_spec
from featcache.extract.bases.weights import resolve_weights

TRAIN_PER_CLASS, TEST_PER_CLASS = 100, 250  # head: 200 train, 500 test photos (0.5 points = 2.5 photos)


def cosines(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def photos(split, per_class):
    paths, labels = [], []
    for label, name in enumerate(("cats", "dogs")):
        files = sorted((shared_file(CATS_DOGS) / split / name).glob("*.jpg"))[:per_class]
        paths += files
        labels += [label] * len(files)
    return paths, np.array(labels)


def head_accuracy(train, y_train, test, y_test):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pooled = lambda f: f.mean(axis=(1, 2))  # noqa: E731
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    return head.fit(pooled(train), y_train).score(pooled(test), y_test)


@pytest.fixture(scope="module")
def real_photos():
    train, y_train = photos("train", TRAIN_PER_CLASS)
    test, y_test = photos("validation", TEST_PER_CLASS)
    return train + test, len(train), y_train, y_test


def features_by_precision(base, weights_file, size, real_photos, precisions=("fp32", "bf16", "fp16")):
    paths = real_photos[0]
    images = np.stack([decode_image(p.read_bytes(), size) for p in paths])
    backbone = get_backbone(base)
    out = {}
    for precision in precisions:
        model = M.FeatureModel(backbone, size, resolve_weights(backbone, str(weights_file), 0, size),
                               precision=precision)
        out[precision] = np.concatenate([model(images[i : i + 100]) for i in range(0, len(images), 100)])
    return out


# Per base: (precision, least mean cosine, least pooled mean cosine, most head accuracy change in
# points). Measured 2026-11-22 on 200 train + 500 test photos: mobilenet_v2 fp16 0.99994 (head
# +0.0) / bf16 0.9973, pooled 0.9990 (head +0.0); mobilenet_0.25 fp16 0.9997 (head +0.4) / bf16
# 0.985, pooled 0.993 (head -1.0: above the 0.5 target, so this row allows 1.5). bf16 (8-bit
# mantissa) misses 0.999 on both real-weight MobileNets, with or without BatchNorm folding, with
# depthwise or 1x1 layers kept in float32 (0.993-0.998): these networks amplify rounding about
# 20x. So `auto` never picks bf16 for them (checked below); fp16 (10-bit mantissa) passes.
# On a CPU without native bf16 (AVX2 only) oneDNN emulates bf16 and rounds more; measured
# 2026-11-30 on such a CPU: mobilenet_v2 bf16 0.9957, pooled 0.9984 (head -0.4); mobilenet_0.25
# bf16 0.9758, pooled 0.9886 (head -0.2); fp16 as above. auto never picks bf16 there anyway.
FIDELITY = {
    "mobilenet_v2": [("fp16", 0.999, 0.9999, 0.5),
                     ("bf16", 0.995, 0.998, 0.5) if M.cpu_has_bf16() else ("bf16", 0.993, 0.997, 1.0)],
    "mobilenet_0.25": [("fp16", 0.999, 0.9995, 0.5),
                       ("bf16", 0.98, 0.99, 1.5) if M.cpu_has_bf16() else ("bf16", 0.97, 0.985, 1.5)],
}


@pytest.mark.parametrize("base, weights_file", [("mobilenet_v2", MOBILENET_V2), ("mobilenet_0.25", MOBILENET_025)])
def test_fidelity_to_fp32_on_real_weights(base, weights_file, real_photos):
    feats = features_by_precision(base, shared_file(weights_file), 160, real_photos)
    n_train, y_train, y_test = real_photos[1:]
    accuracy = {p: head_accuracy(f[:n_train], y_train, f[n_train:], y_test) for p, f in feats.items()}
    assert accuracy["fp32"] > 0.85  # real features, not noise (random init gives about 0.5)
    for precision, least, least_pooled, head_points in FIDELITY[base]:
        cos = cosines(feats[precision], feats["fp32"])
        pooled = cosines(feats[precision].mean(axis=(1, 2)), feats["fp32"].mean(axis=(1, 2)))
        assert cos.mean() >= least, (base, precision, cos.mean())
        assert pooled.mean() >= least_pooled, (base, precision, pooled.mean())
        assert abs(accuracy[precision] - accuracy["fp32"]) * 100 <= head_points + 1e-9, (base, precision, accuracy)
        if least < 0.999:  # below the fidelity target: auto must never pick it for this base
            for device in ("cpu-bf16", "cpu", "gpu-8.0"):
                assert auto_rule(base, device) != precision


def test_vgg16_bf16_fidelity_random_weights(real_photos):
    """The rule sends vgg16 to bf16 on bf16 CPUs. No VGG16 ImageNet file is available offline,
    so fidelity is checked with random init (seeded): cosine >= 0.999 on real photos."""
    paths = real_photos[0][:8] + real_photos[0][-8:]
    images = np.stack([decode_image(p.read_bytes(), 64) for p in paths])
    backbone = get_backbone("vgg16")
    feats = {p: M.FeatureModel(backbone, 64, resolve_weights(backbone, "none"), precision=p)(images)
             for p in ("fp32", "bf16")}
    assert cosines(feats["bf16"], feats["fp32"]).mean() >= 0.999


def auto_rule(base, device):
    """resolve_precision('auto') as it answers on a given device."""
    saved = M.cpu_has_bf16, M.gpu_compute_capability
    try:
        M.cpu_has_bf16 = lambda: device == "cpu-bf16"
        M.gpu_compute_capability = lambda: tuple(map(int, device[4:].split("."))) if device.startswith("gpu") else None
        return M.resolve_precision("auto", get_backbone(base))
    finally:
        M.cpu_has_bf16, M.gpu_compute_capability = saved


@pytest.mark.parametrize("base, device, expected", [
    ("vgg16", "cpu-bf16", "bf16"),
    ("vgg19", "cpu-bf16", "bf16"),
    ("vgg16", "cpu", "fp32"),
    ("mobilenet_v2", "cpu-bf16", "fp32"),
    ("resnet50", "cpu-bf16", "fp32"),
    ("vgg16", "gpu-9.0", "fp16"),
    ("mobilenet_v2", "gpu-7.0", "fp16"),
    ("vgg16", "gpu-6.1", "fp32"),
    ("pixels", "gpu-9.0", "fp32"),
])
def test_auto_rule(base, device, expected):
    assert auto_rule(base, device) == expected


def test_explicit_precision_wins_and_unknown_is_refused():
    vgg = get_backbone("vgg16")
    assert M.resolve_precision("fp16", vgg) == "fp16"
    assert M.resolve_precision("bf16", get_backbone("pixels")) == "fp32"  # no network: nothing to lower
    with pytest.raises(FeatcacheError, match=r"^unknown precision 'int8'; choose from auto, fp32, bf16, fp16$"):
        M.resolve_precision("int8", vgg)


def test_cache_key_gets_the_resolved_precision(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "gpu_compute_capability", lambda: None)
    monkeypatch.setattr(M, "cpu_has_bf16", lambda: True)
    assert ExtractConfig().precision == "auto"
    assert key_spec(ExtractConfig(base="vgg16", weights="none")).precision == "bf16"
    assert key_spec(ExtractConfig(base="mobilenet_0.25", weights="none")).precision == "fp32"
    tree = write_tree(tmp_path / "i", per_class=2)
    result = extract(str(tree), str(tmp_path / "s.h5"),
                     ExtractConfig(base="mobilenet_0.25", weights="none", size=32, progress=False))
    with open_store(tmp_path / "s.h5") as s:
        assert s[result["feature_set"]].summary()["key"]["precision"] == "fp32"


def test_auto_on_a_cpu_does_not_import_tensorflow():
    """An unchanged re-run builds no model; resolving `auto` must not cost the TF import."""
    code = ("import sys; from featcache.extract.bases.feature_model import gpu_compute_capability as g; "
            "print(g(), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    if not out.startswith("None"):
        pytest.skip("this machine has a GPU driver")
    assert out.strip() == "None False"


def test_batchnorm_folding_is_exact_in_float32():
    """Conv2D, DepthwiseConv2D (multiplier 2) and SeparableConv2D followed by BN with non-trivial
    statistics, BN without scale/center, and a BN after a ReLU (must stay): same outputs."""
    import keras

    keras.utils.set_random_seed(1)
    x = inp = keras.Input((12, 12, 3))
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, use_bias=False, name="dw")(x)
    x = keras.layers.BatchNormalization(name="dw_bn")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.BatchNormalization(name="after_relu")(x)
    x = keras.layers.SeparableConv2D(8, 3, name="sep")(x)
    x = keras.layers.BatchNormalization(scale=False, center=False, name="sep_bn")(x)
    x = keras.layers.Conv2D(5, 1, name="pw")(x)
    x = keras.layers.BatchNormalization(name="pw_bn")(x)
    model = keras.Model(inp, x)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 2, n))
            layer.moving_variance.assign(rng.uniform(0.01, 4, n))
            if layer.scale:
                layer.gamma.assign(rng.normal(1, 0.5, n))
                layer.beta.assign(rng.normal(0, 1, n))
    assert M.batchnorm_folds(model) == {"dw_bn": "dw", "sep_bn": "sep", "pw_bn": "pw"}
    folded = M.fold_and_cast(model, "float32")
    assert sum(isinstance(lyr, keras.layers.BatchNormalization) for lyr in folded.layers) == 1
    images = rng.normal(0, 1, (4, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(folded(images)), np.asarray(model(images, training=False)),
                               rtol=1e-4, atol=1e-5)


def test_folded_real_base_matches_keras(real_photos):
    """featcache's fp32 mobilenet_0.25 (27 BNs folded) against the plain Keras model."""
    import keras

    from featcache.extract.bases.backbones import build_keras_base

    images = np.stack([decode_image(p.read_bytes(), 96) for p in real_photos[0][:8]]).astype("float32")
    backbone = get_backbone("mobilenet_0.25")
    ours = M.FeatureModel(backbone, 96, resolve_weights(backbone, str(shared_file(MOBILENET_025)), 0, 96),
                          precision="fp32")
    assert len(M.batchnorm_folds(build_keras_base(backbone, 96, None))) == 27
    plain = build_keras_base(backbone, 96, str(MOBILENET_025))
    reference = np.asarray(plain(keras.applications.mobilenet.preprocess_input(images.copy()), training=False))
    np.testing.assert_allclose(ours(images.astype("uint8")), reference, rtol=1e-4, atol=1e-4)


def test_fp16_overflow_is_an_error_not_a_feature():
    """Features that overflow fp16 (above 65504) must stop the run, not be cached as inf."""
    backbone = get_backbone("vgg16")  # ReLU, unbounded (MobileNet's ReLU6 would clip an overflow)
    model = M.FeatureModel(backbone, 32, resolve_weights(backbone, "none"), precision="fp16")
    last = model.model.get_layer("block5_conv3")
    last.kernel.assign(np.full(last.kernel.shape, 3e4, dtype="float32"))
    with pytest.raises(FeatcacheError, match=r"^vgg16 features overflowed to inf/nan under --precision fp16; "
                                             r"use --precision fp32 \(or bf16\)$"):
        model(np.full((2, 32, 32, 3), 255, dtype="uint8"))
