"""Cached augmentation: seeded views of training images only, stored as a feature set of its own."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_tree
from featcache.cache.store import open_store
from featcache.classify.rows import training as data
from featcache.classify.train.harness import train
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract.images.augment import (DEFAULT_STRENGTHS, augment_image, make_layers, parse_recipe, view_column,
                                       view_rows, view_seed)
from featcache.extract.images.decode import decode_file
from featcache.extract.pipeline import extract

OPTS = dict(base="pixels", size=32, weights="none", progress=False)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_tree(tmp_path_factory.mktemp("aug") / "images", splits={"train": 4, "validation": 2, "test": 2})


def test_parse_recipe():
    assert parse_recipe(None) == DEFAULT_STRENGTHS
    assert parse_recipe("zoom,flip") == {"flip": "horizontal", "zoom": 0.1}  # canonical order
    assert parse_recipe("rotation=0.2") == {"rotation": 0.2}
    with pytest.raises(FeatcacheError, match="unknown transform 'blur'"):
        parse_recipe("blur")
    with pytest.raises(FeatcacheError, match="must be between 0 and 1"):
        parse_recipe("zoom=2")


def test_augment_image_is_a_function_of_the_seed():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    layers = make_layers(DEFAULT_STRENGTHS)
    a = augment_image(layers, image, view_seed(1, "abc", 1))
    b = augment_image(make_layers(DEFAULT_STRENGTHS), image, view_seed(1, "abc", 1))
    assert a.dtype == np.uint8 and a.shape == image.shape
    np.testing.assert_array_equal(a, b)
    for other in (view_seed(2, "abc", 1), view_seed(1, "abd", 1), view_seed(1, "abc", 2)):
        assert not np.array_equal(a, augment_image(layers, image, other))


def test_views_stored_for_training_images_only(tree, tmp_path):
    store = str(tmp_path / "s.h5")
    plain = extract(str(tree), store, **OPTS)
    result = extract(str(tree), store, augment=2, aug_seed=1, **OPTS)
    assert result["feature_set"] != plain["feature_set"]
    assert result["views_extracted"] == 2 * 8 and result["extracted"] == 16  # 8 train images, 16 in all
    with open_store(store) as s:
        fs, ref = s[result["feature_set"]], s[plain["feature_set"]]
        assert json.loads(fs.spec.augment) == {"recipe": DEFAULT_STRENGTHS, "seed": 1, "views": 2}
        views = view_column(fs)
        splits = fs.column("splits")
        assert sorted(set(splits[views > 0])) == ["train"]  # validation/test never augmented
        # Readers without view-awareness see one plain row per image, equal to the plain set's.
        assert len(fs.rows()) == len(ref.rows()) == 16
        assert (views[fs.rows()] == 0).all()
        np.testing.assert_array_equal(fs.load()[0], ref.load()[0])
        # Each view is the seeded augmentation of the decoded image (pixels: features = image / 255).
        table = view_rows(fs, fs.rows("train"))
        assert table.shape == (8, 3)
        layers = make_layers(DEFAULT_STRENGTHS)
        for row, vrows in zip(fs.rows("train"), table):
            image, _ = decode_file(str(tree / fs.column("paths")[row]), 32)
            for v in (1, 2):
                expected = augment_image(layers, image, view_seed(1, fs.column("digests")[row], v)) / 255.0
                np.testing.assert_allclose(fs.read(np.array([vrows[v]]))[0], expected, atol=1e-6)
    # Resumed: nothing new to compute.
    again = extract(str(tree), store, augment=2, aug_seed=1, **OPTS)
    assert again["extracted"] == 0 and again["views_extracted"] == 0 and again["views_stored"] == 16


def test_same_seed_same_views_other_seed_other_key(tree, tmp_path):
    a = extract(str(tree), str(tmp_path / "a.h5"), augment=1, aug_seed=3, **OPTS)
    b = extract(str(tree), str(tmp_path / "b.h5"), augment=1, aug_seed=3, **OPTS)
    c = extract(str(tree), str(tmp_path / "c.h5"), augment=1, aug_seed=4, **OPTS)
    assert a["feature_set"] == b["feature_set"] != c["feature_set"]

    def everything(path, name):
        with open_store(path) as s:
            fs = s[name]
            return fs.features[:], view_column(fs)

    fa, va = everything(str(tmp_path / "a.h5"), a["feature_set"])
    fb, _ = everything(str(tmp_path / "b.h5"), b["feature_set"])
    fc, vc = everything(str(tmp_path / "c.h5"), c["feature_set"])
    np.testing.assert_array_equal(fa, fb)
    np.testing.assert_array_equal(fa[va == 0], fc[vc == 0])
    assert not np.allclose(fa[va > 0], fc[vc > 0])


def test_training_draws_one_view_per_image_per_epoch(tree, tmp_path):
    store = str(tmp_path / "s.h5")
    result = extract(str(tree), store, augment=2, aug_seed=0, **OPTS)
    with open_store(store) as s:
        fs = s[result["feature_set"]]
        rows = data.Rows.split(fs, "train")
        assert rows.views.shape == (8, 3)
        assert data.Rows.split(fs, "validation").views is None
        allowed = {tuple(fs.read(np.array([r]))[0].ravel()[:16]): i for i, vr in enumerate(rows.views) for r in vr}
        gen = data.view_batches_forever(rows, 3, seed=0)
        picked_epochs = []
        for _ in range(2):
            seen = []
            for _ in range(3):  # 8 images, batches of 3: 3 batches per epoch
                x, y = next(gen)
                for xi, yi in zip(x, y):
                    i = allowed[tuple(xi.ravel()[:16])]  # every sample is a view of a training image...
                    assert yi == rows.labels[i]
                    seen.append(i)
            assert sorted(seen) == list(range(8))  # ...and each image comes once per epoch
            picked_epochs.append(seen)
    summary = train(store, result["feature_set"], head="dense", out=str(tmp_path / "run"), epochs=2, units=8,
                    report=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["training"]["views_per_image"] == 3
    assert summary["train"]["n"] == 8 and summary["validation"]["n"] == 4


def test_cli_extract_augment(tree, tmp_path):
    store = str(tmp_path / "s.h5")
    r = CliRunner().invoke(cli, ["extract", str(tree), store, "--base", "pixels", "--size", "32", "--weights", "none",
                                 "--augment", "2", "--aug-seed", "5", "--no-progress", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["augment"]["views"] == 2 and out["augment"]["seed"] == 5 and out["views_stored"] == 16
    r = CliRunner().invoke(cli, ["extract", str(tree), store, "--base", "pixels", "--size", "32", "--weights", "none",
                                 "--augment", "1", "--shard", "0/2", "--no-progress"])
    assert r.exit_code == 1 and "--augment cannot be combined with --shard" in r.stderr
