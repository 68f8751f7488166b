"""Accuracy and head-retraining time on cats vs dogs (2,000 train / 1,000 validation / 1,000 test).

    python benchmarks/accuracy.py [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-accuracy] [--json]

Extracts MobileNetV2@160 features (real ImageNet weights, unpooled 5x5x1280) and the pixel
baseline (pixels@32) once into WORKDIR/store.h5 (a rerun reuses them), then trains every head
below from the cache and prints one table: head, feature set, validation and test accuracy,
training seconds (the head's fit only: the data are already in the store). Timings are wall
clock on whatever the machine is doing; the load average is printed beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# (label, base, head, options): the classic defaults first, as they are, then the variants.
RUNS = [
    ("dense, classic defaults (flatten, RMSprop 2e-5, 30 epochs, batch 20)", "mobilenet_v2", "dense", {}),
    ("dense, classic defaults, 1 batch per compiled call (Keras' default)", "mobilenet_v2", "dense",
     {"steps_per_execution": 1}),
    ("dense, avg pool, RMSprop 2e-5", "mobilenet_v2", "dense", {"pool": "avg"}),
    ("dense, avg pool, RMSprop 1e-4", "mobilenet_v2", "dense", {"pool": "avg", "lr": 1e-4}),
    ("logreg, avg pool (lbfgs, C=1)", "mobilenet_v2", "logreg", {"pool": "avg"}),
    ("logreg, avg pool, streamed (SGD, 64 MB budget)", "mobilenet_v2", "logreg", {"pool": "avg", "memory_budget_mb": 64}),
    ("logreg, pixel baseline (pixels@32, flattened)", "pixels", "logreg", {}),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    parser.add_argument("--workdir", default="/tmp/featcache-accuracy")
    parser.add_argument("--only", help="Comma-separated run numbers (1-based) to run [default: all].")
    parser.add_argument("--json", action="store_true", help="Also print the results as JSON.")
    args = parser.parse_args(argv)

    from featcache.classify.train.harness import train
    from featcache.extract.pipeline import ExtractConfig, extract

    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = str(work / "store.h5")
    extracted = {}
    for base, config in (
        ("mobilenet_v2", ExtractConfig(base="mobilenet_v2", size=160, weights=args.weights, progress=False)),
        ("pixels", ExtractConfig(base="pixels", size=32, progress=False)),
    ):
        result = extract(args.data, store, config)
        extracted[base] = result
        print(f"extract {base}: {result['feature_set']} shape {tuple(result['shape'])}, extracted {result['extracted']}, "
              f"reused {result['reused']}, failed {result['failed']}, {result['seconds']:.1f} s", flush=True)

    runs_dir = work / "runs"
    shutil.rmtree(runs_dir, ignore_errors=True)  # runs are never overwritten: start clean
    runs_dir.mkdir()
    chosen = {int(i) for i in args.only.split(",")} if args.only else None
    rows = []
    for number, (label, base, head, options) in enumerate(RUNS, 1):
        if chosen and number not in chosen:
            continue
        load_before = os.getloadavg()[0]
        summary = train(store, extracted[base]["feature_set"], head=head, out=str(runs_dir / f"{number:02d}-{head}"),
                        **options)
        rows.append({"run": number, "label": label, "feature_set": summary["feature_set"],
                     "validation": summary["validation"]["accuracy"], "test": summary["test"]["accuracy"],
                     "seconds": summary["seconds"], "cpu_seconds": summary["cpu_seconds"],
                     "load": round((load_before + os.getloadavg()[0]) / 2, 1),
                     "untrained_flag": summary["untrained"]["flag"], "overfitting": summary["overfitting"]["flag"],
                     "run_dir": summary["run_dir"]})
        r = rows[-1]
        print(f"{number}. {label}: val {r['validation']:.4f} test {r['test']:.4f} in {r['seconds']:.1f} s "
              f"({r['cpu_seconds']:.1f} CPU s, load {r['load']})", flush=True)

    print()
    print("| # | head | feature set | val acc | test acc | train s | CPU s | load avg |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        short = r["feature_set"].rsplit("-", 1)[0]
        print(f"| {r['run']} | {r['label']} | {short} | {r['validation']:.4f} | {r['test']:.4f} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['load']} |")
    print(f"\n{os.cpu_count()} CPU cores. train s: wall clock of the head's fit (reading the features from the "
          "store included); CPU s: CPU time of all its threads; load avg: mean 1-minute load before and after.")
    if args.json:
        print(json.dumps({"extract": extracted, "runs": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
