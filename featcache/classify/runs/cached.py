"""A run's class probabilities read from the cache: the images of a set of runs matched across
their feature sets, their features read from the stores (and, for runs that take images, the
images decoded from the image folder), each run's probabilities for a split."""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from ...cache.exclude import excluding
from ...cache.layout import SPLITS
from ...cache.store import open_store
from ...errors import FeatcacheError
from ..rows.matched import Aligned, align, read_rows
from ..rows.training import EVAL_CHUNK_BYTES
from . import run_dir as rundir
from .kinds import ImageInput, Run, load_run, unique


def open_recorded_set(stack: contextlib.ExitStack, record: dict, owner: str, needs: str = "its cached features"):
    """The feature set a run recorded (``record``: its store and name), opened on ``stack``;
    FeatcacheError naming the store and the run when the store or the set is gone."""
    store = record.get("store") or ""
    if not os.path.isfile(store):
        raise FeatcacheError(f"the run's store {store} is missing (moved or deleted); {owner} needs {needs}")
    s = stack.enter_context(open_store(store))
    if record["name"] not in s.feature_set_names():
        raise FeatcacheError(f"{store}: feature set {record['name']} of run {owner} is gone from this store")
    return s[record["name"]]


class CachedInputs:
    """The images of a set of runs, matched across their feature sets (by path and content
    digest, see align.py), with their features read from the stores and, for runs that take
    images, the images decoded from the image folder. A context manager (stores stay open)."""

    def __init__(self, runs: list[Run], what: str = ""):
        self.runs = runs
        # Rows a run was trained without (--exclude) stay out of its splits here too.
        self.excluded = sorted({p for run in runs for p in rundir.excluded(run.config)})
        self.row_sets = unique([r for run in runs for r in run.row_sets], lambda r: (r["store"], r["name"]))
        decoding = [run for run in runs if run.image_inputs and not getattr(run, "boundary", None)]
        self.image_inputs = sorted({i for run in decoding for i in run.image_inputs})
        self.image_root = next((run.image_root for run in decoding), "")
        self._stack = contextlib.ExitStack()
        self.sets, labels = [], []
        self.boundaries = {}  # run index -> (boundary feature set, {image digest: row})
        try:
            if self.excluded:
                self._stack.enter_context(excluding(self.excluded))
            for record in self.row_sets:
                self.sets.append(self._open(record))
                labels.append(f"{self.owner(record)} ({record['name']})" if len(runs) > 1 else record["name"])
            self.aligned: Aligned = align(self.sets, labels, strict=True, what=what)
            for j, run in enumerate(runs):
                if getattr(run, "boundary", None):
                    self.boundaries[j] = self._open_boundary(run)
        except BaseException:
            self._stack.close()
            raise
        # Where each feature set's features are read: the first store that has it.
        self.source = {}
        for i, record in enumerate(self.row_sets):
            self.source.setdefault(record["name"], i)

    def owner(self, record: dict) -> str:
        """The run directory (the first) that reads this feature-set record."""
        return next(run.run_dir for run in self.runs if record in run.row_sets)

    def _open(self, record: dict):
        return open_recorded_set(self._stack, record, self.owner(record), "its cached features and splits")

    def _open_boundary(self, run):
        store, name = run.boundary["store"], run.boundary["feature_set"]
        fs = open_recorded_set(self._stack, {"store": store, "name": name}, run.run_dir, "its boundary activations")
        rows = fs.rows()
        by_digest = dict(zip(fs.column("digests")[rows].tolist(), rows.tolist()))
        missing = sum(d not in by_digest for d in self.aligned.digests)
        if missing:
            raise FeatcacheError(f"{store}: feature set {name} lacks {missing} of the images of run {run.run_dir}; "
                                 "run the extract command of its boundary again to add them")
        return fs, by_digest

    def changed_notes(self) -> list[str]:
        """What changed in the feature sets since the runs were trained (their recorded digests)."""
        return [f"feature set {record['name']} changed since the run was trained (images added, removed, "
                "relabelled or re-split): per-image results are for its current rows, the recorded metrics "
                "for the rows it was trained on"
                for record, fs in zip(self.row_sets, self.sets)
                if record.get("digest") and rundir.feature_set_digest(fs) != record["digest"]]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def _images(self, positions: np.ndarray) -> dict[ImageInput, np.ndarray]:
        from ...extract.images.decode import DecodeError, decode_image, read_bytes

        if not self.image_inputs:
            return {}
        if not self.image_root or not os.path.isdir(self.image_root):
            raise FeatcacheError(f"{self.image_root or '(none recorded)'}: the image folder of the fine-tuned run is "
                                 "missing; its probabilities need the images")
        out = {i: np.empty((len(positions), i.size, i.size, 3), np.uint8) for i in self.image_inputs}
        for n, p in enumerate(positions):
            path = os.path.join(self.image_root, self.aligned.paths[p])
            try:
                data = read_bytes(path)
                if hashlib.sha256(data).hexdigest() != self.aligned.digests[p]:
                    raise FeatcacheError(f"{path}: changed since its features were extracted (content digest differs); "
                                         "extract again")
                for i in self.image_inputs:
                    out[i][n] = decode_image(data, i.size, i.resize)
            except DecodeError as exc:
                raise FeatcacheError(f"{path}: {exc}") from None
        return out

    def probabilities(self, positions: np.ndarray) -> list[np.ndarray]:
        """(len(positions), K) probabilities of each run, for images at ``positions`` of the
        alignment, read piece by piece (at most ~64 MiB of features and images at a time)."""
        names = unique([r for run in self.runs for r in run.feature_sets], lambda r: r["name"])
        row_bytes = sum(int(np.prod(self.sets[self.source[r["name"]]].feature_shape)) * 4 for r in names)
        row_bytes += sum(i.size * i.size * 3 for i in self.image_inputs)
        row_bytes += sum(int(np.prod(fs.feature_shape)) * 4 for fs, _ in self.boundaries.values())
        chunk = max(1, EVAL_CHUNK_BYTES // max(1, row_bytes))
        k = len(self.runs[0].class_names)
        out = [np.zeros((0, k))] * len(self.runs) if len(positions) == 0 else [[] for _ in self.runs]
        for start in range(0, len(positions), chunk):
            piece = positions[start : start + chunk]
            features = {}
            for record in names:
                i = self.source[record["name"]]
                features[record["name"]] = read_rows(self.sets[i], self.aligned.rows[i][piece]).astype(np.float32)
            images = self._images(piece)
            for j, run in enumerate(self.runs):
                if j in self.boundaries:
                    fs, by_digest = self.boundaries[j]
                    rows = np.array([by_digest[d] for d in self.aligned.digests[piece]], dtype=np.int64)
                    out[j].append(run.boundary_proba(read_rows(fs, rows).astype(np.float32)))
                else:
                    out[j].append(run.proba(features, images))
        return [o if isinstance(o, np.ndarray) else np.concatenate(o) for o in out]


@dataclass
class SplitProbabilities:
    """One split's images of a run: paths (relative to the run's image folder, sorted), labels
    (indices into the run's class names), (N, K) float64 probabilities, and caveats."""

    paths: np.ndarray
    labels: np.ndarray
    proba: np.ndarray
    notes: list[str] = field(default_factory=list)

    def __iter__(self):  # paths, labels, proba = split_probabilities(...)
        return iter((self.paths, self.labels, self.proba))

    def __getitem__(self, i):  # split_probabilities(...)[2]: the probabilities
        return (self.paths, self.labels, self.proba)[i]


def split_probabilities(run_dir: str, split: str, run: Run | None = None) -> SplitProbabilities:
    """(paths, labels, probabilities) of a split's images, for any kind of run, from the cache.

    Probabilities are what ``predict`` would give for those images. Heads, fused heads and
    ensembles of them read only the stores; a fine-tuned run (an end-to-end model) reads the
    boundary activations it was trained from when that store is there, and otherwise decodes
    its images, whose content is checked against the digests stored at extraction."""
    if split not in SPLITS:
        raise FeatcacheError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    run = run or load_run(run_dir)  # model files' sha256 checked before loading
    with CachedInputs([run]) as cache:
        where = cache.aligned.split(split)
        notes = cache.changed_notes()
        result = SplitProbabilities(cache.aligned.paths[where], cache.aligned.labels[where],
                                    cache.probabilities(where)[0], notes)
    if getattr(run, "boundary_missing", False):
        result.notes.append(f"the boundary store {run.config['boundary']['store']} the run trained from is missing; "
                            "the images were decoded instead")
    return result
