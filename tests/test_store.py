"""The feature store through the pixels base (no TensorFlow): layout, keys, incremental runs."""
import json

import h5py
import numpy as np
import pytest
from PIL import Image

from conftest import class_image
from featcache import open_store
from featcache.cache.key import KeySpec, feature_set_key
from featcache.errors import FeatcacheError
from featcache.extract.pipeline import ExtractConfig, extract, key_spec

PIXELS = dict(base="pixels", size=16, progress=False)


def run(tree, store, **options):
    return extract(str(tree), str(store), ExtractConfig(**{**PIXELS, **options}))


def test_layout_is_plain_hdf5_with_self_describing_attributes(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    result = run(image_tree, store)
    assert result["extracted"] == 12 and result["reused"] == 0 and result["failed"] == 0
    assert result["shape"] == [12, 16, 16, 3]
    with h5py.File(store, "r") as f:
        group = f["feature_sets"][result["feature_set"]]
        assert group["features"].shape == (12, 16, 16, 3) and group["features"].dtype == np.float32
        assert list(group["committed"][:]) == [12, 0, 1]  # rows, failures, listing
        key = json.loads(group.attrs["key"])
        assert key["backbone"] == "pixels" and key["input_size"] == 16 and key["dtype"] == "float32"
        assert json.loads(group.attrs["class_names"]) == ["cats", "dogs"]
        blob, ends = group["paths_utf8"][:].tobytes(), group["paths_end"][:]  # as docs/store-layout.md says
        paths = [blob[s:e].decode() for s, e in zip([0, *ends[:-1]], ends)]
        assert paths == sorted(paths) and paths[0] == "cats/cats.000.jpg"
        # the features are the resized image scaled to [0, 1]
        img = Image.open(image_tree / "cats" / "cats.000.jpg").convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
        np.testing.assert_allclose(group["features"][0], np.asarray(img) / 255.0, atol=1e-6)


def test_rerun_extracts_nothing_then_only_added_and_changed(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    run(image_tree, store)
    again = run(image_tree, store)
    assert again["extracted"] == 0 and again["reused"] == 12
    class_image(0, 50).save(image_tree / "cats" / "new.jpg")
    class_image(1, 77).save(image_tree / "dogs" / "dogs.002.jpg")  # changed bytes, same path
    third = run(image_tree, store)
    assert third["extracted"] == 2 and third["reused"] == 11 and third["shape"][0] == 13
    with open_store(store) as s:
        fs = s[third["feature_set"]]
        assert fs.n_committed == 14  # the old version of dogs.002 stays stored, inactive
        assert len(fs.rows()) == 13
        paths = fs.column("paths")[fs.rows()]
        assert len(set(paths)) == 13


def test_moved_file_reuses_features_with_new_label(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    run(image_tree, store)
    (image_tree / "cats" / "cats.001.jpg").rename(image_tree / "dogs" / "moved.jpg")
    result = run(image_tree, store)
    assert result["extracted"] == 0 and result["reused"] == 12
    with open_store(store) as s:
        fs = s[result["feature_set"]]
        rows = fs.rows()
        labels = dict(zip(fs.column("paths")[rows], fs.column("labels")[rows]))
        assert labels["dogs/moved.jpg"] == 1 and "cats/cats.001.jpg" not in labels


def test_duplicate_bytes_are_extracted_once(image_tree, tmp_path):
    (image_tree / "dogs" / "copy.jpg").write_bytes((image_tree / "cats" / "cats.000.jpg").read_bytes())
    result = run(image_tree, tmp_path / "s.h5")
    assert result["extracted"] == 12 and result["reused"] == 1 and result["shape"][0] == 13


def test_different_key_never_touches_other_rows(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    first = run(image_tree, store)
    with h5py.File(store, "r") as f:
        before = f["feature_sets"][first["feature_set"]]["features"][:]
    second = run(image_tree, store, size=8)
    assert second["feature_set"] != first["feature_set"] and second["extracted"] == 12
    with open_store(store) as s:
        assert s.feature_set_names() == sorted([first["feature_set"], second["feature_set"]])
        np.testing.assert_array_equal(s[first["feature_set"]].features[:], before)


def test_key_covers_every_field():
    base = key_spec(ExtractConfig(**PIXELS))
    names = {feature_set_key(base)}
    for change in [dict(input_size=8), dict(resize="nearest"), dict(pooling="avg"), dict(dtype="float16"),
                   dict(layer="x"), dict(weights="sha256:00"), dict(precision="bf16"), dict(augment="{}"),
                   dict(preprocessing="tf"), dict(backbone="vgg16"), dict(format_version=99)]:
        names.add(feature_set_key(KeySpec(**{**base.to_dict(), **change})))
    assert len(names) == 12
    assert feature_set_key(base) == feature_set_key(key_spec(ExtractConfig(**PIXELS)))
    assert feature_set_key(base).startswith("pixels-16-output-none-float32-")


def test_float16_storage_and_pooling(image_tree, tmp_path):
    result = run(image_tree, tmp_path / "s.h5", dtype="float16", pooling="avg")
    assert result["shape"] == [12, 3]
    with open_store(tmp_path / "s.h5") as s:
        x, y = s[result["feature_set"]].load()
        assert x.dtype == np.float16 and x.shape == (12, 3) and list(y) == [0] * 6 + [1] * 6


def test_corrupt_image_is_reported_not_fatal(image_tree, tmp_path):
    (image_tree / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = run(image_tree, tmp_path / "s.h5")
    assert result["extracted"] == 12 and result["failed"] == 1
    assert result["failures"][0]["path"] == "cats/broken.jpg"
    assert result["failures"][0]["reason"].startswith("truncated image data")
    with open_store(tmp_path / "s.h5") as s:
        assert s[result["feature_set"]].failures() == [("cats/broken.jpg", result["failures"][0]["reason"])]


def test_split_folders_and_load_by_split(split_tree, tmp_path):
    result = run(split_tree, tmp_path / "s.h5")
    with open_store(tmp_path / "s.h5") as s:
        fs = s[result["feature_set"]]
        x, y = fs.load("train")
        assert x.shape == (12, 16, 16, 3) and sorted(set(y)) == [0, 1]
        assert len(fs.rows("validation")) == 4 and len(fs.rows("test")) == 4
        assert fs.summary()["counts"]["train"] == {"cats": 6, "dogs": 6}


def test_store_errors(image_tree, tmp_path):
    bad = tmp_path / "not.h5"
    bad.write_text("plain text")
    with pytest.raises(FeatcacheError, match="not an HDF5 file"):
        run(image_tree, bad)
    assert bad.read_text() == "plain text"
    with pytest.raises(FeatcacheError, match="no such store"):
        open_store(tmp_path / "missing.h5")
    with pytest.raises(FeatcacheError, match="does not exist"):
        run(image_tree, tmp_path / "no" / "dir" / "s.h5")


def test_second_writer_is_refused(image_tree, tmp_path):
    from featcache.cache.writer import StoreWriter

    store = tmp_path / "s.h5"
    with StoreWriter(str(store)):
        with pytest.raises(FeatcacheError, match="another featcache process is writing"):
            run(image_tree, store)


def test_text_columns_round_trip_multibyte_empty_and_truncated(tmp_path):
    from featcache.cache import text

    entries = ["chats/é.jpg", "", "猫/一.jpg", "dogs/\\xff.jpg", "a" * 5000]
    with h5py.File(tmp_path / "t.h5", "w", libver="latest") as f:
        g = f.create_group("g")
        text.create(g, "paths", chunk_rows=2, chunk_bytes=8)  # entries span chunks
        assert list(text.read(g, "paths", 0)) == []
        text.append(g, "paths", entries[:2])
        text.append(g, "paths", entries[2:])
        assert list(text.read(g, "paths", 5)) == entries and list(text.read(g, "paths", 3)) == entries[:3]
        assert g["paths_end"][-1] == g["paths_utf8"].shape[0] == sum(len(e.encode()) for e in entries)
        text.truncate(g, "paths", 2)  # as a resumed run cuts a killed run's tail
        text.append(g, "paths", ["x/ü.png"])
        assert list(text.read(g, "paths", 3)) == [*entries[:2], "x/ü.png"]
        assert g["paths_utf8"].shape[0] == len("chats/é.jpg".encode()) + len("x/ü.png".encode())


def test_unicode_file_names_are_stored_and_reused(tmp_path):
    tree = tmp_path / "i"
    for i, name in enumerate(("chats/été.jpg", "chats/猫.jpg", "chiens/ñandú.jpg", "chiens/plain.jpg")):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        class_image(i % 2, i).save(tree / name)
    store = tmp_path / "s.h5"
    first = run(tree, store)
    with open_store(store) as s:
        fs = s[first["feature_set"]]
        assert sorted(fs.column("paths")) == ["chats/été.jpg", "chats/猫.jpg", "chiens/plain.jpg", "chiens/ñandú.jpg"]
    again = run(tree, store)
    assert again["reused"] == 4 and again["extracted"] == 0
