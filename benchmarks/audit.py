"""featcache audit: accuracy on planted real photos, and speed at 100,000 rows (issue 22).

    python benchmarks/audit.py [--photos] [--speed] [--rows 100000] [--dim 1280]
        [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-audit-bench]

--photos: cats vs dogs (2,000 / 1,000 / 1,000) with planted problems: 5% of train labels moved
to the other class, 30 near-copies (JPEG quality 70, resized, cropped by a few pixels) inside
train, 30 validation/test images copied into train the same way (leaks), 10 byte-for-byte
copies; MobileNetV2@160 features (real weights, avg-pooled); prints recall and precision of
label issues, duplicates and leaks, the similar-image hit rate (the original among the 5
neighbours of each near-copy), and the similarities of planted copies against the closest
distinct photos (what the near-duplicate threshold is chosen from).

--speed: ROWS x DIM float32 vectors (clusters with noise, a few planted twins): seconds for the
duplicate/leak/outlier pass and for the label-issue pass, one `similar` query, and peak memory.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import resource
import shutil
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def near_copy(src, dst, rng):
    from PIL import Image

    img = Image.open(src).convert("RGB")
    w, h = img.size
    scale = rng.uniform(0.7, 0.9)
    img = img.resize((int(w * scale), int(h * scale)), Image.BILINEAR)
    c = rng.randint(2, 6)
    img = img.crop((c, c, img.size[0] - c, img.size[1] - c))
    img.save(dst, quality=70)


def photos(args) -> None:
    import featcache

    rng = random.Random(0)
    work = pathlib.Path(args.workdir)
    tree = work / "images"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(args.data, tree)
    train = sorted(p for p in (tree / "train").rglob("*.jpg"))
    moved = set()
    for p in rng.sample(train, len(train) // 20):  # 5% of train labels to the other class
        other = "dogs" if p.parent.name == "cats" else "cats"
        dst = tree / "train" / other / ("moved_" + p.name)
        shutil.move(p, dst)
        moved.add(str(dst.relative_to(tree)))
    train = sorted(p for p in (tree / "train").rglob("*.jpg") if not p.name.startswith("moved_"))
    near, leaks, exact = [], [], []
    for p in rng.sample(train, 30):
        dst = p.parent / ("near_" + p.name)
        near_copy(p, dst, rng)
        near.append((str(p.relative_to(tree)), str(dst.relative_to(tree))))
    held = sorted(p for split in ("validation", "test") for p in (tree / split).rglob("*.jpg"))
    for p in rng.sample(held, 30):
        dst = tree / "train" / p.parent.name / ("leak_" + p.parent.parent.name + "_" + p.name)
        near_copy(p, dst, rng)
        leaks.append((str(p.relative_to(tree)), str(dst.relative_to(tree))))
    for p in rng.sample(train, 10):
        dst = p.parent / ("copy_" + p.name)
        shutil.copy(p, dst)
        exact.append((str(p.relative_to(tree)), str(dst.relative_to(tree))))
    store = work / "store.h5"
    t = time.perf_counter()
    featcache.extract_features(tree, store, base="mobilenet_v2", size=160, weights=args.weights, pooling="avg",
                               progress=False)
    print(f"extracted in {time.perf_counter() - t:.0f} s")
    result = featcache.audit(store, out=work / "audit")
    flagged = {i["path"] for i in result["label_issues"]}
    tp = len(flagged & moved)
    print(f"label issues: {len(flagged)} flagged, recall {tp / len(moved):.3f}, precision {tp / max(len(flagged), 1):.3f} "
          f"({len(moved)} moved)")
    planted = [frozenset(pair) for pair in near + leaks + exact]
    groups = [frozenset(d["paths"]) for d in result["duplicates"]]
    found = sum(any(pair <= g for g in groups) for pair in planted)
    pure = sum(any(pair <= g for pair in planted) for g in groups)
    print(f"duplicates: {len(groups)} groups, recall {found / len(planted):.3f} of {len(planted)} planted pairs, "
          f"precision {pure / max(len(groups), 1):.3f}")
    leak_pairs = [frozenset(pair) for pair in leaks] + [frozenset(p) for p in exact if False]
    leak_groups = [frozenset(d["paths"]) for d in result["leaks"]]
    found = sum(any(pair <= g for g in leak_groups) for pair in leak_pairs)
    pure = sum(any(pair <= g for pair in leak_pairs) for g in leak_groups)
    print(f"leaks: {len(leak_groups)} groups, recall {found / len(leak_pairs):.3f}, precision "
          f"{pure / max(len(leak_groups), 1):.3f}; held-out share with a twin {result['leak_share']['share']}")
    copies = near + leaks
    hits = featcache.similar(store, [c for _, c in copies], k=5)["results"]
    rate = np.mean([orig in [n["path"] for n in r["neighbors"]] for (orig, _), r in zip(copies, hits)])
    print(f"similar: the original among the 5 neighbours of {rate:.3f} of {len(copies)} near-copies")
    # what the threshold is chosen from: planted copies against the closest distinct photos
    from featcache.auditing.job import read_vectors

    with featcache.open_store(store) as s:
        fs = s[result["feature_set"]]
        rows = fs.rows()
        paths = fs.column("paths")[rows].tolist()
        _, v = read_vectors(fs, rows)
    where = {p: i for i, p in enumerate(paths)}
    copy_sims = sorted(float(v[where[a]] @ v[where[b]]) for a, b in near + leaks)
    planted_rows = {where[p] for pair in near + leaks + exact for p in pair}
    distinct = []
    for start in range(0, len(v), 1024):
        s = v[start : start + 1024] @ v.T
        for r in range(len(s)):
            i = start + r
            s[r, i] = -1
            if i in planted_rows:
                s[r, list(planted_rows)] = -1
        distinct.append(s.max(axis=1))
    distinct = np.concatenate(distinct)
    print(f"near-copy similarity: min {copy_sims[0]:.4f}, 5th percentile {np.percentile(copy_sims, 5):.4f}; "
          f"closest distinct photos: max {distinct.max():.4f}, 99.9th percentile {np.percentile(distinct, 99.9):.4f}")
    print(f"audit seconds {result['seconds']}")


def speed(args) -> None:
    from featcache.auditing import labels as label_audit, neighbours

    rng = np.random.default_rng(0)
    n, d, k = args.rows, args.dim, 10
    centres = rng.normal(size=(k, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    x = np.maximum(centres[labels] + 2.0 * rng.normal(size=(n, d)).astype(np.float32), 0)  # ReLU-like
    x[1::997] = x[0::997][: len(x[1::997])] * 1.0001  # planted twins
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter()
    v = neighbours.vectors(x)
    pairs, (top_sims, top_idx) = neighbours.scan(v, 0.95)
    pairs += neighbours.standing_out(top_sims, top_idx, 0.75, 0.08)
    groups = neighbours.groups(n, [(a, b) for a, b, _ in pairs])
    flagged = neighbours.flag_outliers(neighbours.outlier_scores_of(top_sims))
    dup_seconds = time.perf_counter() - t
    t = time.perf_counter()
    proba = label_audit.out_of_fold(x, labels, 5, 0)
    issues = label_audit.find_label_issues(labels, proba)
    label_seconds = time.perf_counter() - t
    t = time.perf_counter()
    for i in range(10):
        neighbours.knn(v, 5, queries=v[i : i + 1], exclude_self=False)
    query_ms = (time.perf_counter() - t) / 10 * 1000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{n} x {d}: duplicates+leaks+outliers {dup_seconds:.1f} s ({len(groups)} groups, {len(flagged)} outliers); "
          f"label issues {label_seconds:.1f} s ({len(issues.rows)}); similar query {query_ms:.1f} ms; "
          f"peak RSS {peak:.0f} MB ({peak - base:.0f} MB above the start; the features are {x.nbytes / 2**20:.0f} MB)")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--photos", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    p.add_argument("--workdir", default="/tmp/featcache-audit-bench")
    args = p.parse_args()
    if args.photos:
        photos(args)
    if args.speed:
        speed(args)


if __name__ == "__main__":
    main()
