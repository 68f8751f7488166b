"""The transfer strategies side by side on cats vs dogs, MobileNetV2@160 (shipped ImageNet weights).

    python benchmarks/strategies.py [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-strategies] [--head-epochs 10] [--epochs 2] [--all-epochs 2]
        [--per-class-train N] [--per-class-eval N] [--no-augment] [--json FILE]

1. frozen head from the cache: a dense head (avg pooled, RMSprop 1e-4) trained on cached features;
   every strategy below starts from this head (`featcache finetune` never starts from a random one);
2. `finetune --unfreeze none`: the head alone, trained on images through the frozen base (lr 1e-4);
3. `finetune --unfreeze top`: the registry's top block (block_16 + Conv_1) with the head (lr 1e-5);
4. `finetune --unfreeze all`: the whole base with the head (lr 1e-5; BatchNormalization frozen).

Strategies 2-4 train on images with the same seeded augmentation (flip, rotation, zoom,
translation, contrast; --no-augment to turn it off), the same batch size (20) and epochs (--epochs,
--all-epochs for `all`). Seconds per epoch include the epoch's validation pass; total seconds are
the whole command (decoding the images once, scoring every split before and after). CPU only;
wall clock on whatever else the machine runs: the load average is printed. --per-class-* train on
a subset (the first N photos per class and split) to fit a slow machine.
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
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    ap.add_argument("--workdir", default="/tmp/featcache-strategies")
    ap.add_argument("--head-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2, help="epochs of --unfreeze none and top")
    ap.add_argument("--all-epochs", type=int, default=2, help="epochs of --unfreeze all")
    ap.add_argument("--per-class-train", type=int, default=0)
    ap.add_argument("--per-class-eval", type=int, default=0)
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--only", help="comma list of strategies to run (frozen,none,top,all) [all four]")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    from finetune import subset  # benchmarks/finetune.py: the same subsetting

    from featcache.classify.train.finetune import finetune
    from featcache.classify.train.harness import train
    from featcache.extract.pipeline import extract

    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images = pathlib.Path(args.data)
    if args.per_class_train or args.per_class_eval:
        images = subset(images, work / "images", args.per_class_train, args.per_class_eval)
    store = str(work / "store.h5")
    t = time.perf_counter()
    plain = extract(str(images), store, base="mobilenet_v2", size=160, weights=args.weights, pooling="none",
                    precision="fp32", progress=False)
    extract_seconds = time.perf_counter() - t
    print(f"extract: {plain['feature_set']} extracted {plain['extracted']}, reused {plain['reused']} "
          f"in {extract_seconds:.1f} s", flush=True)
    runs = work / "strategy-runs"
    shutil.rmtree(runs, ignore_errors=True)  # runs are never overwritten: start clean
    runs.mkdir()
    chosen = set(args.only.split(",")) if args.only else {"frozen", "none", "top", "all"}
    augment = None if args.no_augment else "all"
    rows = []

    head_dir = str(runs / "head")
    load = os.getloadavg()[0]
    t = time.perf_counter()
    r = train(store, plain["feature_set"], head="dense", pool="avg", lr=1e-4, epochs=args.head_epochs, out=head_dir)
    rows.append({"strategy": "frozen base, head from the cache", "unfreeze": "-", "epochs": args.head_epochs,
                 "lr": 1e-4, "trainable_parameters": _head_parameters(head_dir),
                 "validation": r["validation"]["accuracy"], "test": r["test"]["accuracy"],
                 "s_per_epoch": r["seconds"] / args.head_epochs, "total_s": time.perf_counter() - t,
                 "load": (load + os.getloadavg()[0]) / 2,
                 "note": f"+ extraction once: {extract_seconds:.0f} s this run" + (" (reused)" if not plain["extracted"] else "")})
    _print_row(rows[-1])
    for unfreeze, lr, epochs in (("none", 1e-4, args.epochs), ("top", 1e-5, args.epochs), ("all", 1e-5, args.all_epochs)):
        if unfreeze not in chosen:
            continue
        load = os.getloadavg()[0]
        r = finetune(str(images), head_dir, str(runs / f"unfreeze-{unfreeze}"), unfreeze=unfreeze, lr=lr,
                     epochs=epochs, batch_size=20, augment=augment, aug_seed=0)
        rows.append({"strategy": f"finetune --unfreeze {unfreeze}" + (" --augment all" if augment else ""),
                     "unfreeze": unfreeze, "epochs": epochs, "lr": lr,
                     "trainable_parameters": r["trainable_parameters"],
                     "validation": r["validation"]["accuracy"], "test": r["test"]["accuracy"],
                     "s_per_epoch": sum(r["epoch_seconds"]) / len(r["epoch_seconds"]), "total_s": r["seconds_total"],
                     "load": (load + os.getloadavg()[0]) / 2,
                     "note": f"{len(r['trainable_layers'])} base layers train; decode {r['data_seconds']:.0f} s"})
        _print_row(rows[-1])

    from featcache.cache.store import open_store

    with open_store(store) as s:
        n_train = len(s[plain["feature_set"]].rows("train"))
    print("\n| strategy | epochs | lr | trainable params | val acc | test acc | s/epoch | total s | load | notes |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['strategy']} | {r['epochs']} | {r['lr']:g} | {r['trainable_parameters']:,} | {r['validation']:.4f} | "
              f"{r['test']:.4f} | {r['s_per_epoch']:.1f} | {r['total_s']:.0f} | {r['load']:.1f} | {r['note']} |")
    print(f"\n{images}: {n_train} training images; {os.cpu_count()} CPU cores; load average now "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": str(images), "rows": rows, "extract_seconds": extract_seconds}, f, indent=2)
    return 0


def _head_parameters(run_dir: str) -> int:
    config = json.loads(pathlib.Path(run_dir, "config.json").read_text())
    return int(config["training"]["parameters"])


def _print_row(r: dict) -> None:
    print(f"{r['strategy']}: val {r['validation']:.4f} test {r['test']:.4f}, {r['s_per_epoch']:.1f} s/epoch, "
          f"{r['total_s']:.0f} s total (load {r['load']:.1f})", flush=True)


if __name__ == "__main__":
    sys.exit(main())
