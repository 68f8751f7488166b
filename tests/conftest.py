"""Shared fixtures: small image trees generated here, never downloaded."""
from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_WEIGHTS = SHARED / "weights"
SHARED_DATA = SHARED / "data"
CATS_DOGS = SHARED_DATA / "cats_vs_dogs_small_max256"
MOBILENET_025 = SHARED_WEIGHTS / "mobilenet_2_5_224_tf_no_top.h5"
MOBILENET_V2 = SHARED_WEIGHTS / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"
MOBILENET_V2_TOP = SHARED_WEIGHTS / "mobilenet_v2_1.0_224_coralquant_dequant.h5"


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: unknown to a pytest without it
def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per CPU this process may run on (not the host's count, which a
    container may not grant), at most 4 and one per 3 GB of memory: each worker loads TensorFlow."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = 3.0
    return max(1, min(cpus, 4, int(memory_gb // 3)))


def shared_file(path: pathlib.Path) -> pathlib.Path:
    """A file from ../shared, or a clean skip when this checkout has no shared folder."""
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def class_image(label: int, index: int, size=(48, 40)) -> Image.Image:
    """A small RGB image whose look depends on its class (colour and stripe direction)."""
    rng = np.random.default_rng(1000 * label + index)
    h, w = size[1], size[0]
    base = np.array([(200, 40, 40), (40, 160, 60), (40, 60, 200), (180, 180, 40)][label % 4], dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = np.sin((xx if label % 2 else yy) / (2.0 + index % 3)) * 40
    img = base[None, None, :] + stripes[..., None] + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_tree(root: pathlib.Path, per_class: int = 6, classes=("cats", "dogs"), splits=None, ext=".jpg") -> pathlib.Path:
    """Write a class-per-folder tree; with ``splits`` (e.g. {"train": 4, "validation": 2}) a split-folder tree."""
    layout = [(split, n) for split, n in splits.items()] if splits else [(None, per_class)]
    for split, n in layout:
        for label, name in enumerate(classes):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                offset = {"train": 0, "validation": 100, "test": 200}.get(split, 0)
                class_image(label, i + offset).save(folder / f"{name}.{i + offset:03d}{ext}")
    return root


def features_by_digest(store, name=None) -> dict:
    """Active rows of a feature set as image digest -> features: independent of row order."""
    from featcache import open_store

    with open_store(store) as s:
        fs = s.select(name)
        rows = fs.rows()
        return dict(zip(fs.column("digests")[rows], fs.read(rows)))


def rows_by_digest(store) -> dict:
    """Active rows as digest -> (features, label, path, split)."""
    from featcache import open_store

    with open_store(store) as s:
        fs = s.select()
        rows = fs.rows()
        cols = [fs.column(c)[rows] for c in ("digests", "labels", "paths", "splits")]
        return {d: (f, int(y), p, sp) for f, d, y, p, sp in zip(fs.read(rows), *cols)}


def assert_same_rows(a, b, exact=True):
    assert a.keys() == b.keys() and len(a) > 0
    for d in a:
        assert a[d][1:] == b[d][1:], d
        if exact:
            np.testing.assert_array_equal(a[d][0], b[d][0])
        else:
            np.testing.assert_allclose(a[d][0], b[d][0], rtol=1e-5, atol=1e-5)


@pytest.fixture
def image_tree(tmp_path):
    return write_tree(tmp_path / "images")


@pytest.fixture
def split_tree(tmp_path):
    return write_tree(tmp_path / "images", splits={"train": 6, "validation": 2, "test": 2})


def pixel_store(root: pathlib.Path, classes, splits: dict, sizes) -> dict:
    """Generated images in split folders under ``root`` and one store holding a pixels feature
    set per size (cheap: no network). {"root", "tree", "store", "sets": names by size order}."""
    from featcache.extract.pipeline import ExtractConfig, extract

    tree = write_tree(root / "images", splits=splits, classes=classes)
    store = root / "store.h5"
    names = [extract(str(tree), str(store), ExtractConfig(base="pixels", size=s, progress=False))["feature_set"]
             for s in sizes]
    return {"root": root, "tree": tree, "store": str(store), "sets": names}
