"""Ensembles and fused heads against the best single head, on cats vs dogs from the cache.

    python benchmarks/ensemble_fusion.py [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-ensemble] [--json FILE]

Extracts three feature sets of the 2,000/1,000/1,000 photos once into WORKDIR/store.h5 (a rerun
reuses them): MobileNetV2@160 unpooled (5x5x1280) and @224 avg-pooled with the shipped
ImageNet weights, and MobileNet alpha 0.25@160 unpooled (5x5x256) with the bundled ImageNet
weights. Then, from the cache only: a logreg and a dense head on each set (single heads),
ensembles of them (equal and fitted weights), and fused heads on two or three sets. Every
candidate is chosen on validation; test is reported, never used to choose (a fitted
ensemble's validation numbers are optimistic: its weights were fitted there). Finally the
chosen ensemble and fused runs are exported and checked against `predict` on test images.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SETS = {  # short name: extract options
    "v2@160": dict(base="mobilenet_v2", size=160, pooling="none"),
    "v2@224": dict(base="mobilenet_v2", size=224, pooling="avg"),
    "m025@160": dict(base="mobilenet_0.25", size=160, pooling="none", weights="bundled"),
}
HEADS = {  # short name: train options (heads pool unpooled sets themselves)
    "logreg": dict(head="logreg", pool="avg"),
    "dense": dict(head="dense", pool="avg", lr=1e-4, epochs=10),
}
ENSEMBLES = [  # (members as "head:set", weights)
    (["logreg:v2@160", "dense:v2@160"], "equal"),
    (["logreg:v2@160", "logreg:v2@224"], "equal"),
    (["dense:v2@160", "dense:v2@224"], "equal"),
    (["logreg:v2@160", "logreg:v2@224", "logreg:m025@160"], "equal"),
    (["logreg:v2@160", "logreg:v2@224", "logreg:m025@160"], "fit"),
    (["logreg:v2@160", "dense:v2@160", "logreg:v2@224", "dense:v2@224"], "equal"),
    (["logreg:v2@160", "dense:v2@160", "logreg:v2@224", "dense:v2@224"], "fit"),
    ([f"{h}:{s}" for s in SETS for h in HEADS], "equal"),
    ([f"{h}:{s}" for s in SETS for h in HEADS], "fit"),
]
FUSIONS = [  # (head, sets)
    ("logreg", ["v2@160", "v2@224"]),
    ("logreg", ["v2@160", "m025@160"]),
    ("logreg", ["v2@160", "v2@224", "m025@160"]),
    ("dense", ["v2@160", "v2@224"]),
    ("dense", ["v2@160", "m025@160"]),
    ("dense", ["v2@160", "v2@224", "m025@160"]),
]


def _best(rows: list[dict]) -> dict:
    """Chosen on validation: accuracy, then loss."""
    return min(rows, key=lambda r: (-r["validation"]["accuracy"], r["validation"]["loss"]))


def _check_export(run_dir: str, out: str, images: list[str]) -> float:
    """Max |export - predict| over ``images`` (the exported model, loaded in safe mode)."""
    import keras
    import numpy as np

    from featcache.classify.deploy.export import export
    from featcache.classify.deploy.predict import predict
    from featcache.extract.images.decode import decode_image, read_bytes

    info = export(run_dir, out)
    model = keras.models.load_model(out)
    result = predict(run_dir, images, top_k=2)
    names = result["class_names"]
    expected = np.array([[{t["class"]: t["probability"] for t in p["top"]}[c] for c in names]
                         for p in result["predictions"]])
    feeds = [np.stack([decode_image(read_bytes(p["path"]), i["shape"][0]) for p in result["predictions"]]).astype("float32")
             for i in info["inputs"]]
    got = np.asarray(model.predict_on_batch(feeds[0] if len(feeds) == 1 else feeds))
    return float(np.abs(got - expected).max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    parser.add_argument("--workdir", default="/tmp/featcache-ensemble")
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)

    from featcache.classify.train.ensemble import ensemble
    from featcache.classify.train.harness import train
    from featcache.extract.pipeline import extract

    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = str(work / "store.h5")
    names, timings = {}, {}
    for short, options in SETS.items():
        options = {"weights": args.weights, **options}
        t = time.perf_counter()
        result = extract(args.data, store, precision="fp32", progress=False, **options)
        timings[short] = time.perf_counter() - t
        names[short] = result["feature_set"]
        print(f"extract {short}: {result['feature_set']} shape {tuple(result['shape'])}, extracted {result['extracted']}, "
              f"reused {result['reused']} in {timings[short]:.1f} s", flush=True)

    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # runs are never overwritten: start clean
    runs.mkdir()
    singles, ensembles, fusions = [], [], []
    for short in SETS:
        for head, options in HEADS.items():
            out = str(runs / f"{head}-{short.replace('@', '_')}")
            r = train(store, names[short], out=out, **options)
            singles.append({"name": f"{head}:{short}", "run_dir": out, "validation": r["validation"], "test": r["test"],
                            "seconds": r["seconds"]})
            print(f"single {head} on {short}: val {r['validation']['accuracy']:.4f} test {r['test']['accuracy']:.4f} "
                  f"({r['seconds']:.1f} s)", flush=True)
    by_name = {s["name"]: s["run_dir"] for s in singles}
    for i, (members, weights) in enumerate(ENSEMBLES):
        out = str(runs / f"ensemble-{i}-{weights}")
        t = time.perf_counter()
        r = ensemble([by_name[m] for m in members], out, weights=weights)
        ensembles.append({"name": " + ".join(members) + f" ({weights})", "run_dir": out, "weights": r["weights"],
                          "validation": r["validation"], "test": r["test"], "seconds": time.perf_counter() - t})
        print(f"ensemble {ensembles[-1]['name']}: weights {', '.join(f'{w:.3f}' for w in r['weights'])}; "
              f"val {r['validation']['accuracy']:.4f} test {r['test']['accuracy']:.4f}", flush=True)
    for head, sets in FUSIONS:
        out = str(runs / f"fused-{head}-{'-'.join(s.replace('@', '_') for s in sets)}")
        r = train(store, out=out, feature_sets=[names[s] for s in sets], **HEADS[head])
        fusions.append({"name": f"{head} on {' + '.join(sets)}", "run_dir": out, "validation": r["validation"],
                        "test": r["test"], "seconds": r["seconds"]})
        print(f"fused {fusions[-1]['name']}: val {r['validation']['accuracy']:.4f} test {r['test']['accuracy']:.4f} "
              f"({r['seconds']:.1f} s)", flush=True)

    chosen = {"single head": _best(singles), "ensemble": _best(ensembles), "fused head": _best(fusions)}
    test_images = sorted(str(p) for p in (pathlib.Path(args.data) / "test").rglob("*.jpg"))[::50]  # 20 photos
    checks = {}
    for kind in ("ensemble", "fused head"):
        target = str(work / f"{kind.replace(' ', '_')}.keras")
        if os.path.exists(target):
            os.remove(target)
        checks[kind] = _check_export(chosen[kind]["run_dir"], target, test_images)

    load = os.getloadavg()
    print("\n| kind | run | val acc | val loss | test acc | test loss |\n|---|---|---|---|---|---|")
    for kind, rows in (("single", singles), ("ensemble", ensembles), ("fused", fusions)):
        for r in rows:
            v, t = r["validation"], r["test"]
            print(f"| {kind} | {r['name']} | {v['accuracy']:.4f} | {v['loss']:.4f} | {t['accuracy']:.4f} | {t['loss']:.4f} |")
    print("\nchosen on validation:")
    for kind, r in chosen.items():
        print(f"  best {kind}: {r['name']}: val {r['validation']['accuracy']:.4f}, test {r['test']['accuracy']:.4f} "
              f"(test loss {r['test']['loss']:.4f})")
    for kind, diff in checks.items():
        print(f"  {kind} export vs predict on {len(test_images)} test photos: max |diff| {diff:.2e}")
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} ({os.cpu_count()} cores)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"sets": names, "extract_seconds": timings, "singles": singles, "ensembles": ensembles,
                       "fusions": fusions, "chosen": chosen, "export_max_diff": checks, "load": load}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
