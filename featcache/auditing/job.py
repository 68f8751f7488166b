"""``featcache audit``: one feature set of a store checked for label issues, duplicates, leaks
across splits and outliers, from its cached features alone.

Writes, with ``out``: audit.json (what ``--json`` prints), label_issues.csv, duplicates.csv,
leaks.csv, outliers.csv, exclude.txt (the flagged label issues and all but one member of each
duplicate group, one relative path a line: give it to ``train --exclude``) and audit.html.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass

import numpy as np

from ..classify.runs.run_dir import write_json
from ..errors import FeatcacheError
from . import index as nearest, labels as label_audit, neighbours
from .folds import run_model

# Near duplicates, per base family (measured by benchmarks/audit.py on cats vs dogs with planted
# near-copies: JPEG quality 70, resized to 70-90%, cropped by a few pixels). Two images are near
# duplicates when their cosine similarity reaches ``threshold``, or when they are each other's
# nearest neighbour with similarity >= ``floor`` and stand out by ``gap`` from the next best
# neighbour of either. MobileNetV2@160 (avg-pooled): copies 0.78-1.0, the closest distinct photos
# up to 0.86 at the 99.9th percentile (and 0.99 for a few true duplicates of the set), so no single
# threshold separates them; the mutual rule found 96% of the planted pairs at 93% precision.
NEAR_DUPLICATE = {"pixels": {"threshold": 0.995, "floor": None, "gap": None}}
NEAR_DUPLICATE_DEFAULT = {"threshold": 0.95, "floor": 0.75, "gap": 0.08}
READ_ROWS = 8192  # rows read and pooled at a time
MAX_CONFUSED_PAIRS = 10
# Neighbours kept per row by the one scan: the outlier scores' and the label votes'.
SCAN_NEIGHBOURS = max(neighbours.OUTLIER_NEIGHBOURS, label_audit.VOTE_NEIGHBOURS)


def near_duplicate_rule(backbone: str, threshold: float | None = None) -> dict:
    rule = dict(NEAR_DUPLICATE.get(backbone, NEAR_DUPLICATE_DEFAULT))
    if threshold is not None:
        rule["threshold"] = float(threshold)
    return rule


def read_vectors(fs, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float32 feature vectors (N, D), their unit-length copies), read in pieces. A network's
    spatial features are averaged over H and W (an embedding that does not move with the
    object); the pixels base's are its image, kept whole."""
    pool = fs.spec.backbone != "pixels"
    pooled = []
    for start in range(0, len(rows), READ_ROWS):
        x = fs.read(rows[start : start + READ_ROWS]).astype(np.float32)
        pooled.append(x.mean(axis=(1, 2)) if x.ndim == 4 and pool else x.reshape(len(x), -1))
    x = np.concatenate(pooled) if pooled else np.zeros((0, 1), np.float32)
    return x, neighbours.vectors(x)


@dataclass
class StoredRows:
    """The active rows of one feature set, as the audit and ``similar`` read them."""

    name: str
    backbone: str
    class_names: list[str]
    paths: list[str]
    digests: list[str]
    splits: np.ndarray  # (N,) object: "train", "validation", "test" or "" (unlabelled)
    labels: np.ndarray | None  # (N,) int64 class indices, None when unlabelled
    features: np.ndarray | None  # (N, D) float32 vectors (see read_vectors)
    unit: np.ndarray | None  # (N, D) their unit-length copies
    image_root: str


def read_stored(store: str, feature_set: str | None, base: str | None, vectors: bool = True) -> StoredRows:
    """One feature set of ``store`` (by name, or the only one of ``base``), read whole (without
    its features when ``vectors`` is False: ``features`` and ``unit`` are then None)."""
    from ..cache.store import open_store

    if not os.path.isfile(store):
        raise FeatcacheError(f"{store}: no such store")
    with open_store(store) as s:
        fs = s.select(feature_set, base)
        rows = fs.rows()
        x, v = read_vectors(fs, rows) if vectors else (None, None)
        return StoredRows(
            fs.name, fs.spec.backbone, fs.class_names, fs.column("paths")[rows].astype(str).tolist(),
            fs.column("digests")[rows].astype(str).tolist(),
            np.asarray(fs.column("splits")[rows].astype(str).tolist(), dtype=object),
            fs.column("labels")[rows].astype(np.int64) if fs.labelled else None, x, v,
            str(fs.attrs.get("image_root", "")))


