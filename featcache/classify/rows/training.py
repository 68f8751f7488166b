"""Rows of a feature set as training data: in memory when they fit the budget, streamed otherwise.

Heads never decode images: everything comes from the store. A :class:`Rows` is a set of row
indices of one feature set (a split, or a cross-validation fold) with their labels. Whether a
head loads its rows whole or streams them in chunks is decided once, by :func:`plan`, from the
float32 size of the rows it needs and the memory budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ...cache.store import FeatureSet
from ...errors import FeatcacheError
from . import DEFAULT_MEMORY_BUDGET_MB  # noqa: F401  (read as rows.training.DEFAULT_MEMORY_BUDGET_MB)

EVAL_CHUNK_BYTES = 64 << 20  # evaluation reads at most this much at a time, whatever the budget


class _Chunked:
    """What every kind of rows shares: size, chunked (optionally shuffled) reading, counts.
    Subclasses have ``rows`` (first axis: one entry per image), ``labels`` and ``_read``."""

    rows: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.row_bytes

    def load(self):
        """All features (float32) and labels in memory."""
        return self._read(self.rows), self.labels

    def chunks(self, chunk_rows: int, rng: np.random.Generator | None = None):
        """Yield (features float32, labels) piece by piece; with ``rng``, the order of the
        pieces and the rows inside each piece are shuffled (each piece is still read from
        HDF5 as sorted, mostly contiguous rows)."""
        starts = list(range(0, len(self.rows), max(1, chunk_rows)))
        if rng is not None:
            starts = [starts[i] for i in rng.permutation(len(starts))]
        for start in starts:
            piece = self.rows[start : start + chunk_rows]
            x = self._read(piece)
            y = self.labels[start : start + chunk_rows]
            if rng is not None:
                order = rng.permutation(len(piece))
                x, y = take(x, order), y[order]
            yield x, y

    def class_counts(self, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=num_classes)


def take(x, index):
    """``x[index]`` for one feature array or for the per-set list of a fused head."""
    return [part[index] for part in x] if isinstance(x, list) else x[index]


@dataclass
class Rows(_Chunked):
    """Sorted row indices of one feature set, with their labels and a name for messages."""

    fs: FeatureSet
    rows: np.ndarray
    labels: np.ndarray
    name: str
    # (N, K + 1) row indices of each row's cached augmented views (extract --augment), or None.
    views: np.ndarray | None = None

    @classmethod
    def of(cls, fs: FeatureSet, rows: np.ndarray, name: str) -> "Rows":
        rows = np.sort(np.asarray(rows, dtype=np.int64))
        return cls(fs, rows, fs.column("labels")[rows].astype(np.int64), name)

    @classmethod
    def split(cls, fs: FeatureSet, split: str) -> "Rows":
        rows = cls.of(fs, fs.rows(split), split)
        if split == "train":  # only training images have augmented views
            from ...extract.images.augment import view_rows

            rows.views = view_rows(fs, rows.rows)
        return rows

    @property
    def row_bytes(self) -> int:
        """Bytes of one row as float32 (what the heads compute in)."""
        return int(np.prod(self.fs.feature_shape)) * 4

    def _read(self, rows: np.ndarray) -> np.ndarray:
        return self.fs.read(rows).astype(np.float32, copy=False)


@dataclass
class FusedSet:
    """Several feature sets of the same images seen as one input of a fused head: features
    come as a list (one array per set), ``feature_shape`` as a tuple of shapes."""

    sets: list[FeatureSet]

    @property
    def name(self) -> str:
        return "+".join(fs.name for fs in self.sets)

    @property
    def class_names(self) -> list[str]:
        return self.sets[0].class_names

    @property
    def feature_shape(self) -> tuple[tuple[int, ...], ...]:
        return tuple(fs.feature_shape for fs in self.sets)


@dataclass
class FusedRows(_Chunked):
    """Images of a split in several feature sets: ``rows[:, i]`` are their rows in set i (see
    align.py), ordered by the first set's rows so that its reads stay contiguous."""

    fs: FusedSet
    rows: np.ndarray  # (N, S)
    labels: np.ndarray
    name: str
    views = None  # cached augmented views are per feature set: a fused head uses the plain rows

    @classmethod
    def of(cls, fs: FusedSet, rows: list[np.ndarray], labels: np.ndarray, name: str) -> "FusedRows":
        table = np.stack([np.asarray(r, dtype=np.int64) for r in rows], axis=1) if len(rows[0]) else \
            np.zeros((0, len(rows)), dtype=np.int64)
        order = np.argsort(table[:, 0], kind="stable")
        return cls(fs, table[order], np.asarray(labels, dtype=np.int64)[order], name)

    @property
    def row_bytes(self) -> int:
        return sum(int(np.prod(shape)) for shape in self.fs.feature_shape) * 4

    def _read(self, rows: np.ndarray) -> list[np.ndarray]:
        from .matched import read_rows

        return [read_rows(fs, rows[:, i]).astype(np.float32, copy=False) for i, fs in enumerate(self.fs.sets)]


