"""A 30-trial `featcache search` on cats vs dogs: best test accuracy and wall time.

    python benchmarks/search.py [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-search] [--trials 30] [--sampler tpe] [--seed 0] [--json]

Extracts once into WORKDIR/store.h5 (a rerun reuses the features): MobileNetV2@160 with the
shipped ImageNet weights, unpooled (5x5x1280) and global-average pooled (1280), and MobileNet
alpha 0.25 (the bundled weights, 5x5x256). Then searches heads x feature sets x head settings
with the default space from scratch (WORKDIR/search is removed first) and prints the
leaderboard's top, the best trial's test accuracy, how many trials were pruned, and the wall
time, with the load average beside it (timings on a shared machine follow the CPU share left).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    parser.add_argument("--workdir", default="/tmp/featcache-search")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--sampler", default="tpe", choices=("tpe", "random"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heads", default="dense,logreg")
    parser.add_argument("--sets", default="v2,v2avg,m025", help="Comma list of v2 (5x5x1280), v2avg (1280), m025 (5x5x256).")
    parser.add_argument("--json", action="store_true", help="Also print the result as JSON.")
    args = parser.parse_args(argv)

    from featcache.classify.search.search import search
    from featcache.extract.pipeline import ExtractConfig, extract

    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = str(work / "store.h5")
    configs = {
        "v2": ExtractConfig(base="mobilenet_v2", size=160, weights=args.weights, precision="fp32", progress=False),
        "v2avg": ExtractConfig(base="mobilenet_v2", size=160, weights=args.weights, precision="fp32", pooling="avg",
                               progress=False),
        "m025": ExtractConfig(base="mobilenet_0.25", size=160, weights="bundled", precision="fp32", progress=False),
    }
    names = []
    for label in args.sets.split(","):
        result = extract(args.data, store, configs[label])
        names.append(result["feature_set"])
        print(f"extract {label}: {result['feature_set']} shape {tuple(result['shape'])}, extracted {result['extracted']}, "
              f"reused {result['reused']}, {result['seconds']:.1f} s", flush=True)

    out = work / "search"
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), time.process_time()
    result = search(store, str(out), trials=args.trials, heads=args.heads, feature_sets=names, sampler=args.sampler,
                    seed=args.seed, log=lambda text: print("  " + text, flush=True))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    load = round((load_before + os.getloadavg()[0]) / 2, 1)

    board = [r for r in result["leaderboard"] if r["rank"] is not None]
    trial_seconds = sum(r["seconds"] or 0 for r in result["leaderboard"])
    print()
    print("| rank | trial | head | feature set | settings | val loss | val acc | test acc |")
    print("|---|---|---|---|---|---|---|---|")
    for r in board[:5]:
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["params"].items()
                             if k not in ("seed", "early_stopping"))
        test = f"{r['test']['accuracy']:.4f}" if r["test"] else "-"
        print(f"| {r['rank']} | {r['trial']} | {r['head']} | {r['feature_set'].rsplit('-', 1)[0]} | {settings} | "
              f"{r['loss']:.4f} | {r['accuracy']:.4f} | {test} |")
    t, best = result["trials"], result["best"]
    print(f"\n{t['finished']} trials ({t['complete']} complete, {t['pruned']} pruned, {t['fail']} failed), sampler "
          f"{args.sampler} seed {args.seed}: best trial {best['trial']} ({best['head']}), validation accuracy "
          f"{best['accuracy']:.4f}, test accuracy {best['test']['accuracy']:.4f} (loss {best['test']['loss']:.4f})")
    print(f"wall {wall:.1f} s (trials {trial_seconds:.1f} s, the rest: testing the top {len([r for r in board if r['test']])}, "
          f"retraining the best, plots), CPU {cpu:.1f} s, {os.cpu_count()} cores, load average {load}")
    if args.json:
        print(json.dumps({"wall_seconds": wall, "cpu_seconds": cpu, "load": load, "result": result}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
