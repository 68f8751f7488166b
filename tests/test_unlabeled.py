"""Folders without classes: features and paths only, stored, reused, read, refused for training."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import featcache
from conftest import REPO, class_image, features_by_digest, write_tree
from featcache.cache.store import committed_rows
from featcache.cli import cli

PIXELS = ["--base", "pixels", "--size", "8", "--no-progress"]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def flat_folder(root, n=7, start=0):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        class_image(i % 2, i).save(root / f"photo_{i:03d}.jpg")
    return root


def test_a_flat_folder_is_stored_unlabeled_and_loads_with_paths(tmp_path):
    folder = flat_folder(tmp_path / "photos")
    store = tmp_path / "f.h5"
    result = run("extract", folder, store, *PIXELS, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["extracted"], summary["failed"], summary["class_names"]) == (7, 0, [])

    info = json.loads(run("info", store, "--json").stdout)["feature_sets"][0]
    assert info["labelled"] is False and info["counts"] == {} and info["rows_active"] == 7
    text = run("info", store).stdout
    assert "unlabeled  7 images" in text

    with featcache.open_store(store) as s:
        loaded = s.load()
        assert loaded.labels is None and loaded.class_names == []
        assert loaded.features.shape == (7, 8, 8, 3)
        assert list(loaded.paths) == [f"photo_{i:03d}.jpg" for i in range(7)]
        assert set(loaded.splits) == {""}
    # The stored features are the images' own pixels (the pixels base), row for row.
    from featcache.extract.images.decode import decode_image

    for path, row in zip(loaded.paths, loaded.features):
        expected = decode_image((folder / path).read_bytes(), 8) / 255.0
        np.testing.assert_allclose(row, expected, atol=1e-6)


def test_nested_folders_need_unlabeled_and_then_list_every_image(tmp_path):
    root = tmp_path / "album"
    flat_folder(root / "2023" / "summer", n=3)
    flat_folder(root / "2024", n=2, start=10)
    class_image(0, 99).save(root / "cover.jpg")
    store = tmp_path / "a.h5"
    # Without --unlabeled, subfolders are classes (and the loose cover.jpg is skipped, with the hint).
    labelled = json.loads(run("extract", root, store, *PIXELS, "--json").stdout)
    assert labelled["class_names"] == ["2023", "2024"]
    assert {"path": "cover.jpg", "reason": "file directly in the image folder, not in a class folder "
            "(--unlabeled lists every image)"} in labelled["skipped"]
    result = run("extract", root, store, *PIXELS, "--unlabeled", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    # Same key, same images: the features are reused, only the listing changes.
    assert (out["extracted"], out["reused"], out["class_names"]) == (1, 5, [])
    with featcache.open_store(store) as s:
        paths = list(s.load().paths)
    assert paths == ["2023/summer/photo_000.jpg", "2023/summer/photo_001.jpg", "2023/summer/photo_002.jpg",
                     "2024/photo_010.jpg", "2024/photo_011.jpg", "cover.jpg"]


def test_incremental_reruns_extract_only_new_and_changed_images(tmp_path):
    folder = flat_folder(tmp_path / "photos", n=5)
    store = tmp_path / "f.h5"
    first = featcache.extract_features(folder, store, base="pixels", size=8, progress=False)
    assert (first["extracted"], first["reused"]) == (5, 0)
    again = featcache.extract_features(folder, store, base="pixels", size=8, progress=False)
    assert (again["extracted"], again["reused"]) == (0, 5)
    flat_folder(folder, n=2, start=20)
    class_image(1, 50).save(folder / "photo_000.jpg")  # changed bytes under a known path
    (folder / "photo_001.jpg").unlink()
    third = featcache.extract_features(folder, store, base="pixels", size=8, progress=False)
    assert (third["extracted"], third["reused"], third["shape"][0]) == (3, 3, 6)
    clean = featcache.extract_features(folder, tmp_path / "clean.h5", base="pixels", size=8, progress=False)
    left, right = features_by_digest(store), features_by_digest(tmp_path / "clean.h5")
    assert left.keys() == right.keys() and all(np.array_equal(left[d], right[d]) for d in left)
    assert clean["shape"] == third["shape"]


def test_train_compare_and_augment_refuse_an_unlabeled_set_in_one_line(tmp_path):
    folder = flat_folder(tmp_path / "photos")
    store = tmp_path / "f.h5"
    run("extract", folder, store, *PIXELS)
    name = featcache.info(store)["feature_sets"][0]["feature_set"]
    expected = (f"error: {store}: feature set {name} is unlabeled (its images had no class folders); "
                "training needs a labelled folder: one subfolder of images per class")
    for args in (("train", store, "--head", "logreg", "--out", tmp_path / "run"),
                 ("compare", store, "--heads", "logreg"),
                 ("compare", store, "--heads", "logreg", "--feature-sets", name)):
        result = run(*args)
        assert result.exit_code == 1 and result.stderr.strip() == expected, (args, result.output)
    assert not (tmp_path / "run").exists()
    result = run("extract", folder, store, *PIXELS, "--augment", "1")
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: {folder}: --augment makes views of training images, which needs a "
                                     "labelled folder (one subfolder of images per class)")


def test_compare_leaves_unlabeled_sets_out_and_predict_classifies_the_unlabeled_folder(tmp_path):
    tree = write_tree(tmp_path / "labelled", splits={"train": 6, "validation": 2, "test": 2})
    folder = flat_folder(tmp_path / "photos", n=4)
    store = tmp_path / "s.h5"
    featcache.extract_features(tree, store, base="pixels", size=8, progress=False)
    featcache.extract_features(folder, store, base="pixels", size=12, progress=False)  # another key
    board = featcache.compare(store, heads="logreg")
    assert [e["feature_set"].split("-")[1] for e in board["leaderboard"]] == ["8"]
    featcache.train(store, feature_set=board["leaderboard"][0]["feature_set"], head="logreg", out=tmp_path / "run")
    result = run("predict", tmp_path / "run", folder, "--json")
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.stdout)["predictions"]
    assert [os.path.basename(p["path"]) for p in predicted] == [f"photo_{i:03d}.jpg" for i in range(4)]
    assert all(p["predicted"] in ("cats", "dogs") for p in predicted)


def test_empty_folder_and_missing_images_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("extract", tmp_path / "empty", tmp_path / "e.h5", *PIXELS)
    assert result.exit_code == 1
    assert result.stderr.strip() == (f"error: {tmp_path / 'empty'}: no class folders and no images found (expected "
                                     "one subfolder of images per class, or images to extract unlabeled)")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("not an image")
    result = run("extract", tmp_path / "docs", tmp_path / "e.h5", *PIXELS, "--unlabeled")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith(f"error: {tmp_path / 'docs'}: no images found (")


def test_kill_9_during_an_unlabeled_run_then_resume_equals_a_clean_run(tmp_path):
    folder = flat_folder(tmp_path / "photos", n=160)
    store = tmp_path / "killed.h5"
    args = ["--base", "mobilenet_0.25", "--weights", "none", "--size", "32", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "featcache", "extract", str(folder), str(store), *args],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import time

        deadline = time.time() + 120
        while committed_rows(store) < 8 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert 8 <= committed_rows(store) < 160, "the kill did not land mid-extraction"
    resumed = run("extract", folder, store, *args, "--json")
    assert resumed.exit_code == 0, resumed.output
    out = json.loads(resumed.stdout)
    assert out["extracted"] + out["reused"] == 160 and out["reused"] >= 8
    clean = tmp_path / "clean.h5"
    assert run("extract", folder, clean, *args).exit_code == 0
    left, right = features_by_digest(store), features_by_digest(clean)
    assert left.keys() == right.keys() and all(np.allclose(left[d], right[d], atol=1e-5) for d in left)
    with featcache.open_store(store) as s:
        loaded = s.load()
        assert len(loaded.paths) == len(set(loaded.paths)) == 160 and loaded.labels is None
