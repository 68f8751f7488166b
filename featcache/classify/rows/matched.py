"""Rows of several feature sets matched image by image: the same (path, content digest).

Feature sets of one image folder, extracted with different bases, layers, sizes or into
different stores, hold the same images in different row orders (and possibly different
subsets, when an image failed for one base or a set was extracted before images were added).
Everything that puts several feature sets side by side goes through :func:`align`:
``compare`` (each set scored on the images every set holds), fused heads and ensembles (which
need exactly the same images, labels and splits, row by row).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...cache.store import FeatureSet
from ...errors import FeatcacheError

from ...cache.layout import SPLITS


@dataclass
class Aligned:
    """Images common to every source, in one order (sorted by path, then digest).

    ``rows[i]`` are source i's row indices in that order; ``paths``, ``digests``, ``labels``
    and ``splits`` are the images' columns (the same in every source)."""

    paths: np.ndarray
    digests: np.ndarray
    labels: np.ndarray
    splits: np.ndarray
    rows: list[np.ndarray]
    dropped: int  # rows of the sources left out because not every source has their image

    def __len__(self) -> int:
        return len(self.paths)

    def split(self, name: str) -> np.ndarray:
        """Positions (into this alignment) of the images of one split."""
        return np.flatnonzero(self.splits == name)


def _keys(fs: FeatureSet) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = fs.rows()
    return rows, fs.column("paths")[rows], fs.column("digests")[rows]


def align(sets: list[FeatureSet], labels: list[str] | None = None, strict: bool = True, what: str = "") -> Aligned:
    """Match the active rows of ``sets`` by (relative path, image digest).

    ``labels`` name the sources in messages (default: the feature-set names); ``what`` is the
    task, for messages (e.g. "an ensemble needs the same images"). Refused in one line: other
    class names, an image given another split or label by one source, and with ``strict``,
    any image that one source has and another lacks."""
    labels = labels or [fs.name for fs in sets]
    need = f"; {what}" if what else ""
    names = sets[0].class_names
    keyed = []
    for fs, label in zip(sets, labels):
        if fs.class_names != names:
            raise FeatcacheError(f"{labels[0]} and {label} have different classes ({', '.join(names)} vs "
                                 f"{', '.join(fs.class_names)}){need}")
        rows, paths, digests = _keys(fs)
        keyed.append((fs, label, dict(zip(zip(paths.tolist(), digests.tolist()), rows.tolist()))))
    common = set(keyed[0][2]).intersection(*(set(k) for _, _, k in keyed[1:]))
    if strict:
        for fs, label, by_key in keyed[1:]:
            first = keyed[0][2]
            only_first, only_this = set(first) - set(by_key), set(by_key) - set(first)
            if only_first or only_this:
                example = min(only_first or only_this)[0]
                raise FeatcacheError(
                    f"{labels[0]} and {label} do not cover the same images: {len(only_first)} of {labels[0]}'s "
                    f"images are not in {label} and {len(only_this)} of {label}'s are not in {labels[0]} "
                    f"(e.g. {example}){need}")
    ordered = sorted(common)
    dropped = sum(len(k) for _, _, k in keyed) - len(ordered) * len(keyed)
    per_source, reference = [], None
    for fs, label, by_key in keyed:
        rows = np.array([by_key[key] for key in ordered], dtype=np.int64)
        splits = fs.column("splits")[rows] if len(rows) else np.array([], dtype=str)
        row_labels = fs.column("labels")[rows].astype(np.int64) if len(rows) else np.array([], dtype=np.int64)
        if reference is None:
            reference = (splits, row_labels, label)
        elif not (np.array_equal(splits, reference[0]) and np.array_equal(row_labels, reference[1])):
            moved = int(np.sum((splits != reference[0]) | (row_labels != reference[1])))
            raise FeatcacheError(f"{reference[2]} and {label} give {moved} images a different split or label "
                                 f"(extracted with different --split/--split-seed?){need}")
        per_source.append(rows)
    paths = np.array([p for p, _ in ordered], dtype=object)
    digests = np.array([d for _, d in ordered], dtype=object)
    return Aligned(paths, digests, reference[1], reference[0], per_source, dropped)


def read_rows(fs: FeatureSet, rows: np.ndarray) -> np.ndarray:
    """Features of ``rows`` in the given order (HDF5 reads them sorted, in contiguous runs)."""
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows),) + fs.feature_shape, dtype=fs.features.dtype)
    out[order] = fs.read(rows[order])
    return out
