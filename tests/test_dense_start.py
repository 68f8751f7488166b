"""The default dense head starts at chance (issue 25): its inputs are standardized by the
training rows' statistics, kept inside the model (every export carries them), and its output
layer starts at zero, so the untrained loss is ln K whatever the scale of the features."""
import math
import os
import shutil

import numpy as np
import pytest

from conftest import CATS_DOGS, pixel_store, shared_file
from featcache.classify.heads.registry import make_head
from featcache.classify.rows import training as data


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    return pixel_store(tmp_path_factory.mktemp("dense"), ("a", "b", "c"), {"train": 6, "validation": 3, "test": 3}, (8,))


@pytest.mark.parametrize("budget_mb", [2048.0, 0.0])  # in memory, and streamed chunk by chunk
def test_the_statistics_are_the_training_rows_and_live_in_the_model(pixels, budget_mb, tmp_path):
    import featcache

    with featcache.open_store(pixels["store"]) as s:
        fs = s[pixels["sets"][0]]
        train = data.Rows.split(fs, "train")
        x, _ = fs.load("train")
        head = make_head("dense", epochs=1)
        head.build(3, fs.feature_shape)
        head.prepare(train, data.plan(train, None, budget_mb, 20))
        vectors = x.reshape(len(x), -1).astype(np.float64)
        layer = head.model.get_layer("standardize")
        np.testing.assert_allclose(np.asarray(layer.scale), 1 / vectors.std(axis=0), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(layer.offset), -vectors.mean(axis=0) / vectors.std(axis=0), rtol=1e-4,
                                   atol=1e-5)
        p = head.predict_proba(fs.load("validation")[0])
        np.testing.assert_allclose(p, 1 / 3)  # exactly chance before training
    run = featcache.train(pixels["store"], out=tmp_path / "run", head="dense", epochs=2, no_report=True)
    assert run["untrained"]["loss"] == pytest.approx(math.log(3)) and not run["untrained"]["flag"]


def test_unscaled_inputs_still_start_at_chance_and_no_standardize_is_the_plain_head(pixels, tmp_path):
    import featcache

    plain = featcache.train(pixels["store"], out=tmp_path / "plain", head="dense", epochs=1, standardize=False,
                            no_report=True)
    import keras

    model = keras.saving.load_model(tmp_path / "plain" / "model.keras", safe_mode=True)
    assert "standardize" not in [layer.name for layer in model.layers]
    assert plain["untrained"]["loss"] == pytest.approx(math.log(3))  # the zero output layer alone


def test_on_real_photos_the_untrained_loss_is_ln_k(tmp_path):
    import featcache

    source = shared_file(CATS_DOGS)
    for split, n in {"train": 10, "validation": 4}.items():
        for name in ("cats", "dogs"):
            (tmp_path / "images" / split / name).mkdir(parents=True)
            for file in sorted(os.listdir(source / split / name))[:n]:
                shutil.copy(source / split / name / file, tmp_path / "images" / split / name / file)
    store = tmp_path / "f.h5"
    featcache.extract_features(tmp_path / "images", store, base="mobilenet_0.25", size=64, weights="bundled",
                               progress=False)
    run = featcache.train(store, out=tmp_path / "run", head="dense", epochs=1, no_report=True)
    ratio = run["untrained"]["loss"] / math.log(2)
    assert 0.5 <= ratio <= 1.5 and not run["untrained"]["flag"]
