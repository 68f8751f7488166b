"""The images behind a run: its store's rows (relative paths, labels, splits) under the
recorded image root, decoded the way extraction decoded them.

Fine-tuning reads them to train; export reads training images to calibrate int8 models and
test images to measure the exported file's accuracy.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ...cache.store import open_store
from ...errors import FeatcacheError


def feature_set_record(config: dict) -> dict:
    """The feature set a run's images come from (the first one where a run reads several)."""
    if "feature_set" in config:
        return config["feature_set"]
    return config["feature_sets"][0]


def rows_of_run(config: dict):
    """paths, digests, labels, splits of the run's feature set's active rows."""
    record = feature_set_record(config)
    store = record["store"]
    if not os.path.exists(store):
        raise FeatcacheError(f"{store}: the store of the run is missing (needed for its rows and splits)")
    with open_store(store) as s:
        if record["name"] not in s.feature_set_names():
            raise FeatcacheError(f"{store}: feature set {record['name']} of the run is gone")
        fs = s[record["name"]]
        rows = fs.rows()
        return (fs.column("paths")[rows], fs.column("digests")[rows], fs.column("labels")[rows].astype(np.int64),
                fs.column("splits")[rows])


def split_images(config: dict, split: str, image_root: str | None = None):
    """(absolute paths, labels) of one split, each image once, sorted by path."""
    paths, _, labels, splits = rows_of_run(config)
    root = image_root or feature_set_record(config).get("image_root") or ""
    chosen = {}
    for path, label, s in zip(paths, labels, splits):
        if s == split:
            chosen.setdefault(str(path), int(label))  # augmented sets list an image once per view
    names = sorted(chosen)
    return [os.path.join(root, p) for p in names], np.array([chosen[p] for p in names], np.int64)


def decode_paths(paths, size: int, resize: str, workers: int = 4):
    """(images (N, size, size, 3) uint8, indices of the decoded paths, failures [{path, reason}])."""
    from ...extract.images.decode import decode_file

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda p: decode_file(p, size, resize), paths))
    images = [image for image, _ in results if image is not None]
    good = [i for i, (image, _) in enumerate(results) if image is not None]
    failures = [{"path": p, "reason": reason} for p, (image, reason) in zip(paths, results) if image is None]
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return stacked, np.array(good, np.int64), failures


def decode_all(image_dir: str, paths, size: int, resize: str, workers: int = 4) -> np.ndarray:
    """Every image decoded, or FeatcacheError naming the first one that is not."""
    images, _, failures = decode_paths([os.path.join(image_dir, p) for p in paths], size, resize, workers)
    if failures:
        raise FeatcacheError(f"{failures[0]['path']}: {failures[0]['reason']}")
    return images