def audit(store: str, feature_set: str | None = None, base: str | None = None, out: str | None = None,
          folds: int = label_audit.DEFAULT_FOLDS, run_dir: str | None = None, threshold: float | None = None,
          seed: int = 0) -> dict:
    started = time.perf_counter()
    if run_dir is None:
        models, model_text = (lambda k: None), f"logistic regression (standardized features, C={label_audit.DEFAULT_C})"
    else:
        models, model_text = run_model(run_dir)
    if out is not None:
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise FeatcacheError(f"{out}: exists and is not an empty folder; choose a new --out")
    stored = read_stored(store, feature_set, base)
    paths, digests, splits, given = stored.paths, stored.digests, stored.splits, stored.labels
    labelled, class_names, name, backbone = given is not None, stored.class_names, stored.name, stored.backbone
    image_root, x, v = stored.image_root, stored.features, stored.unit
    rows = np.arange(len(paths))
    rule = near_duplicate_rule(backbone, threshold)
    notes = []

    # duplicates: the same bytes (digest) or features within the threshold, as connected groups
    by_digest: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        by_digest.setdefault(d, []).append(i)
    twins = [(g[0], j) for g in by_digest.values() if len(g) > 1 for j in g[1:]]
    # one pass: duplicates, outliers and the label votes (exact, or from the index kept beside the store when large)
    (near, (top_sims, top_idx)), search = nearest.scan(store, name, v, digests, rule["threshold"], k=SCAN_NEIGHBOURS)
    if rule["floor"] is not None:
        near = neighbours.unique_pairs(*(np.concatenate(parts) for parts in zip(
            near, neighbours.standing_out(top_sims, top_idx, rule["floor"], rule["gap"]))))
    scores = neighbours.outlier_scores_of(top_sims[:, : neighbours.OUTLIER_NEIGHBOURS])
    v = stored.unit = None  # not needed past the neighbours: memory for the folds
    twin_a, twin_b = (np.array(side, np.int64) for side in zip(*twins)) if twins else (np.zeros(0, np.int64),) * 2
    members_of, component = neighbours.groups(len(rows), np.concatenate([twin_a, near[0]]),
                                              np.concatenate([twin_b, near[1]]))
    # A group's similarity: the least of its near-duplicate links (1.0: byte-identical only).
    least = np.ones(len(component), np.float32)
    np.minimum.at(least, component[near[0]], near[2])
    duplicate_groups = []
    for members in members_of:
        members = sorted(members.tolist(), key=lambda i: (splits[i] != "train", paths[i]))  # the kept one first
        duplicate_groups.append({"rows": members, "paths": [paths[i] for i in members],
                                 "splits": [splits[i] for i in members],
                                 "exact": len({digests[i] for i in members}) == 1,
                                 "similarity": round(float(least[component[members[0]]]), 6)})
    duplicate_groups.sort(key=lambda g: (-g["similarity"], g["paths"]))

    # leaks: groups that join the training split with validation or test
    leaks = [g for g in duplicate_groups if "train" in g["splits"] and {"validation", "test"} & set(g["splits"])]
    held_out = [i for i, sp in enumerate(splits) if sp in ("validation", "test")]
    twinned = {i for g in leaks for i in g["rows"] if splits[i] in ("validation", "test")}
    if not splits.size or not any(splits):
        notes.append("the store has no splits (unlabelled): leaks across splits cannot be told")

    flagged = neighbours.flag_outliers(scores)

    # label issues
    issues, confused, per_class = [], [], []
    if not labelled:
        notes.append("the store is unlabelled: label issues need labels (duplicates and outliers only)")
    else:
        found, proba = label_audit.audit_labels(x, given, top_idx, folds, seed, models(len(class_names)))
        issues = [{"row": int(r), "path": paths[r], "split": splits[r], "given": class_names[given[r]],
                   "suggested": class_names[s], "score": round(float(found.quality[r]), 6)}
                  for r, s in zip(found.rows, found.suggested)]
        predicted = proba.argmax(axis=1)
        counts = {}
        for g, p in zip(given, predicted):
            if g != p:
                counts[(g, p)] = counts.get((g, p), 0) + 1
        confused = [{"given": class_names[g], "predicted": class_names[p], "rows": n}
                    for (g, p), n in sorted(counts.items(), key=lambda kv: -kv[1])[:MAX_CONFUSED_PAIRS]]
        suspect = np.zeros(len(rows), bool)
        suspect[found.rows] = True
        for j, cname in enumerate(class_names):
            mine = given == j
            per_class.append({"class": cname, "rows": int(mine.sum()),
                              **{sp: int(np.sum(mine & (splits == sp))) for sp in ("train", "validation", "test")},
                              "label_issues": int(np.sum(mine & suspect)),
                              "out_of_fold_accuracy": round(float(np.mean(predicted[mine] == j)), 4) if mine.any() else None})

    result = {
        "store": store, "feature_set": name, "rows": int(len(rows)), "labelled": bool(labelled),
        "class_names": class_names,
        "settings": {"folds": folds if labelled else None, "model": f"{model_text}, {label_audit.ROUNDS_TEXT}" if labelled else None,
                     "near_duplicates": rule, **search, "outlier_neighbours": neighbours.OUTLIER_NEIGHBOURS,
                     "outlier_z": neighbours.OUTLIER_Z, "seed": seed},
        "label_issues": issues,
        "duplicates": [{k: g[k] for k in ("paths", "splits", "similarity", "exact")} for g in duplicate_groups],
        "leaks": [{k: g[k] for k in ("paths", "splits", "similarity")} for g in leaks],
        "leak_share": {"held_out_images": len(held_out), "with_a_twin_in_train": len(twinned),
                       "share": round(len(twinned) / len(held_out), 6) if held_out else None},
        "outliers": [{"path": paths[r], "split": splits[r] or None, "score": round(float(scores[r]), 6)} for r in flagged],
        "per_class": per_class, "confused_pairs": confused, "notes": notes,
        "seconds": None,
    }
    exclude = sorted({i["path"] for i in issues} | {p for g in duplicate_groups for p in g["paths"][1:]})
    result["exclude"] = {"paths": len(exclude)}
    if out is not None:
        os.makedirs(out, exist_ok=True)
        result["files"] = write_outputs(out, result, exclude, image_root)
    result["seconds"] = round(time.perf_counter() - started, 3)
    if out is not None:  # the JSON file holds the final timing too
        write_json(os.path.join(out, "audit.json"), result)
    return result


