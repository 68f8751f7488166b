"""Any run directory as one object: what it reads, and how that becomes class probabilities.

Every command that uses a trained run goes through :func:`load_run`, whatever its kind:

- ``head``: one head (dense or logreg) on one feature set;
- ``fused``: one head on several feature sets of the same images (``train --feature-sets``);
- ``finetune``: an end-to-end model (images in), from ``featcache finetune``;
- ``ensemble``: a weighted average of member runs of the kinds above (``featcache ensemble``).

A run reads cached features (``feature_sets``: records with the store, key and shape) and/or
decoded images (``image_inputs``: a fine-tuned model takes images). :meth:`Run.proba` maps
both to (N, K) probabilities; ``predict`` computes them from new image files, ``export``
builds the same function as one Keras model, and :func:`.cached.split_probabilities` reads
them from the cache for the images of a split (what reports and ensembles need). Each kind
also says what its report shows (title, facts, where its probabilities came from).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ...errors import FeatcacheError
from ..heads.base import two_columns
from . import run_dir as rundir

@dataclass(frozen=True, order=True)
class ImageInput:
    """Images decoded and resized as extraction did: (size, size, 3), Pillow ``resize``."""

    size: int
    resize: str


def image_input(record: dict) -> ImageInput:
    return ImageInput(int(record["key"]["input_size"]), str(record["key"]["resize"]))


def unique(records: list[dict], key) -> list[dict]:
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

    @staticmethod
    def title(config: dict) -> str:
        """The report's title, from config.json alone (a report is written even when models cannot load)."""
        return f"{config['head']} on {' + '.join(r['name'] for r in rundir.feature_records(config))}"

    @staticmethod
    def model_facts(config: dict) -> list[tuple[str, str]] | None:
        """(name, text) facts the report shows in place of the feature sets' (None: those)."""
        return None

    map_refusal = ""  # why the report cannot map this kind's features ("" when it can)
    head_only_refusal = "only a head trained on cached features exports alone"  # "" when it can

    @property
    def source(self) -> str:
        """How :func:`.cached.split_probabilities` computed this run's probabilities, in words."""
        stores = ", ".join(dict.fromkeys(r["store"] for r in self.row_sets))
        return f"the run's {self.config['head']} head on the cached features of {stores}"

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

    head_only_refusal = ""

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
    head_only_refusal = "a fine-tuned model reads images, not cached features; export it whole"

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
    def source(self) -> str:
        if self.boundary:
            return f"the fine-tuned top block and head on the cached boundary activations of {self.boundary['store']}"
        return f"the fine-tuned model on the images of {self.image_root}"

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
        self.feature_sets = unique([r for m in self.members for r in m.feature_sets], lambda r: r["name"])
        self.row_sets = unique([r for m in self.members for r in m.row_sets], lambda r: (r["store"], r["name"]))
        self.image_inputs = sorted({i for m in self.members for i in m.image_inputs})
        self.image_root = next((m.image_root for m in self.members if m.image_inputs), "")

    map_refusal = "an ensemble's members read different features; each member's own report maps its own"
    head_only_refusal = "an ensemble's members may read images; export it whole, or each member with --head-only"

    @property
    def label(self) -> str:
        return f"ensemble of {len(self.members)} runs"

    @property
    def source(self) -> str:
        stores = ", ".join(dict.fromkeys(r["store"] for r in self.row_sets))
        return f"the ensemble's {len(self.members)} members, each on its cached features ({stores}), weighted"

    @staticmethod
    def title(config: dict) -> str:
        return f"ensemble of {len(config['members'])} runs ({config['settings']['weights']} weights)"

    @staticmethod
    def model_facts(config: dict) -> list[tuple[str, str]]:
        """The members and their weights stand where a model's facts would."""
        return [("members", "\n".join(f"{w:.4f} x {m['run_dir']} ({m['label']}, model sha256 {m['model_sha256']})"
                                      for m, w in zip(config["members"], config["weights"])))]

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


def kind_of(config: dict) -> type[Run]:
    """The run kind class of a config.json."""
    kind = rundir.run_kind(config)
    if kind not in KINDS:
        raise FeatcacheError(f"unknown run kind {kind!r} (written by a newer featcache?)")
    return KINDS[kind]


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
