"""Any run directory as one object: what it reads, and how that becomes class probabilities.

Every command that uses a trained run goes through :func:`load_run`, whatever its kind:

- ``head``: one head (dense or logreg) on one feature set;
- ``fused``: one head on several feature sets of the same images (``train --feature-sets``);
- ``finetune``: an end-to-end model (images in), from ``featcache finetune``;
- ``ensemble``: a weighted average of member runs of the kinds above (``featcache ensemble``).

A run reads cached features (``feature_sets``: records with the store, key and shape) and/or
decoded images (``image_inputs``: a fine-tuned model takes images). :meth:`Run.proba` maps
both to (N, K) probabilities; ``predict`` computes them from new image files, ``export``
builds the same function as one Keras model, and :func:`split_probabilities` reads them from
the cache for the images of a split (what reports and ensembles need).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass

import numpy as np

from ...cache.store import open_store
from ...errors import FeatcacheError
from ..heads.base import two_columns
from . import run_dir as rundir
from ..rows.matched import Aligned, align, read_rows
from ..rows.training import EVAL_CHUNK_BYTES

@dataclass(frozen=True, order=True)
class ImageInput:
    """Images decoded and resized as extraction did: (size, size, 3), Pillow ``resize``."""

    size: int
    resize: str


def image_input(record: dict) -> ImageInput:
    return ImageInput(int(record["key"]["input_size"]), str(record["key"]["resize"]))


def _unique(records: list[dict], key) -> list[dict]:
    seen, out = set(), []
    for record in records:
        if key(record) not in seen:
            seen.add(key(record))
            out.append(record)
    return out


class Run:
    """A loaded run directory (model files verified before loading)."""

    kind = ""
    can_be_member = True  # of an ensemble

    def __init__(self, run_dir: str, config: dict):
        self.run_dir, self.config = run_dir, config
        self.class_names: list[str] = rundir.class_names(config)
        self.feature_sets: list[dict] = []  # the features its model reads (one record per set name)
        self.row_sets: list[dict] = []  # the feature sets whose rows are its images, labels, splits
        self.image_inputs: list[ImageInput] = []  # images it reads directly (end-to-end models)
        self.image_root = ""  # where those images are (for split_probabilities)

    @property
    def label(self) -> str:
        """A short description for tables and titles."""
        raise NotImplementedError

    @property
    def decoded_inputs(self) -> list[ImageInput]:
        """Every (size, resize) new images are decoded at for this run: its feature sets' and
        its end-to-end models', in increasing size (one model input each, see end_to_end)."""
        return sorted({image_input(r) for r in self.feature_sets} | set(self.image_inputs))

    def proba(self, features: dict[str, np.ndarray], images: dict[ImageInput, np.ndarray]) -> np.ndarray:
        """(N, K) float64 class probabilities from {feature-set name: features} and
        {ImageInput: uint8 images} (each holding what this run reads)."""
        raise NotImplementedError

    def probabilities_tensor(self, keras, features: dict, images: dict, prefix: str = ""):
        """The same as :meth:`proba` on Keras tensors: this kind's part of the end-to-end model
        (graph/build.py builds the bases that give ``features``)."""
        raise NotImplementedError


class HeadRun(Run):
    """A dense or logreg head on one feature set (kind ``head``) or on several (``fused``)."""

    def __init__(self, run_dir: str, config: dict):
        super().__init__(run_dir, config)
        self.kind = rundir.run_kind(config)
        self.config, self.head = rundir.load_head(run_dir, config)
        self.feature_sets = list(rundir.feature_records(config))
        self.row_sets = self.feature_sets
        self.image_root = self.feature_sets[0].get("image_root", "")

    @property
    def feature_names(self) -> list[str]:
        return [r["name"] for r in self.feature_sets]

    @property
    def label(self) -> str:
        return f"{self.head.name} on {'+'.join(self.feature_names)}"

    def head_input(self, features: dict):
        """What the head takes: one array, or the per-set list of a fused head."""
        names = self.feature_names
        return [features[n] for n in names] if self.head.fused else features[names[0]]

    def proba(self, features, images=None) -> np.ndarray:
        return self.head.predict_proba(self.head_input(features))

    def probabilities_tensor(self, keras, features, images, prefix=""):
        return self.head.graph(keras, self.head_input(features), prefix)


