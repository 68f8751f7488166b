"""``featcache similar``: the stored images most like each query, by cosine similarity of the
feature set's cached features. A query is a stored image (its relative path) or any image
file, which is decoded and run through the feature set's own base, size and settings first.

Search is exact below index.INDEX_MIN_ROWS rows (one matrix product per query over every stored
vector); at or above it, through the approximate index kept beside the store (see
:mod:`.index`): while that index is fresh, the features are not read at all (a stored query's
vector comes from the index), so a query costs about a millisecond on 100,000 rows.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ..errors import FeatcacheError
from . import index as nearest, neighbours
from .job import read_stored

DEFAULT_K = 5


def _query_vectors(files: list[str], store: str, name: str, weights: str | None) -> np.ndarray:
    """Vectors of image files, extracted on the fly as the feature set ``name`` was."""
    from ..cache.store import open_store
    from ..classify.graph.base_recipe import recipe_for
    from ..classify.runs.run_dir import feature_set_record
    from ..extract.bases.feature_model import FeatureModel
    from ..extract.images.decode import DecodeError, decode_image, read_bytes

    with open_store(store) as s:
        record = feature_set_record(s[name], store)
    recipe = recipe_for(record, store, weights)
    spec = recipe.spec
    model = FeatureModel(recipe.backbone, spec.input_size, recipe.weights, recipe.layer, spec.pooling,
                         spec.precision, recipe.seed)
    images = []
    for path in files:
        try:
            images.append(decode_image(read_bytes(path), spec.input_size, spec.resize))
        except DecodeError as exc:
            raise FeatcacheError(f"{path}: {exc}") from None
    features = model(np.stack(images)).astype(spec.dtype).astype(np.float32)  # as the store holds them
    if features.ndim == 4 and spec.backbone != "pixels":  # as read_vectors pools the stored ones
        features = features.mean(axis=(1, 2))
    return neighbours.vectors(features)


def similar(store: str, queries: list[str], k: int = DEFAULT_K, feature_set: str | None = None,
            base: str | None = None, weights: str | None = None) -> dict:
    started = time.perf_counter()
    if k < 1:
        raise FeatcacheError(f"-k {k}: must be at least 1")
    if not queries:
        raise FeatcacheError("no query given (a stored image's relative path, or an image file)")
    stored = read_stored(store, feature_set, base, vectors=False)
    index = None
    if len(stored.paths) >= nearest.INDEX_MIN_ROWS:
        index = nearest.open_fresh(store, stored.name, stored.digests)
    if index is None:  # exact search, or an index to build: the features are needed
        stored = read_stored(store, stored.name, None)
        if len(stored.paths) >= nearest.INDEX_MIN_ROWS:
            index = nearest.build(store, stored.name, stored.unit, stored.digests)
    paths, splits, labels, names, v = stored.paths, stored.splits, stored.labels, stored.class_names, stored.unit
    where = {p: i for i, p in enumerate(paths)}
    files = [q for q in queries if q not in where]
    for q in files:
        if not os.path.isfile(q):
            raise FeatcacheError(f"{q}: neither a stored image of {stored.name} (paths are relative to the image "
                                 "folder) nor an image file")
    extracted = dict(zip(files, _query_vectors(files, store, stored.name, weights))) if files else {}
    name = stored.name
    results = []
    for q in queries:
        stored = q in where
        if stored:
            qv = index.vectors([where[q]]) if index is not None else v[where[q]][None]
        else:
            qv = extracted[q][None]
        if index is not None:
            sims, idx = index.search(qv, k + (1 if stored else 0))
        else:
            sims, idx = neighbours.knn(v, k + (1 if stored else 0), queries=qv, exclude_self=False)
        hits = [(float(sv), int(i)) for sv, i in zip(sims[0], idx[0]) if i >= 0 and not (stored and i == where[q])][:k]
        results.append({"query": q, "stored": stored, "neighbors": [
            {"path": paths[i], "split": str(splits[i]) or None, "label": names[int(labels[i])] if labels is not None else None,
             "similarity": round(sv, 6)} for sv, i in hits]})
    return {"store": store, "feature_set": name, "k": k, "results": results,
            "search": "index" if index is not None else "exact",
            "seconds": round(time.perf_counter() - started, 3)}