def _csv(path: str, header: list[str], rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def write_outputs(out: str, result: dict, exclude: list[str], image_root: str) -> dict:
    from .page import write_page

    files = {name: os.path.join(out, name) for name in
             ("audit.json", "label_issues.csv", "duplicates.csv", "leaks.csv", "outliers.csv", "exclude.txt",
              "audit.html")}
    _csv(files["label_issues.csv"], ["path", "split", "given", "suggested", "score"],
         [[i["path"], i["split"], i["given"], i["suggested"], i["score"]] for i in result["label_issues"]])
    _csv(files["duplicates.csv"], ["group", "path", "split", "similarity", "exact"],
         [[g, p, s, d["similarity"], d["exact"]] for g, d in enumerate(result["duplicates"])
          for p, s in zip(d["paths"], d["splits"])])
    _csv(files["leaks.csv"], ["group", "path", "split", "similarity"],
         [[g, p, s, d["similarity"]] for g, d in enumerate(result["leaks"]) for p, s in zip(d["paths"], d["splits"])])
    _csv(files["outliers.csv"], ["path", "split", "score"], [[o["path"], o["split"], o["score"]] for o in result["outliers"]])
    with open(files["exclude.txt"], "w", encoding="utf-8") as f:
        f.write("# featcache audit: flagged label issues and all but one member of each duplicate group;\n"
                "# one path (relative to the image folder) a line; edit freely, then: featcache train ... --exclude FILE\n")
        f.writelines(p + "\n" for p in exclude)
    write_page(files["audit.html"], result, image_root)
    return files
