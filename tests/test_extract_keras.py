"""Extraction through real Keras bases: shapes, equality with plain Keras code, kill -9 resume."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import CATS_DOGS, MOBILENET_025, REPO, features_by_digest, shared_file, write_tree
from featcache.cache.store import committed_rows
from featcache import open_store
from featcache.errors import FeatcacheError
from featcache.extract.pipeline import ExtractConfig, extract

FAST = dict(base="mobilenet_0.25", weights="none", size=64, progress=False, batch_size=4)




def test_vgg16_at_150_gives_4x4x512(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=2)
    result = extract(str(tree), str(tmp_path / "s.h5"), ExtractConfig(base="vgg16", weights="none", progress=False))
    assert result["shape"] == [4, 4, 4, 512]
    assert result["feature_set"].startswith("vgg16-150-output-none-float32-")


def test_layer_and_pooling_options(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=2)
    store = str(tmp_path / "s.h5")
    pooled = extract(str(tree), store, ExtractConfig(**{**FAST, "pooling": "avg"}))
    assert pooled["shape"] == [4, 256]
    inner = extract(str(tree), store, ExtractConfig(**{**FAST, "layer": "conv_pw_11_relu"}))
    assert inner["shape"] == [4, 4, 4, 128]
    with pytest.raises(FeatcacheError, match="layer 'conv_pw_99' is not in"):
        extract(str(tree), store, ExtractConfig(**{**FAST, "layer": "conv_pw_99"}))


def test_random_init_is_seeded_and_reproducible(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=2)
    a = extract(str(tree), str(tmp_path / "a.h5"), ExtractConfig(**FAST))
    b = extract(str(tree), str(tmp_path / "b.h5"), ExtractConfig(**FAST))
    fa, fb = features_by_digest(tmp_path / "a.h5", a["feature_set"]), features_by_digest(tmp_path / "b.h5", b["feature_set"])
    assert a["feature_set"] == b["feature_set"]
    for d in fa:
        np.testing.assert_allclose(fa[d], fb[d], rtol=1e-5, atol=1e-6)
    c = extract(str(tree), str(tmp_path / "a.h5"), ExtractConfig(**{**FAST, "seed": 1}))
    assert c["feature_set"] != a["feature_set"]


def test_missing_weights_file_and_offline_imagenet_fail_clearly(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "i", per_class=1)
    with pytest.raises(FeatcacheError, match="weights file not found"):
        extract(str(tree), str(tmp_path / "s.h5"), ExtractConfig(**{**FAST, "weights": str(tmp_path / "nope.h5")}))
    # No network here and an empty Keras cache: must say what to do, never fall back to random.
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    import socket

    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: (_ for _ in ()).throw(OSError("network disabled in test")))
    with pytest.raises(FeatcacheError, match=r"cannot get ImageNet weights for mobilenet_0.25.*--weights PATH"):
        extract(str(tree), str(tmp_path / "s.h5"), ExtractConfig(**{**FAST, "weights": "imagenet", "size": 128}))
    assert not os.path.exists(tmp_path / "s.h5") or not open_store(tmp_path / "s.h5").feature_set_names()


def test_features_equal_plain_keras_on_real_photos(tmp_path):
    """Real ImageNet weights, real photos: featcache == load_img + preprocess_input + predict."""
    import keras

    weights = shared_file(MOBILENET_025)
    source = shared_file(CATS_DOGS / "train")
    tree = tmp_path / "photos"
    for cls in ("cats", "dogs"):
        (tree / cls).mkdir(parents=True)
        for name in sorted(os.listdir(source / cls))[:5]:
            shutil.copy(source / cls / name, tree / cls / name)
    store = tmp_path / "s.h5"
    result = extract(str(tree), str(store), ExtractConfig(base="mobilenet_0.25", weights=str(weights), size=160, progress=False))
    ours = features_by_digest(store, result["feature_set"])

    base = keras.applications.MobileNet(include_top=False, weights=str(weights), input_shape=(160, 160, 3), alpha=0.25)
    from featcache.extract.images.decode import file_digest

    paths = sorted(str(p) for p in tree.glob("*/*.jpg"))
    images = np.stack([keras.utils.img_to_array(keras.utils.load_img(p, target_size=(160, 160), interpolation="bilinear")) for p in paths])
    reference = base.predict(keras.applications.mobilenet.preprocess_input(images), verbose=0)
    for path, ref in zip(paths, reference):
        np.testing.assert_allclose(ours[file_digest(path)], ref, rtol=1e-4, atol=1e-4)
    # real features: a cat is closer to another cat than to a dog, on average
    flat = {p: ours[file_digest(p)].ravel() for p in paths}
    cats = [flat[p] for p in paths if "/cats/" in p]
    dogs = [flat[p] for p in paths if "/dogs/" in p]
    assert np.abs(np.mean(cats, 0) - np.mean(dogs, 0)).sum() > 0
    assert not np.allclose(cats[0], cats[1])




def test_kill_minus_9_then_resume_equals_clean_run(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=40)
    store = tmp_path / "killed.h5"
    cmd = [sys.executable, "-m", "featcache", "extract", str(tree), str(store), "--base", "mobilenet_0.25",
           "--weights", "none", "--size", "64", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while committed_rows(store) < 8 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = committed_rows(store)
    assert 8 <= partial < 80, partial

    resumed = extract(str(tree), str(store), ExtractConfig(**FAST))
    assert resumed["reused"] == partial and resumed["extracted"] == 80 - partial
    clean = extract(str(tree), str(tmp_path / "clean.h5"), ExtractConfig(**FAST))
    a, b = features_by_digest(store, resumed["feature_set"]), features_by_digest(tmp_path / "clean.h5", clean["feature_set"])
    assert sorted(a) == sorted(b) and len(a) == 80
    for d in a:
        np.testing.assert_allclose(a[d], b[d], rtol=1e-4, atol=1e-5)
    with open_store(store) as s:
        digests = s[resumed["feature_set"]].column("digests")
        assert len(digests) == len(set(digests)) == 80