@dataclass(frozen=True)
class Plan:
    """How a head reads its data: whole (``streaming`` False) or in chunks of ``chunk_rows``."""

    streaming: bool
    chunk_rows: int
    needed_mb: float
    budget_mb: float

    def to_dict(self) -> dict:
        return {"streaming": self.streaming, "chunk_rows": self.chunk_rows if self.streaming else None,
                "needed_mb": round(self.needed_mb, 3), "memory_budget_mb": self.budget_mb}


def plan(train: Rows, validation: Rows | None, budget_mb: float, batch_size: int = 1) -> Plan:
    """Stream when train+validation (as float32) exceed the budget.

    A streamed chunk takes at most half the budget (the other half is for the chunk being
    prefetched and the model), rounded down to whole batches so that only the last batch of
    an epoch can be short, as in in-memory training."""
    if budget_mb < 0:
        raise FeatcacheError(f"--memory-budget {budget_mb:g}: must be 0 (always stream) or more megabytes")
    needed = train.nbytes + (validation.nbytes if validation is not None else 0)
    budget = budget_mb * (1 << 20)
    streaming = needed > budget
    if streaming:
        rows = int(budget // 2 // train.row_bytes)
        chunk_rows = max(batch_size, rows // batch_size * batch_size)
    else:
        chunk_rows = max(1, EVAL_CHUNK_BYTES // train.row_bytes)
    return Plan(streaming, chunk_rows, needed / (1 << 20), budget_mb)


def eval_chunk_rows(rows: Rows, plan_: Plan | None = None) -> int:
    """Rows per piece when predicting: never more than the plan's chunk or 64 MiB."""
    limit = max(1, EVAL_CHUNK_BYTES // rows.row_bytes)
    return min(limit, plan_.chunk_rows) if plan_ is not None and plan_.streaming else limit


def batches_forever(rows: Rows, batch_size: int, chunk_rows: int, seed: int, shuffle: bool):
    """An endless generator of (x, y) batches, epoch after epoch, for Keras' fit with
    ``steps_per_epoch = steps(rows, ...)``. Each epoch reshuffles chunk order and rows
    within chunks from (seed, epoch), so the sequence is the same whatever Keras prefetches."""
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch]) if shuffle else None
        for x, y in rows.chunks(chunk_rows, rng):
            for start in range(0, len(y), batch_size):
                yield take(x, slice(start, start + batch_size)), y[start : start + batch_size]
        epoch += 1


def view_batches_forever(rows: Rows, batch_size: int, seed: int):
    """Endless (x, y) batches for a training split with cached views: each epoch draws one of
    the K + 1 views of every image, seeded by (seed, epoch), then shuffles. All views are held
    in memory (float32)."""
    table = rows.views
    flat = np.unique(table)
    x_all = rows.fs.read(flat).astype(np.float32, copy=False)
    where = np.searchsorted(flat, table)  # (N, V) positions in x_all
    epoch = 0
    while True:
        rng = np.random.default_rng([seed, epoch, 1])
        pick = where[np.arange(len(table)), rng.integers(0, table.shape[1], len(table))]
        order = rng.permutation(len(table))
        pick, labels = pick[order], rows.labels[order]
        for start in range(0, len(order), batch_size):
            yield x_all[pick[start : start + batch_size]], labels[start : start + batch_size]
        epoch += 1


def steps(rows: Rows, batch_size: int, chunk_rows: int) -> int:
    """Batches per epoch of :func:`batches_forever` (chunks are whole batches but the last)."""
    full, rest = divmod(len(rows), chunk_rows)
    return full * math.ceil(chunk_rows / batch_size) + math.ceil(rest / batch_size)