class FinetuneRun(Run):
    """An end-to-end model from ``featcache finetune``: images in, probabilities out."""

    kind = "finetune"

    def __init__(self, run_dir: str, config: dict):
        import keras

        super().__init__(run_dir, config)
        path = rundir.verify_model(run_dir, config)
        self.model = keras.saving.load_model(path, safe_mode=True, compile=False)
        record = config["feature_set"]
        self.row_sets = [record]
        self.image_inputs = [image_input(record)]
        self.image_root = config.get("image_root") or record.get("image_root", "")
        # A run trained from cached boundary activations can be scored from them (top block +
        # head only) while that store is there; otherwise its images are decoded.
        boundary = config.get("boundary") or {}
        self.boundary = boundary if boundary.get("store") and os.path.isfile(boundary["store"]) else None
        self.boundary_missing = bool(boundary.get("store")) and self.boundary is None
        self._top = None

    @property
    def label(self) -> str:
        return f"fine-tuned ({self.config['settings'].get('unfreeze', 'top')}) {self.config['feature_set']['name']}"

    def proba(self, features, images) -> np.ndarray:
        x = np.asarray(images[self.image_inputs[0]], dtype=np.float32)
        return two_columns(self.model.predict_on_batch(x))

    def probabilities_tensor(self, keras, features, images, prefix=""):
        return self.model(images[self.image_inputs[0]])  # saved with (N, K) outputs, images in

    def boundary_proba(self, activations: np.ndarray) -> np.ndarray:
        """The same probabilities from the cached boundary activations (top block + head)."""
        if self._top is None:
            from ...extract.bases.backbones import get_backbone
            from ..graph.finetune_model import top_of_saved_model

            self._top = top_of_saved_model(self.model, get_backbone(self.config["feature_set"]["key"]["backbone"]))
        return two_columns(self._top.predict_on_batch(np.asarray(activations, dtype=np.float32)))


class EnsembleRun(Run):
    """Members' probabilities averaged with non-negative weights that sum to 1."""

    kind = "ensemble"
    can_be_member = False

    def __init__(self, run_dir: str, config: dict):
        super().__init__(run_dir, config)
        self.members: list[Run] = []
        for entry in config["members"]:
            member = load_run(entry["run_dir"], nested=True)
            recorded = entry.get("model_sha256")
            if member.config["model"].get("sha256") != recorded:
                raise FeatcacheError(f"{entry['run_dir']}: this member's model is not the one the ensemble {run_dir} "
                                     "was made with (its sha256 changed); make the ensemble again")
            if member.class_names != self.class_names:
                raise FeatcacheError(f"{entry['run_dir']}: its classes differ from the ensemble {run_dir}'s")
            self.members.append(member)
        self.weights = np.asarray(config["weights"], dtype=np.float64)
        self.feature_sets = _unique([r for m in self.members for r in m.feature_sets], lambda r: r["name"])
        self.row_sets = _unique([r for m in self.members for r in m.row_sets], lambda r: (r["store"], r["name"]))
        self.image_inputs = sorted({i for m in self.members for i in m.image_inputs})
        self.image_root = next((m.image_root for m in self.members if m.image_inputs), "")

    @property
    def label(self) -> str:
        return f"ensemble of {len(self.members)} runs"

    def proba(self, features, images) -> np.ndarray:
        return sum(w * m.proba(features, images) for w, m in zip(self.weights, self.members))

    def probabilities_tensor(self, keras, features, images, prefix=""):
        weighted = []
        for i, (member, weight) in enumerate(zip(self.members, self.weights)):
            # Each member in a sub-model of its own, so the layer names of members never clash.
            names = [r["name"] for r in member.feature_sets]
            f_in = {n: keras.Input(tuple(features[n].shape[1:]), name=f"features_{j}") for j, n in enumerate(names)}
            i_in = {s: keras.Input((s.size, s.size, 3), name=f"image_{j}") for j, s in enumerate(member.image_inputs)}
            sub = keras.Model([*f_in.values(), *i_in.values()], member.probabilities_tensor(keras, f_in, i_in),
                              name=f"member_{i}_{member.kind}")
            p = sub([*(features[n] for n in names), *(images[s] for s in member.image_inputs)])
            weighted.append(keras.layers.Rescaling(float(weight), name=f"weight_{i}")(p))
        return keras.layers.Add(name="weighted_average")(weighted)


