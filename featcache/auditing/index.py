"""The approximate nearest-neighbour index of a feature set, kept beside its store: ``STORE.index/``
holds ``KEY.faiss`` and ``KEY.json`` for each feature set KEY that reached :data:`INDEX_MIN_ROWS`
rows (below it the exact search of :mod:`.neighbours` is as fast, see docs/audit.md).

faiss (MIT) index_factory ``PCA128,HNSW32,RFlat`` on the unit vectors, L2 (the same order as
cosine on unit vectors: |a - b|^2 = 2 - 2 cos): an HNSW graph on 128-dimensional PCA projections
finds ``K_FACTOR * k`` candidates, re-ranked exactly on the full vectors, which the refine
stage keeps (so a stored query's vector comes from the index, not from the store). usearch was
measured too: its HNSW on the full 1,280 dimensions took 3x faiss' time to build at 10,000 rows.

The index is trusted only while it describes the feature set's active rows: the JSON records
their number and a fingerprint of their content digests (in row order), which the store keeps
anyway; ``extract`` adding rows, a changed image or a repaired row changes them, and the
index is rebuilt. An index file whose size or CRC-32 differs from the record's, that cannot
be read, or holds another number of vectors or dimensions, is rebuilt too. Nothing is saved where the store's folder is read-only.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zlib

import numpy as np

from . import neighbours

# Below: exact search. Measured (benchmarks/audit.py --speed, 2 cores): the exact pass took 8 s at
# 10,000 rows and 25 s at 15,000; building the index and searching it 10 s at both (2 s once saved).
INDEX_MIN_ROWS = 12_000
PCA_DIMS = 128
HNSW_LINKS = 32
EF_SEARCH = 48  # candidates the graph search keeps
K_FACTOR = 4  # candidates re-ranked exactly per neighbour asked for
INDEX_FORMAT = 1


def folder(store: str | os.PathLike) -> str:
    return os.fspath(store) + ".index"


def fingerprint(digests) -> str:
    """The rows' identity: a hash of their content digests, in row order."""
    h = hashlib.blake2b(digest_size=16)
    h.update("\n".join(digests).encode())
    return f"{len(digests)}:{h.hexdigest()}"


def factory(dim: int) -> str:
    return (f"PCA{PCA_DIMS}," if dim >= 2 * PCA_DIMS else "") + f"HNSW{HNSW_LINKS},RFlat"


class Index:
    """A loaded or built faiss index over the rows of one feature set (labels: row positions)."""

    def __init__(self, index, built: bool, saved: str | None):
        import faiss

        self.index, self.built, self.saved = index, built, saved
        self.params = faiss.IndexRefineSearchParameters(
            k_factor=K_FACTOR, base_index_params=faiss.SearchParametersHNSW(efSearch=EF_SEARCH))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def vectors(self, rows) -> np.ndarray:
        """The stored unit vectors of some rows (the refine stage keeps them whole)."""
        return np.stack([self.index.reconstruct(int(r)) for r in rows])

    def search(self, queries: np.ndarray, k: int):
        """(cosine similarities, row positions), each (Q, k), best first; -inf / -1 where the graph
        found fewer than k rows."""
        k = min(k, len(self))
        distances, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k, params=self.params)
        sims = (1.0 - distances / 2.0).astype(np.float32)
        sims[idx < 0] = -np.inf
        return sims, idx.astype(np.int64)


def checksum(path: str) -> str:
    """CRC-32 of a file, read in pieces (about 1 s per GB here: the price of never trusting a damaged index)."""
    crc = 0
    with open(path, "rb") as f:
        while piece := f.read(16 << 20):
            crc = zlib.crc32(piece, crc)
    return f"{crc:08x}"


def _paths(store, name: str) -> tuple[str, str]:
    base = os.path.join(folder(store), name)
    return base + ".faiss", base + ".json"


