"""Augmentation: Keras preprocessing layers, seeded, for fine-tuning and for cached views.

Cached augmentation (``featcache extract --augment K``) stores, in a feature set of its own
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
import sys
import time
from dataclasses import replace

import numpy as np

from ..errors import FeatcacheError

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
    if VIEW_COLUMN not in fs.group:
        return None
    ds = fs.group[VIEW_COLUMN]
    ds.refresh()
    return ds[: fs.n_committed].astype(np.int64)


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


def extract_augmented(image_dir: str, store: str, config) -> dict:
    """Extract the plain row of every image and ``config.augment`` augmented views per training
    image into the augmented feature set (see the module doc). Resumable: rows and views
    already stored are kept; only what is missing runs through the model."""
    from ..cache.store import StoreWriter, store_path_text
    from .backbones import get_backbone
    from .discover import discover
    from .model import FeatureModel
    from .pipeline import _decoded_batches, _digest_all, key_spec, listing_attrs, run_summary
    from .weights import resolve_weights

    started = time.perf_counter()
    spec = key_spec(config)
    k, seed = int(config.augment), int(config.aug_seed)
    recipe = json.loads(spec.augment)["recipe"]
    recipe = {name: recipe[name] for name in TRANSFORMS if name in recipe}  # the JSON sorted the keys
    backbone = get_backbone(config.base)
    size = spec.input_size
    listing = discover(image_dir, config.split_fractions, config.split_seed, config.follow_symlinks, config.unlabeled)
    if not listing.class_names:
        raise FeatcacheError(f"{image_dir}: --augment makes views of training images, which needs a labelled "
                             "folder (one subfolder of images per class)")
    with StoreWriter(store, open_file=False) as writer:
        hashed, failures = _digest_all(listing)
        hash_seconds = time.perf_counter() - started
        writer.open()
        existing = writer.existing(spec)
        weights = resolve_weights(backbone, config.weights, config.seed, size)
        model = FeatureModel(backbone, size, weights, config.layer, config.pooling, spec.precision, config.seed,
                             jit_compile=config.xla)
        if existing is None:
            writer.create(spec, model.output_shape, config.dtype, config.batch_size)
            writer.group.create_dataset(VIEW_COLUMN, shape=(0,), maxshape=(None,), chunks=(4096,), dtype="uint16")
        group = writer.group
        n_rows = int(group["committed"][0])
        group[VIEW_COLUMN].resize(n_rows, axis=0)  # cut the in-flight tail of a killed run
        writer.set_listing_attrs(listing.class_names, config.seed, listing_attrs(listing, config, image_dir))
        views = group[VIEW_COLUMN][:n_rows].astype(np.int64)
        paths = [str(p) for p in existing.paths] if existing is not None else []
        digests = [str(d) for d in existing.digests] if existing is not None else []
        plain = {(paths[r], digests[r]): r for r in range(n_rows) if views[r] == 0}
        have_view = {(digests[r], int(views[r])) for r in range(n_rows) if views[r] > 0}
        writer.start_appending()

        keep = {plain[(store_path_text(e.relpath), d)]: e for e, d in hashed
                if (store_path_text(e.relpath), d) in plain}
        if plain:
            rows = np.array(sorted(plain.values()))
            writer.update_rows(rows, labels=np.array([keep[r].label if r in keep else -1 for r in rows], "int32"),
                               splits=np.array([keep[r].split if r in keep else "" for r in rows], "S10"),
                               active=np.array([1 if r in keep else 0 for r in rows], "uint8"))
            writer.commit()
        todo, seen = [], set()
        for entry, digest in hashed:
            needs_plain = (store_path_text(entry.relpath), digest) not in plain
            needs_views = entry.split == "train" and any((digest, v) not in have_view for v in range(1, k + 1))
            if needs_plain or (needs_views and digest not in seen):
                todo.append((entry, digest))
                seen.add(digest)
        layers = make_layers(recipe)
        extracted = views_made = 0
        model_started = time.perf_counter()
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not config.progress,
                   desc=f"extract {config.base} (+{k} views)", dynamic_ncols=True)
        try:
            for entries, batch_digests, images, failed in _decoded_batches(listing, todo, config, size):
                out_images, labels, rpaths, rdigests, rsplits, rviews = [], [], [], [], [], []
                for entry, digest, image in zip(entries, batch_digests, images):
                    if (store_path_text(entry.relpath), digest) not in plain:
                        plain[(store_path_text(entry.relpath), digest)] = -1
                        out_images.append(image)
                        labels.append(entry.label), rpaths.append(entry.relpath), rdigests.append(digest)
                        rsplits.append(entry.split), rviews.append(0)
                    if entry.split != "train":
                        continue  # validation and test images are never augmented
                    for v in range(1, k + 1):
                        if (digest, v) in have_view:
                            continue
                        have_view.add((digest, v))
                        out_images.append(augment_image(layers, image, view_seed(seed, digest, v)))
                        labels.append(entry.label), rpaths.append(entry.relpath), rdigests.append(digest)
                        rsplits.append(entry.split), rviews.append(v)
                if out_images:
                    feats = np.concatenate([model(np.stack(out_images[i : i + config.batch_size]))
                                            for i in range(0, len(out_images), config.batch_size)])
                    first = group["features"].shape[0]
                    writer.append(feats.astype(config.dtype), labels, rpaths, rdigests, rsplits)
                    view_arr = np.asarray(rviews, "uint16")
                    group["active"][first:] = (view_arr == 0).astype("uint8")  # views stay out of rows()
                    group[VIEW_COLUMN].resize(first + len(view_arr), axis=0)
                    group[VIEW_COLUMN][first:] = view_arr
                    extracted += int(np.sum(view_arr == 0))
                    views_made += int(np.sum(view_arr > 0))
                writer.add_failures(failed)
                failures.extend(failed)
                writer.commit()
                bar.update(len(entries) + len(failed))
        finally:
            bar.close()
        n_active = int(group["active"][:].sum())
        feature_shape = group["features"].shape[1:]
        n_views = int(np.sum(group[VIEW_COLUMN][:] > 0))
    extract_seconds = time.perf_counter() - model_started
    result = run_summary(spec, store, listing, failures, n_active, feature_shape, extracted,
                         time.perf_counter() - started, hash_seconds, extract_seconds)
    result.update(augment={"views": k, "seed": seed, "recipe": recipe}, views_extracted=views_made, views_stored=n_views)
    return result


def with_augment(spec, views: int, seed: int, recipe: dict | None = None):
    """``spec`` with its ``augment`` field set (the default recipe unless one is given)."""
    if views < 1:
        raise FeatcacheError(f"--augment {views}: must be at least 1 view")
    return replace(spec, augment=augment_key(recipe if recipe is not None else dict(DEFAULT_STRENGTHS), seed, views))