# The run kinds by the ``kind`` of their config.json (run_dir.run_kind).
KINDS: dict[str, type[Run]] = {"head": HeadRun, "fused": HeadRun, "finetune": FinetuneRun, "ensemble": EnsembleRun}


def load_run(run_dir: str, nested: bool = False) -> Run:
    """The run in ``run_dir``, whatever its kind. ``nested``: as an ensemble member (which
    cannot itself be an ensemble)."""
    run_dir = os.fspath(run_dir)
    if not os.path.isdir(run_dir):
        raise FeatcacheError(f"{run_dir}: no such run directory")
    config = rundir.read_config(run_dir)
    kind = rundir.run_kind(config)
    if kind not in KINDS:
        raise FeatcacheError(f"{run_dir}: unknown run kind {kind!r} (written by a newer featcache?)")
    if nested and not KINDS[kind].can_be_member:
        raise FeatcacheError(f"{run_dir}: an ensemble cannot be a member of an ensemble; list its members instead")
    return KINDS[kind](run_dir, config)


# -- probabilities from the cache ---------------------------------------------------------------


class CachedInputs:
    """The images of a set of runs, matched across their feature sets (by path and content
    digest, see align.py), with their features read from the stores and, for runs that take
    images, the images decoded from the image folder. A context manager (stores stay open)."""

    def __init__(self, runs: list[Run], what: str = ""):
        self.runs = runs
        self.row_sets = _unique([r for run in runs for r in run.row_sets], lambda r: (r["store"], r["name"]))
        decoding = [run for run in runs if run.image_inputs and not getattr(run, "boundary", None)]
        self.image_inputs = sorted({i for run in decoding for i in run.image_inputs})
        self.image_root = next((run.image_root for run in decoding), "")
        self._stack = contextlib.ExitStack()
        self.sets, labels = [], []
        self.boundaries = {}  # run index -> (boundary feature set, {image digest: row})
        try:
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
        store = record["store"]
        owner = self.owner(record)
        if not os.path.exists(store):
            raise FeatcacheError(f"the run's store {store} is missing (moved or deleted); {owner} needs its cached "
                                 "features and splits")
        s = self._stack.enter_context(open_store(store))
        if record["name"] not in s.feature_set_names():
            raise FeatcacheError(f"{store}: feature set {record['name']} of run {owner} is gone from this store")
        return s[record["name"]]

    def _open_boundary(self, run):
        store, name = run.boundary["store"], run.boundary["feature_set"]
        s = self._stack.enter_context(open_store(store))
        if name not in s.feature_set_names():
            raise FeatcacheError(f"{store}: feature set {name} of run {run.run_dir} is gone from this store")
        fs = s[name]
        rows = fs.rows()
        by_digest = dict(zip(fs.column("digests")[rows].tolist(), rows.tolist()))
        missing = sum(d not in by_digest for d in self.aligned.digests)
        if missing:
            raise FeatcacheError(f"{store}: feature set {name} lacks {missing} of the images of run {run.run_dir}; "
                                 "run the extract command of its boundary again to add them")
        return fs, by_digest

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
        names = _unique([r for run in self.runs for r in run.feature_sets], lambda r: r["name"])
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


def split_probabilities(run_dir: str, split: str, run: Run | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(paths, labels, probabilities) of a split's images, for any kind of run, from the cache.

    Paths are relative to the run's image folder (config ``feature_set(s)[..]["image_root"]``),
    sorted; labels index the run's class names; probabilities are (N, K) float64, what
    ``predict`` would give for those images. Heads, fused heads and ensembles of them read only
    the stores; a fine-tuned run (an end-to-end model) reads the boundary activations it was
    trained from when that store is there, and otherwise decodes its images, whose content is
    checked against the digests stored at extraction."""
    from ..rows.matched import SPLITS

    if split not in SPLITS:
        raise FeatcacheError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    run = run or load_run(run_dir)
    with CachedInputs([run]) as cache:
        where = cache.aligned.split(split)
        proba = cache.probabilities(where)[0]
        return cache.aligned.paths[where], cache.aligned.labels[where], proba
