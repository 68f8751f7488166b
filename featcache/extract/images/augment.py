"""Augmentation: Keras preprocessing layers, seeded, for fine-tuning and for cached views.

Cached augmentation (``featcache extract --augment K``, run by :mod:`.augment_extract`) stores, in a feature set of its own
(the recipe, K and the seed are its ``KeySpec.augment``):

* view 0: one plain (unaugmented) row per image of every split, ``active`` as usual, so any
  reader that knows nothing of views (``FeatureSet.rows()``, logreg, compare, info) sees
  exactly one unaugmented row per image;
* views 1..K: K augmented rows per *training* image, stored with ``active = 0`` (invisible to
  those readers) and their view number in the group's ``view`` column (uint16).

``featcache train`` with the dense head draws one of the K + 1 views of each training image per
epoch (seeded by the head's seed and the epoch); logreg uses view 0 only. Validation and test
images are never augmented. A view depends only on (seed, image digest, view number), so a
resumed or repeated extraction gives the same views, and the same bytes under two paths share
their views.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace

import numpy as np

from ...errors import FeatcacheError

# Transform -> strength (Keras factor): rotation 0.05 of a full turn (+-18 degrees), zoom and
# translation +-10 % of the side, contrast +-10 %; flip is horizontal (no strength).
DEFAULT_STRENGTHS = {"flip": "horizontal", "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.1}
TRANSFORMS = tuple(DEFAULT_STRENGTHS)
VIEW_COLUMN = "view"


def parse_recipe(text: str | None) -> dict:
    """``"flip,rotation"`` or ``"rotation=0.1,zoom"`` -> {transform: strength} (default strengths)."""
    if text is None or text.strip() in ("", "all"):
        return dict(DEFAULT_STRENGTHS)
    if text.strip() == "none":
        return {}
    recipe = {}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        if name not in DEFAULT_STRENGTHS:
            raise FeatcacheError(f"--augment: unknown transform {name!r}; choose from {', '.join(TRANSFORMS)}")
        if not value:
            recipe[name] = DEFAULT_STRENGTHS[name]
        elif name == "flip":
            if value not in ("horizontal", "vertical", "horizontal_and_vertical"):
                raise FeatcacheError(f"--augment: flip={value}: choose horizontal, vertical or horizontal_and_vertical")
            recipe[name] = value
        else:
            try:
                recipe[name] = float(value)
            except ValueError:
                raise FeatcacheError(f"--augment: {name}={value}: not a number") from None
            if not 0 < recipe[name] < 1:
                raise FeatcacheError(f"--augment: {name}={value}: must be between 0 and 1")
    return {name: recipe[name] for name in TRANSFORMS if name in recipe}  # canonical order


def augment_key(recipe: dict, seed: int, views: int) -> str:
    """The ``KeySpec.augment`` text: canonical JSON of the recipe, the seed and K."""
    return json.dumps({"recipe": recipe, "seed": int(seed), "views": int(views)}, sort_keys=True,
                      separators=(",", ":"))


def make_layers(recipe: dict, seed: int | None = None) -> list:
    """The Keras preprocessing layers of a recipe (inputs RGB 0..255, edges reflected)."""
    import keras

    def s(i):
        return None if seed is None else int(seed) * 7919 + i

    layers = []
    for i, (name, strength) in enumerate(recipe.items()):
        if name == "flip":
            layers.append(keras.layers.RandomFlip(strength, seed=s(i), name="aug_flip"))
        elif name == "rotation":
            layers.append(keras.layers.RandomRotation(strength, fill_mode="reflect", seed=s(i), name="aug_rotation"))
        elif name == "zoom":
            layers.append(keras.layers.RandomZoom(strength, fill_mode="reflect", seed=s(i), name="aug_zoom"))
        elif name == "translation":
            layers.append(keras.layers.RandomTranslation(strength, strength, fill_mode="reflect", seed=s(i),
                                                         name="aug_translation"))
        elif name == "contrast":
            layers.append(keras.layers.RandomContrast(strength, value_range=(0, 255), seed=s(i), name="aug_contrast"))
    return layers


def view_seed(seed: int, digest: str, view: int) -> int:
    """A 32-bit seed from (seed, image digest, view): the view never depends on batch or order."""
    text = f"{int(seed)}:{digest}:{int(view)}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


def augment_image(layers, image: np.ndarray, seed: int) -> np.ndarray:
    """One augmented copy of a uint8 (H, W, 3) image, a pure function of (layers, image, seed)."""
    x = np.asarray(image, np.float32)[None]
    for i, layer in enumerate(layers):
        # Stateless draw: an int seed gives the same transformation every time.
        transformation = layer.get_random_transformation(x, training=True, seed=(seed + 104729 * i) & 0xFFFFFFFF)
        x = layer.transform_images(x, transformation, training=True)
    return np.clip(np.rint(np.asarray(x)[0]), 0, 255).astype(np.uint8)


# -- cached views ---------------------------------------------------------------------------


def view_column(fs) -> np.ndarray | None:
    """The view number of each committed row, or None for a feature set without views."""
    if not fs.has_column(VIEW_COLUMN):
        return None
    return fs.column(VIEW_COLUMN).astype(np.int64)


def view_rows(fs, rows: np.ndarray) -> np.ndarray | None:
    """For the view-0 ``rows`` of a feature set with views: an (N, V) array of row indices, V =
    K + 1 (column 0: the row itself; a missing view repeats view 0). None without views."""
    views = view_column(fs)
    if views is None:
        return None
    k = int(json.loads(fs.spec.augment)["views"])
    digests = fs.column("digests")
    by_digest: dict[tuple[str, int], int] = {}
    for row in np.flatnonzero(views > 0):
        by_digest.setdefault((digests[row], int(views[row])), int(row))
    table = np.repeat(np.asarray(rows, np.int64)[:, None], k + 1, axis=1)
    for i, row in enumerate(rows):
        for v in range(1, k + 1):
            table[i, v] = by_digest.get((digests[row], v), row)
    return table


def with_augment(spec, views: int, seed: int, recipe: dict | None = None):
    """``spec`` with its ``augment`` field set (the default recipe unless one is given)."""
    if views < 1:
        raise FeatcacheError(f"--augment {views}: must be at least 1 view")
    return replace(spec, augment=augment_key(recipe if recipe is not None else dict(DEFAULT_STRENGTHS), seed, views))
