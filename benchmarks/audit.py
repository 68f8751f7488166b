"""featcache audit: accuracy on planted real photos, and speed at 100,000 rows (issue 22).

    python benchmarks/audit.py [--photos] [--speed] [--rows 100000]
        [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-audit-bench] [--store STORE.h5] [--exact | --index] [--skip-labels]
        [--replant 17]

--photos: cats vs dogs (2,000 / 1,000 / 1,000) with planted problems: 5% of train labels moved
to the other class, 30 near-copies (JPEG quality 70, resized, cropped by a few pixels) inside
train, 30 validation/test images copied into train the same way (leaks), 10 byte-for-byte
copies; MobileNetV2@160 features (real weights, avg-pooled); prints recall and precision of
label issues, duplicates and leaks, the similar-image hit rate (the original among the 5
neighbours of each near-copy), the similarities of planted copies against the closest
distinct photos (what the near-duplicate threshold is chosen from), and the test accuracy of a
logreg and a dense head trained before and after --exclude of the audit's exclude.txt.

--replant N: the label pass, one round against two, on the --photos store with its moved labels
put back and 100 train labels moved again at random, N times (seeds 100 on), besides the
benchmark's own planting: how much of the difference is the planting's luck.

--speed: ROWS vectors tiled from a real store's features with noise (see tiled()): seconds for the
duplicate/leak/outlier pass (through the index at or above INDEX_MIN_ROWS, or --exact) and for
the label-issue pass, the index against the exact search on a sample, `similar` queries, memory.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import random
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
    leak_pairs = [frozenset(pair) for pair in leaks]
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
    before_and_after(store, work / "audit" / "exclude.txt", work)


def before_and_after(store, exclude, work) -> None:
    """Test accuracy of a head trained on every row, and of one trained with audit's exclude.txt
    left out: on each run's own test rows (--exclude drops flagged test images too) and on the
    test rows both keep (a head-only export of each run scored on the cached rows)."""
    import featcache

    from featcache.cache.exclude import read_exclude

    dropped = set(read_exclude(str(exclude)))
    for head in ("logreg", "dense"):
        scored = {}
        for name, excluding in (("before", None), ("after", exclude)):
            run = featcache.train(store, out=work / f"run-{head}-{name}", head=head, no_report=True, exclude=excluding)
            exported = featcache.export(run["run_dir"], work / f"head-{head}-{name}.keras", head_only=True)
            rows = featcache.predict(exported["out"], features=store)["predictions"]
            scored[name] = {r["path"]: r["predicted"] == r["path"].split("/")[1] for r in rows if r["split"] == "test"}
            print(f"{head} {name}: trained on {run['train']['n']} rows, test accuracy {run['test']['accuracy']:.4f} "
                  f"on its {run['test']['n']} test rows", flush=True)
        common = [p for p in scored["before"] if p not in dropped]
        print(f"{head} on the {len(common)} test rows both keep: before {np.mean([scored['before'][p] for p in common]):.4f}, "
              f"after {np.mean([scored['after'][p] for p in common]):.4f}", flush=True)


def read_unplanted(store):
    """The --photos store read whole, and its true labels: the moved ones put back (cats vs dogs:
    a moved label is the other class), so rows made from it have no wrong label but the ones a
    benchmark plants itself; and which rows were moved."""
    from featcache.auditing.job import read_stored

    real = read_stored(store, None, None)
    moved = np.array([p.rsplit("/", 1)[-1].startswith("moved_") for p in real.paths])
    assert not moved.any() or len(real.class_names) == 2, "moved labels are put back for two classes only"
    return real, np.where(moved, 1 - real.labels, real.labels), moved


def replant(args) -> None:
    from featcache.auditing import labels as label_audit, neighbours

    real, truth, moved = read_unplanted(args.store)
    x, n = real.features, len(truth)
    train = np.flatnonzero(real.splits == "train")
    _, (_, top_idx) = neighbours.scan(real.unit, 0.95, k=label_audit.VOTE_NEIGHBOURS)
    plantings = [moved]
    for seed in range(100, 100 + args.replant):
        m = np.zeros(n, bool)
        m[np.random.default_rng(seed).choice(train, int(moved.sum()), replace=False)] = True
        plantings.append(m)
    scores = {"one round": [], "two rounds": []}
    for i, m in enumerate(plantings):
        labels = np.where(m, 1 - truth, truth)
        for name, rows in (("one round", label_audit.find_label_issues(labels, label_audit.out_of_fold(x, labels, seed=i)).rows),
                           ("two rounds", label_audit.audit_labels(x, labels, top_idx, seed=i)[0].rows)):
            tp = int(m[rows].sum())
            scores[name].append((tp / m.sum(), tp / max(len(rows), 1)))
    for name, r in scores.items():
        a = np.array(r)
        print(f"{name}: the benchmark's planting recall {a[0, 0]:.3f} at precision {a[0, 1]:.3f}; over {len(a)} plantings "
              f"{a[:, 0].mean():.3f} at {a[:, 1].mean():.3f} (lowest recall {a[:, 0].min():.2f}, lowest precision "
              f"{a[:, 1].min():.2f}; recall >= 0.90 in {int(np.sum(a[:, 0] >= 0.9))})", flush=True)


def memory_mb(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


def reset_peak() -> float:
    """Start a new peak (Linux: clear_refs 5 resets VmHWM); returns the current resident MB."""
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return memory_mb("VmRSS")


def tiled(args):
    """ROWS x DIM vectors from a real store's features: each row a mix of two real rows (60-90% of
    one, whose true label it takes) times per-feature log-normal noise (sigma 0.3), 5% of labels
    moved to another class, and 300 planted twins (a row copied with 5% noise)."""
    real, truth, _ = read_unplanted(args.store)
    rng = np.random.default_rng(0)
    n = args.rows
    i, j = rng.integers(0, len(real.features), n), rng.integers(0, len(real.features), n)
    w = rng.uniform(0.6, 0.9, (n, 1)).astype(np.float32)
    x = w * real.features[i] + (1 - w) * real.features[j]
    x *= rng.lognormal(0, 0.3, x.shape).astype(np.float32)
    labels = truth[i]  # a copy (fancy indexing)
    k = int(labels.max()) + 1
    moved = rng.choice(n, n // 20, replace=False)
    labels[moved] = (labels[moved] + rng.integers(1, k, len(moved))) % k
    twins = np.stack([rng.choice(n // 2, 300, replace=False), n // 2 + rng.choice(n // 2, 300, replace=False)], 1)
    x[twins[:, 1]] = x[twins[:, 0]] * rng.lognormal(0, 0.05, (300, x.shape[1])).astype(np.float32)
    return x, labels, moved, twins


def speed(args) -> None:
    """The audit's two passes at ROWS rows, timed apart, with the index (build, then reuse) or exact."""
    from featcache.auditing import index, labels as label_audit, neighbours
    from featcache.auditing.job import SCAN_NEIGHBOURS

    x, labels, moved, twins = tiled(args)
    n = len(x)
    digests = [f"{i:064x}" for i in range(n)]
    store = os.path.join(args.workdir, "speed.h5")
    os.makedirs(args.workdir, exist_ok=True)
    shutil.rmtree(index.folder(store), ignore_errors=True)
    if args.exact or args.index:
        index.INDEX_MIN_ROWS = n + 1 if args.exact else 0
    base = reset_peak()  # the features in memory, nothing else of the audit's
    cpu = time.process_time()
    t = time.perf_counter()
    v = neighbours.vectors(x)
    (pairs, (top_sims, top_idx)), how = index.scan(store, "speed", v, digests, 0.95, k=SCAN_NEIGHBOURS)
    pairs = neighbours.unique_pairs(*(np.concatenate(p) for p in zip(pairs, neighbours.standing_out(
        top_sims, top_idx, 0.75, 0.08))))
    groups, _ = neighbours.groups(n, pairs[0], pairs[1])
    flagged = neighbours.flag_outliers(neighbours.outlier_scores_of(top_sims[:, : neighbours.OUTLIER_NEIGHBOURS]))
    dup_seconds, dup_cpu = time.perf_counter() - t, time.process_time() - cpu
    dup_mb = memory_mb() - base
    found = set(zip(pairs[0].tolist(), pairs[1].tolist()))
    twin_recall = np.mean([(int(a), int(b)) in found for a, b in twins])
    print(f"{n} x {x.shape[1]} ({how['search']}): duplicates+leaks+outliers {dup_seconds:.1f} s ({dup_cpu:.1f} s CPU; "
          f"{len(groups)} groups, {len(flagged)} outliers); planted twins found {twin_recall:.3f}; "
          f"peak {dup_mb:.0f} MB above the features ({x.nbytes / 2**20:.0f} MB)", flush=True)
    if how["search"] == "index":
        t = time.perf_counter()
        (again, _), how2 = index.scan(store, "speed", v, digests, 0.95, k=SCAN_NEIGHBOURS)
        print(f"  again with the saved index: {time.perf_counter() - t:.1f} s (built: {how2['index_built']}); "
              f"index file {os.path.getsize(how['index']) / 2**20:.0f} MB", flush=True)
        # recall against the exact search, on a sample of rows (exact over all 100,000 takes ~12 min)
        sample = np.unique(np.concatenate([np.arange(0, n, n // 1000), twins.ravel()]))
        s = v[sample] @ v.T
        s[np.arange(len(sample)), sample] = -np.inf
        exact_idx = np.argsort(-s, axis=1)[:, :5]
        exact_pairs = {(min(int(r), int(c)), max(int(r), int(c))) for r, c in zip(*np.nonzero(s >= 0.95))
                       for r, c in [(sample[r], c)]}
        del s
        print(f"  vs exact on {len(sample)} rows: recall@5 {np.mean([len(set(a) & set(b)) / 5 for a, b in zip(top_idx[sample, :5], exact_idx)]):.4f}, "
              f"pairs >= 0.95 found {np.mean([p in found for p in exact_pairs]):.4f} of {len(exact_pairs)}", flush=True)
        ix = index.open_fresh(store, "speed", digests)
        t = time.perf_counter()
        ix = index.open_fresh(store, "speed", digests)
        load = time.perf_counter() - t
        times = []
        for i in range(50):
            t = time.perf_counter()
            ix.search(ix.vectors([i * (n // 50)]), 6)
            times.append(time.perf_counter() - t)
        print(f"  similar: index load (CRC-checked) {load:.2f} s, one query median {np.median(times) * 1000:.2f} ms, "
              f"max {max(times) * 1000:.1f} ms", flush=True)
        del ix
    del v, top_sims  # as the audit drops the unit vectors before its folds (keeping the neighbours' positions)
    if not args.skip_labels:
        base = reset_peak()
        cpu = time.process_time()
        t = time.perf_counter()
        issues, _ = label_audit.audit_labels(x, labels, top_idx, 5, 0)
        label_seconds, label_cpu = time.perf_counter() - t, time.process_time() - cpu
        label_mb = memory_mb() - base
        tp = len(set(issues.rows.tolist()) & set(moved.tolist()))
        print(f"  label issues {label_seconds:.1f} s ({label_cpu:.1f} s CPU): {len(issues.rows)} flagged, recall "
              f"{tp / len(moved):.3f}, precision {tp / max(1, len(issues.rows)):.3f} of {len(moved)} moved; "
              f"peak {label_mb:.0f} MB above the features", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--photos", action="store_true")
    p.add_argument("--speed", action="store_true")
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    p.add_argument("--workdir", default="/tmp/featcache-audit-bench")
    p.add_argument("--store", default="/tmp/featcache-audit-bench/store.h5",
                   help="--speed: the real features to tile (default: what --photos extracted)")
    p.add_argument("--exact", action="store_true", help="--speed: the exact search whatever the size")
    p.add_argument("--index", action="store_true", help="--speed: the index whatever the size")
    p.add_argument("--skip-labels", action="store_true")
    p.add_argument("--replant", type=int, default=0, help="N random re-plantings of the moved labels (see above)")
    args = p.parse_args()
    if args.photos:
        photos(args)
    if args.replant:
        replant(args)
    if args.speed:
        speed(args)


if __name__ == "__main__":
    main()