def open_fresh(store, name: str, digests, dim: int | None = None) -> Index | None:
    """The saved index of feature set ``name`` when it describes exactly these rows, else None."""
    import faiss

    data, meta = _paths(store, name)
    try:
        with open(meta) as f:
            record = json.load(f)
        if (record.get("format") != INDEX_FORMAT or record.get("fingerprint") != fingerprint(digests)
                or record.get("bytes") != os.path.getsize(data) or record.get("crc32") != checksum(data)):
            return None
        index = faiss.read_index(data)
    except (OSError, ValueError, RuntimeError):  # missing, unreadable or corrupt: rebuilt by the caller
        return None
    # (the downcast wrapper does not own the index: only looked at, the loaded one is kept)
    if (index.ntotal != len(digests) or (dim is not None and index.d != dim)
            or not isinstance(faiss.downcast_index(index), faiss.IndexRefine)):
        return None
    return Index(index, built=False, saved=data)


def build(store, name: str, unit: np.ndarray, digests) -> Index:
    """A new index of ``unit`` (N, D) unit vectors, saved beside the store when its folder is writable."""
    import faiss

    if faiss.omp_get_max_threads() > (os.cpu_count() or 1):
        faiss.omp_set_num_threads(os.cpu_count() or 1)
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    index = faiss.index_factory(unit.shape[1], factory(unit.shape[1]), faiss.METRIC_L2)
    index.train(unit[:: max(1, len(unit) // 20_000)])  # PCA from up to ~20,000 rows
    index.add(unit)
    data, meta = _paths(store, name)
    saved = None
    try:
        os.makedirs(folder(store), exist_ok=True)
        for path, write in ((data, lambda p: faiss.write_index(index, p)), (meta, None)):
            fd, tmp = tempfile.mkstemp(dir=folder(store), suffix=".tmp")
            os.close(fd)
            if write is not None:
                write(tmp)
            else:
                with open(tmp, "w") as f:
                    json.dump({"format": INDEX_FORMAT, "feature_set": name, "rows": len(unit), "dim": unit.shape[1],
                               "fingerprint": fingerprint(digests), "bytes": os.path.getsize(data),
                               "crc32": checksum(data),
                               "factory": factory(unit.shape[1]), "faiss": faiss.__version__}, f, indent=1)
            os.replace(tmp, path)
        saved = data
    except (OSError, RuntimeError):  # a read-only folder: the index serves this command only
        pass
    return Index(index, built=True, saved=saved)


def load_or_build(store, name: str, unit: np.ndarray, digests) -> Index:
    return open_fresh(store, name, digests, unit.shape[1]) or build(store, name, unit, digests)


def neighbour_lists(index: Index, unit: np.ndarray, k: int, batch: int = 8192):
    """The k nearest other rows of every row, (similarities, positions), each (N, k), best
    first; a row's own entry is dropped (when exact copies tie with it, any one of them)."""
    n = len(unit)
    k = max(1, min(k, n - 1))
    top_sims = np.full((n, k), -1.0, np.float32)  # -1: not found (the least cosine)
    top_idx = np.full((n, k), -1, np.int64)
    for start in range(0, n, batch):
        sims, idx = index.search(unit[start : start + batch], k + 1)
        own = np.arange(start, start + len(idx))[:, None]
        keep = idx != own
        keep[keep.sum(axis=1) > k, -1] = False  # self not found: drop the last candidate instead
        # Every row now keeps exactly k of its k + 1 (self, or the last): one gather, in row order.
        top_idx[start : start + len(idx)] = idx[keep].reshape(len(idx), k)
        top_sims[start : start + len(idx)] = sims[keep].reshape(len(idx), k)
    return top_sims, top_idx


def scan(store, name: str, unit: np.ndarray, digests, threshold: float, k: int = neighbours.OUTLIER_NEIGHBOURS):
    """What :func:`.neighbours.scan` answers (pairs at or above ``threshold``, every row's k nearest
    others), exact below INDEX_MIN_ROWS and from the saved (or newly built) index at or above it,
    pairs looked for among each row's PAIR_NEIGHBOURS nearest either way; and how it was searched."""
    if len(unit) < INDEX_MIN_ROWS:
        return neighbours.scan(unit, threshold, k), {"search": "exact"}
    index = load_or_build(store, name, unit, digests)
    sims, idx = neighbour_lists(index, unit, max(k, neighbours.PAIR_NEIGHBOURS))
    how = {"search": "index", "index": index.saved, "index_built": index.built}
    return (neighbours.pairs_among(sims, idx, threshold), (sims[:, :k], idx[:, :k])), how
