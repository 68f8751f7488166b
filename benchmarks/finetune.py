"""Stage three on cats vs dogs, MobileNetV2@160 (real ImageNet weights): head only, head with
cached augmentation, fine-tuned from images, fine-tuned from cached boundary activations.

    python benchmarks/finetune.py [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-finetune] [--per-class-train N] [--per-class-eval N]
        [--head-epochs 10] [--ft-epochs 3] [--views 2] [--json]

With --per-class-* the split folders are subsampled (the first N files per class, copied into
WORKDIR/images) so the whole run fits a 2-core machine; 0 = all files. Seconds are wall clock
on whatever else the machine is doing (the load average is printed).
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


def subset(data: pathlib.Path, out: pathlib.Path, train_n: int, eval_n: int) -> pathlib.Path:
    if out.exists():
        return out
    for split in ("train", "validation", "test"):
        n = train_n if split == "train" else eval_n
        for cls in sorted(p.name for p in (data / split).iterdir() if p.is_dir()):
            files = sorted((data / split / cls).iterdir())
            files = files[:n] if n else files
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copyfile(f, out / split / cls / f.name)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    ap.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    ap.add_argument("--workdir", default="/tmp/featcache-finetune")
    ap.add_argument("--per-class-train", type=int, default=0)
    ap.add_argument("--per-class-eval", type=int, default=0)
    ap.add_argument("--head-epochs", type=int, default=10)
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from featcache.classify.finetune import finetune
    from featcache.classify.harness import train
    from featcache.extract.backbones import get_backbone
    from featcache.extract.pipeline import extract

    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images = pathlib.Path(args.data)
    if args.per_class_train or args.per_class_eval:
        images = subset(images, work / "images", args.per_class_train, args.per_class_eval)
    store = str(work / "store.h5")
    common = dict(base="mobilenet_v2", size=160, weights=args.weights, precision="fp32", progress=False)
    head_opts = dict(head="dense", epochs=args.head_epochs, lr=1e-4, units=256)
    rows, timings = [], {}

    def fresh(name):
        path = work / name
        shutil.rmtree(path, ignore_errors=True)
        return str(path)

    t = time.perf_counter()
    plain = extract(str(images), store, pooling="avg", **common)
    timings["extract_plain"] = time.perf_counter() - t
    r = train(store, plain["feature_set"], out=fresh("head"), **head_opts)
    rows.append(("head only (dense, avg pooled)", r["validation"]["accuracy"], r["test"]["accuracy"], r["seconds"],
                 f"{args.head_epochs} epochs; extraction {timings['extract_plain']:.0f} s"))

    t = time.perf_counter()
    aug = extract(str(images), store, pooling="avg", augment=args.views, aug_seed=0, **common)
    timings["extract_aug"] = time.perf_counter() - t
    r = train(store, aug["feature_set"], out=fresh("head_aug"), **head_opts)
    rows.append((f"head + cached augmentation (K={args.views})", r["validation"]["accuracy"], r["test"]["accuracy"],
                 r["seconds"], f"{args.head_epochs} epochs; extraction incl. views {timings['extract_aug']:.0f} s"))

    t = time.perf_counter()
    extract(str(images), store, layer=get_backbone("mobilenet_v2").boundary_layer, **common)
    timings["extract_boundary"] = time.perf_counter() - t
    ft_opts = dict(lr=1e-5, epochs=args.ft_epochs, batch_size=20)
    rc = finetune(None, str(work / "head"), fresh("ft_cache"), from_cache=store, **ft_opts)
    ri = finetune(str(images), str(work / "head"), fresh("ft_images"), **ft_opts)
    for label, r, extra in (("fine-tuned from images", ri, f"decode {ri['data_seconds']:.0f} s"),
                            ("fine-tuned from cache (block_15_add)", rc,
                             f"boundary extraction {timings['extract_boundary']:.0f} s")):
        per_epoch = sum(r["epoch_seconds"]) / len(r["epoch_seconds"])
        rows.append((label, r["validation"]["accuracy"], r["test"]["accuracy"], r["seconds"],
                     f"{args.ft_epochs} epochs, {per_epoch:.1f} s/epoch; {extra}"))
    speedup = (sum(ri["epoch_seconds"]) / len(ri["epoch_seconds"])) / (sum(rc["epoch_seconds"]) / len(rc["epoch_seconds"]))
    load = os.getloadavg()[0]
    result = {"images": str(images), "rows": rows, "epoch_speedup_cache_vs_images": speedup, "load_avg": load,
              "timings": timings}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"| run | validation acc | test acc | train seconds | notes |\n|---|---|---|---|---|")
    for label, va, te, sec, note in rows:
        print(f"| {label} | {va:.4f} | {te:.4f} | {sec:.1f} | {note} |")
    print(f"\nfine-tune epoch from cache is {speedup:.1f}x faster than from images; load average {load:.2f}")


if __name__ == "__main__":
    main()
