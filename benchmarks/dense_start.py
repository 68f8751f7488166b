"""The default dense head before and after it starts at chance (issue 25): untrained loss and
test accuracy over seeds, on the demo's 4-class textures and on cats vs dogs, in one run.

    python benchmarks/dense_start.py --before /path/to/checkout-at-472b177 [--seeds 3]
        [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-dense-start]

"after" is this checkout; "before" is another featcache checkout (e.g. a git worktree at the
commit before the change), run in a subprocess on the same stores, which that checkout writes
first so both read the same features. Cats vs dogs: MobileNetV2@160 (real weights), avg-pooled
(1,280 features), 2,000 / 1,000 / 1,000 images. The demo: its own generated set (400 images,
MobileNet alpha 0.25 avg-pooled) with the demo's dense settings (lr 1e-3).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# (name, classes, extra train options)
TASKS = {"demo": {"lr": 1e-3}, "cats_dogs": {"pool": "avg"}}


def child(args) -> None:
    """Runs in the checkout given by sys.path[0]: prepare the stores, then train every seed."""
    import featcache

    work = pathlib.Path(args.workdir)
    stores = {}
    demo = work / "demo"
    if not (demo / "features.h5").exists():
        featcache.demo(workdir=demo, per_class=100)
    stores["demo"] = (demo / "features.h5", "mobilenet_0.25")
    cats = work / "cats_dogs.h5"
    if not cats.exists():
        featcache.extract_features(args.data, cats, base="mobilenet_v2", size=160, weights=args.weights,
                                   pooling="avg", progress=False)
    stores["cats_dogs"] = (cats, "mobilenet_v2")
    rows = []
    for task, options in TASKS.items():
        store, base = stores[task]
        for seed in range(args.seeds):
            out = work / f"{args.label}-{task}-{seed}"
            r = featcache.train(store, out=out, base=base, head="dense", seed=seed, no_report=True, **options)
            k = len(r["class_names"]) if "class_names" in r else None
            rows.append({"task": task, "seed": seed, "untrained_loss": r["untrained"]["loss"],
                         "expected_loss": r["untrained"]["expected_loss"], "flag": r["untrained"]["flag"],
                         "test_accuracy": r["test"]["accuracy"], "validation_accuracy": r["validation"]["accuracy"],
                         "seconds": r["seconds"], "k": k})
    print("RESULT " + json.dumps(rows))


def run(checkout: pathlib.Path, label: str, args) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", "--label", label, "--workdir", args.workdir, "--seeds", str(args.seeds),
           "--data", args.data, "--weights", args.weights]
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=checkout)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{label} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--before", help="a featcache checkout with the previous dense head")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    p.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    p.add_argument("--workdir", default="/tmp/featcache-dense-start")
    p.add_argument("--child", action="store_true")
    p.add_argument("--label", default="after")
    args = p.parse_args()
    if args.child:
        sys.path.insert(0, os.getcwd())
        return child(args)
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    if args.before:  # first, so the stores are written in the older format both can read
        results["before"] = run(pathlib.Path(args.before).resolve(), "before", args)
    results["after"] = run(REPO, "after", args)
    print(f"{'task':<10} {'code':<7} {'untrained loss / ln K (per seed)':<36} {'test accuracy (per seed)':<28} mean")
    for task in TASKS:
        for label, rows in results.items():
            mine = [r for r in rows if r["task"] == task]
            ratios = " ".join(f"{r['untrained_loss'] / r['expected_loss']:.2f}" for r in mine)
            accs = " ".join(f"{r['test_accuracy']:.4f}" for r in mine)
            mean = sum(r["test_accuracy"] for r in mine) / len(mine)
            print(f"{task:<10} {label:<7} {ratios:<36} {accs:<28} {mean:.4f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
