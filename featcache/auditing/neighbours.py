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
    """One pass over all pairs: (every pair i < j at or above ``threshold``, the k nearest other
    rows of every row as (similarities, indices), each (N, k), best first)."""
    n = len(v)
    k = max(1, min(k, n - 1))
    pairs = []
    top_sims = np.zeros((n, k), np.float32)
    top_idx = np.zeros((n, k), np.int64)
    step = block_rows(n)
    for start in range(0, n, step):
        s = v[start : start + step] @ v.T
        rows, cols = np.nonzero(s >= threshold)
        pairs += [(start + r, c, float(s[r, c])) for r, c in zip(rows.tolist(), cols.tolist()) if start + r < c]
        if n < 2:
            break
        s[np.arange(len(s)), np.arange(start, start + len(s))] = -np.inf
        part = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
        sims = np.take_along_axis(s, part, axis=1)
        order = np.argsort(-sims, axis=1, kind="stable")
        top_idx[start : start + len(s)] = np.take_along_axis(part, order, axis=1)
        top_sims[start : start + len(s)] = np.take_along_axis(sims, order, axis=1)
    return pairs, (top_sims, top_idx)


def standing_out(top_sims: np.ndarray, top_idx: np.ndarray, floor: float, gap: float) -> list[tuple[int, int, float]]:
    """Pairs of mutual nearest neighbours whose similarity reaches ``floor`` and exceeds the next
    best similarity of either by ``gap``: a copy stands out from its original's other neighbours
    even when resizing and re-encoding moved it further than two distinct photos can be."""
    if top_sims.shape[1] < 2:
        return []
    nn, s1, s2 = top_idx[:, 0], top_sims[:, 0], top_sims[:, 1]
    out = []
    for i in np.flatnonzero((nn[nn] == np.arange(len(nn))) & (np.arange(len(nn)) < nn) & (s1 >= floor)).tolist():
        j = int(nn[i])
        if s1[i] - max(s2[i], s2[j]) >= gap:
            out.append((i, j, float(s1[i])))
    return out


def outlier_scores_of(top_sims: np.ndarray) -> np.ndarray:
    """1 - the mean similarity to the k nearest other rows (higher: more isolated)."""
    return 1.0 - top_sims.mean(axis=1).astype(np.float64)


def groups(n: int, edges) -> list[list[int]]:
    """Connected groups (of two or more) of the graph on n nodes with ``edges`` (union-find)."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(find(i), []).append(i)
    return [m for m in members.values() if len(m) > 1]


def flag_outliers(scores: np.ndarray, z: float = OUTLIER_Z) -> np.ndarray:
    """Rows whose robust z-score ((score - median) / (1.4826 MAD)) exceeds ``z``, worst first."""
    if len(scores) < 3:
        return np.zeros(0, np.int64)
    median = np.median(scores)
    mad = np.median(np.abs(scores - median)) * 1.4826
    robust = (scores - median) / max(mad, 1e-12)
    rows = np.flatnonzero(robust > z)
    return rows[np.argsort(-scores[rows], kind="stable")]
