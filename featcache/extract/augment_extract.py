"""``featcache extract --augment K``: the plain row of every image plus K augmented views per
training image, in a feature set of their own (the layout is in :mod:`.augment`)."""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from tqdm import tqdm

from ..cache.layout import create_row_column, store_path_text
from ..cache.writer import StoreWriter
from ..errors import FeatcacheError
from .images.augment import TRANSFORMS, VIEW_COLUMN, augment_image, make_layers, view_seed
from .batch_loop import LoopResult
from .config import listing_attrs, resolve_run
from .images.feeder import decoded_batches
from .bases.feature_model import FeatureModel
from .plan import digest_all
from .summary import run_summary
from .bases.weights import resolve_weights


def extract_augmented(image_dir: str, store: str, config) -> dict:
    """Extract the plain row of every image and ``config.augment`` augmented views per training
    image into the augmented feature set (see the module doc). Resumable: rows and views
    already stored are kept; only what is missing runs through the model."""
    started = time.perf_counter()
    decode, spec, backbone, size, listing = resolve_run(image_dir, config)
    k, seed = int(config.augment), int(config.aug_seed)
    recipe = json.loads(spec.augment)["recipe"]
    recipe = {name: recipe[name] for name in TRANSFORMS if name in recipe}  # the JSON sorted the keys
    if not listing.class_names:
        raise FeatcacheError(f"{image_dir}: --augment makes views of training images, which needs a labelled "
                             "folder (one subfolder of images per class)")
    with StoreWriter(store, open_file=False) as writer:
        hashed, failures, _ = digest_all(listing)
        hash_seconds = time.perf_counter() - started
        writer.peek(spec)  # a damaged store stops here, before it is opened for writing
        writer.open()
        existing = writer.existing(spec)
        weights = resolve_weights(backbone, config.weights, config.seed, size)
        model = FeatureModel(backbone, size, weights, config.layer, config.pooling, spec.precision, config.seed,
                             jit_compile=config.xla)
        if existing is None:
            writer.create(spec, model.output_shape, config.dtype, config.batch_size)
            create_row_column(writer.group, VIEW_COLUMN, "uint16")
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
        bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=not config.progress,
                   desc=f"extract {config.base} (+{k} views)", dynamic_ncols=True)
        batches = decoded_batches(listing, todo, config, size, decode, spec.resize, config.batch_size)
        try:
            for batch in batches:
                entries, batch_digests, failed = batch.entries, batch.digests, batch.failed
                images = np.array(batch.images)  # a host copy: the views are made from it after its buffer is reused
                batch.release()
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
            batches.close()  # a stopped run ends its decoding processes now
            bar.close()
        n_active = int(group["active"][:].sum())
        feature_shape = group["features"].shape[1:]
        n_views = int(np.sum(group[VIEW_COLUMN][:] > 0))
    extract_seconds = time.perf_counter() - model_started
    loop = LoopResult(extracted=extracted, seconds=extract_seconds)  # one rate over the whole loop
    result = run_summary(spec, store, listing, failures, n_active, feature_shape, extracted,
                         time.perf_counter() - started, hash_seconds, loop)
    result.update(augment={"views": k, "seed": seed, "recipe": recipe}, views_extracted=views_made, views_stored=n_views,
                  decode=decode)
    return result
