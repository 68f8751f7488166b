"""Nearest neighbours of cached feature vectors: exact cosine search in blocks (memory stays
flat), near-duplicate groups, outlier scores, and the queries of ``featcache similar``.

Vectors are the cached features (a network's average-pooled when spatial, see job.read_vectors),
L2-normalized; similarity is their dot product (cosine). Exact search costs N x N x D multiply-adds in blocks of rows.
"""
from __future__ import annotations

import numpy as np

BLOCK_ROWS = 2048  # query rows per matrix product: at most BLOCK_ROWS x N similarities at a time,
BLOCK_BYTES = 128 << 20  # and at most this many bytes of them (with their int64 partition: 3x)
OUTLIER_NEIGHBOURS = 5
# A row's near duplicates are looked for among its 10 nearest (groups chain further): pairs stay
# O(N) when features crowd together (10,000 look-alikes held 50 million pairs, 17 GB, when every
# pair above the threshold was kept).
PAIR_NEIGHBOURS = 10
# Robust z-score (median and MAD of the outlier scores) above which a row is flagged.
OUTLIER_Z = 3.5


def vectors(features: np.ndarray) -> np.ndarray:
    """(N, D) float32 unit-length copies of feature vectors (flattened)."""
    x = np.asarray(features, dtype=np.float32)
    x = x.reshape(len(x), -1)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def block_rows(n: int) -> int:
    """Query rows per block against ``n`` stored rows: memory stays flat however large n grows."""
    return int(max(1, min(BLOCK_ROWS, BLOCK_BYTES // (4 * max(n, 1)))))


def knn(v: np.ndarray, k: int, queries: np.ndarray | None = None, exclude_self: bool = True):
    """(similarities, indices), each (Q, k), best first, of ``queries`` (default: every row of
    ``v`` against the others) among the rows of ``v``."""
    q = v if queries is None else queries
    k = min(k, len(v) - (1 if exclude_self and queries is None else 0))
    sims = np.empty((len(q), k), np.float32)
    idx = np.empty((len(q), k), np.int64)
    step = block_rows(len(v))
    for start in range(0, len(q), step):
        s = q[start : start + step] @ v.T
        if exclude_self and queries is None:
            s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf
        part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else np.tile(np.arange(s.shape[1]), (len(s), 1))
        ps = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-ps, axis=1, kind="stable")
        idx[start : start + len(s)] = np.take_along_axis(part, order, axis=1)
        sims[start : start + len(s)] = np.take_along_axis(ps, order, axis=1)
    return sims, idx


def scan(v: np.ndarray, threshold: float, k: int = OUTLIER_NEIGHBOURS):
    """One exact pass: (the pairs at or above ``threshold`` among each row's PAIR_NEIGHBOURS
    nearest, as :func:`pairs_among`; the k nearest other rows of every row as (similarities,
    indices), each (N, k), best first)."""
    sims, idx = knn(v, max(k, PAIR_NEIGHBOURS)) if len(v) > 1 else (np.zeros((len(v), 0), np.float32),
                                                                      np.zeros((len(v), 0), np.int64))
    return pairs_among(sims, idx, threshold), (sims[:, :k], idx[:, :k])


def pairs_among(sims: np.ndarray, idx: np.ndarray, threshold: float):
    """(a, b, similarity) arrays of the pairs a < b at or above ``threshold`` among each row's
    nearest (``idx`` -1: none found), each pair once, sorted by (a, b)."""
    rows, cols = np.nonzero((sims >= threshold) & (idx >= 0))
    return unique_pairs(rows, idx[rows, cols], sims[rows, cols])


def unique_pairs(i: np.ndarray, j: np.ndarray, s: np.ndarray):
    """(a, b, similarity) with a = min(i, j) < b = max(i, j), each pair once (its first
    similarity), sorted by (a, b)."""
    a, b = np.minimum(i, j).astype(np.int64), np.maximum(i, j).astype(np.int64)
    keep = a != b
    a, b, s = a[keep], b[keep], np.asarray(s, np.float32)[keep]
    if not len(a):
        return a, b, s
    _, first = np.unique(np.stack([a, b], axis=1), axis=0, return_index=True)
    return a[first], b[first], s[first]


def standing_out(top_sims: np.ndarray, top_idx: np.ndarray, floor: float, gap: float):
    """(a, b, similarity) arrays of mutual nearest neighbours whose similarity reaches ``floor``
    and exceeds the next best similarity of either by ``gap``: a copy stands out from its
    original's other neighbours even when resizing and re-encoding moved it further than two
    distinct photos can be."""
    if top_sims.shape[1] < 2:
        return unique_pairs(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    nn, s1, s2 = top_idx[:, 0], top_sims[:, 0], top_sims[:, 1]
    i = np.arange(len(nn))
    mutual = (nn >= 0) & (nn[np.maximum(nn, 0)] == i) & (i < nn) & (s1 >= floor)
    i = i[mutual]
    j = nn[i]
    clear = s1[i] - np.maximum(s2[i], s2[j]) >= gap
    return unique_pairs(i[clear], j[clear], s1[i][clear])


def outlier_scores_of(top_sims: np.ndarray) -> np.ndarray:
    """1 - the mean similarity to the k nearest other rows (higher: more isolated)."""
    return 1.0 - top_sims.mean(axis=1).astype(np.float64)


def groups(n: int, a: np.ndarray, b: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """(connected groups of two or more nodes, each node's component label) of the graph on
    n nodes with edges a[k]-b[k] (scipy's connected components: no Python loop per edge)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    sizes = np.bincount(labels)
    split = np.split(order, np.cumsum(sizes)[:-1])
    return [members for members in split if len(members) > 1], labels


def flag_outliers(scores: np.ndarray, z: float = OUTLIER_Z) -> np.ndarray:
    """Rows whose robust z-score ((score - median) / (1.4826 MAD)) exceeds ``z``, worst first."""
    if len(scores) < 3:
        return np.zeros(0, np.int64)
    median = np.median(scores)
    mad = np.median(np.abs(scores - median)) * 1.4826
    robust = (scores - median) / max(mad, 1e-12)
    rows = np.flatnonzero(robust > z)
    return rows[np.argsort(-scores[rows], kind="stable")]
