"""Stage three on cats vs dogs, MobileNetV2@160 (real ImageNet weights): head only, head with
cached augmentation, fine-tuned from images, fine-tuned from cached boundary activations.

    python benchmarks/finetune.py [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-finetune] [--per-class-train N] [--per-class-eval N]
        [--head-epochs 10] [--ft-epochs 3] [--views 2] [--json]
    python benchmarks/finetune.py --compare-augment [--aug-epochs 5] [--with-finetune-augment] ...

--compare-augment runs only the comparison of issue 4: the dense head on cached augmented views
(extract --augment K, then train) against end-to-end augmented training of the same head (frozen
base, featcache's augmentation layers applied on the fly to decoded images, plain keras fit), the
same epochs, lr and batch; --with-finetune-augment adds `featcache finetune --augment` from images
(top block unfrozen, from a plain head) for reference. Seconds per epoch include the per-epoch
validation pass in every row.

With --per-class-* the split folders are subsampled (the first N files per class, copied into
WORKDIR/images) so the whole run fits a 2-core machine; 0 = all files. Seconds are wall clock
on whatever else the machine is doing (the load average is printed).
"""
from __future__ import annotations

import argparse
import functools
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


def workspace(args):
    """(work folder, image folder (a subset if asked), store path, extract options) of both modes."""
    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    images = pathlib.Path(args.data)
    if args.per_class_train or args.per_class_eval:
        images = subset(images, work / "images", args.per_class_train, args.per_class_eval)
    common = dict(base="mobilenet_v2", size=160, weights=args.weights, precision="fp32", progress=False)
    return work, images, str(work / "store.h5"), common


def fresh_dir(work: pathlib.Path, name: str) -> str:
    """An empty run folder under ``work`` (a previous run of the same name is removed)."""
    path = work / name
    shutil.rmtree(path, ignore_errors=True)
    return str(path)


def extract_plain(images, store: str, common: dict, timings: dict) -> dict:
    """The avg-pooled plain feature set both modes start from, timed into ``timings``."""
    from featcache.extract.pipeline import extract

    t = time.perf_counter()
    plain = extract(str(images), store, pooling="avg", **common)
    timings["extract_plain"] = time.perf_counter() - t
    return plain


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
    ap.add_argument("--compare-augment", action="store_true",
                    help="only: cached augmentation vs end-to-end augmented training (issue 4)")
    ap.add_argument("--aug-epochs", type=int, default=5, help="epochs of both runs of --compare-augment")
    ap.add_argument("--with-finetune-augment", action="store_true",
                    help="--compare-augment: also run finetune --augment from images (slow)")
    args = ap.parse_args()
    if args.compare_augment:
        return compare_augment(args)

    from featcache.classify.train.finetune import finetune
    from featcache.classify.train.harness import train
    from featcache.extract.bases.backbones import get_backbone
    from featcache.extract.pipeline import extract

    work, images, store, common = workspace(args)
    head_opts = dict(head="dense", epochs=args.head_epochs, lr=1e-4, units=256)
    rows, timings = [], {}

    fresh = functools.partial(fresh_dir, work)
    plain = extract_plain(images, store, common, timings)
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
    print("| run | validation acc | test acc | train seconds | notes |\n|---|---|---|---|---|")
    for label, va, te, sec, note in rows:
        print(f"| {label} | {va:.4f} | {te:.4f} | {sec:.1f} | {note} |")
    print(f"\nfine-tune epoch from cache is {speedup:.1f}x faster than from images; load average {load:.2f}")


def _epoch_timer():
    """Keras callback: wall seconds of each epoch, and of its training part (before validation)."""
    import keras

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.seconds, self.train_seconds, self._in_epoch = [], [], False

        def on_epoch_begin(self, epoch, logs=None):
            self._t, self._in_epoch = time.perf_counter(), True

        def on_test_begin(self, logs=None):
            if self._in_epoch:  # fit's validation pass
                self.train_seconds.append(time.perf_counter() - self._t)

        def on_epoch_end(self, epoch, logs=None):
            self.seconds.append(time.perf_counter() - self._t)
            self._in_epoch = False

    return Timer()


def end_to_end_augmented(images: str, store: str, plain_set: str, weights: str, recipe: dict, aug_seed: int,
                         head_opts: dict, size: int = 160) -> dict:
    """The dense head trained end to end on decoded images: featcache's augmentation layers
    (training only) -> preprocessing -> frozen base (featcache's build path, as extraction
    builds it) -> avg pooling -> the same dense head (same init seed), plain keras fit."""
    import keras

    from featcache.cache.store import open_store
    from featcache.classify import evaluation as reports
    from featcache.classify.graph.build import preprocessing
    from featcache.classify.train.finetune import _decode_all, _proba
    from featcache.classify.heads.registry import make_head
    from featcache.extract.images.augment import make_layers
    from featcache.extract.bases.backbones import get_backbone
    from featcache.extract.bases.feature_model import build_frozen_base
    from featcache.extract.bases.weights import resolve_weights

    import numpy as np

    # The rows (paths, labels, splits) of the plain feature set: the same images as the cached run.
    with open_store(store) as s:
        fs = s[plain_set]
        rows = fs.rows()
        paths, labels = fs.column("paths")[rows], fs.column("labels")[rows].astype(np.int64)
        splits, names, spec = fs.column("splits")[rows], fs.class_names, fs.spec
    splits = np.array([x.decode() if isinstance(x, bytes) else str(x) for x in splits])
    paths = [x.decode() if isinstance(x, bytes) else str(x) for x in paths]
    t = time.perf_counter()
    x = _decode_all(images, paths, size, spec.resize)
    decode_seconds = time.perf_counter() - t

    backbone = get_backbone("mobilenet_v2")
    base = build_frozen_base(backbone, size, resolve_weights(backbone, weights, 0, size), None, "fp32", 0)
    head = make_head("dense", **head_opts)
    head.build(len(names), (int(base.output.shape[-1]),))  # seeds and initialises like the cached run
    inputs = keras.Input((size, size, 3), name="image")
    h = inputs
    for layer in make_layers(recipe, aug_seed):  # active in training only
        h = layer(h)
    h = preprocessing(keras, h, spec.preprocessing)
    h = keras.layers.GlobalAveragePooling2D(name="feature_pool")(base(h, training=False))
    model = keras.Model(inputs, head.model(h), name="end_to_end_augmented")
    c = head.config
    binary = len(names) == 2
    model.compile(optimizer=keras.optimizers.RMSprop(learning_rate=c["lr"]),
                  loss="binary_crossentropy" if binary else "sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=c["steps_per_execution"])
    part = {sp: np.flatnonzero(splits == sp) for sp in ("train", "validation", "test")}
    y = labels.astype(np.float32 if binary else np.int32)
    timer = _epoch_timer()
    t = time.perf_counter()
    model.fit(x[part["train"]], y[part["train"]], batch_size=c["batch_size"], epochs=c["epochs"], shuffle=True,
              validation_data=(x[part["validation"]], y[part["validation"]]),
              validation_batch_size=max(c["batch_size"], 256), callbacks=[timer], verbose=0)
    fit_seconds = time.perf_counter() - t
    acc = {sp: reports.metrics(labels[i], _proba(model, x[i], binary), names)["accuracy"]
           for sp, i in part.items() if len(i)}
    return {"validation": {"accuracy": acc.get("validation")}, "test": {"accuracy": acc.get("test")},
            "seconds": fit_seconds, "epoch_seconds": timer.seconds, "epoch_train_seconds": timer.train_seconds,
            "decode_seconds": decode_seconds, "n_train": int(len(part["train"]))}


def compare_augment(args):
    """Issue 4: cached augmentation vs end-to-end augmented training (and, optionally,
    finetune --augment from images), the same epochs, lr and batch."""
    import json as _json

    from featcache.classify.train.finetune import finetune
    from featcache.classify.train.harness import train
    from featcache.extract.pipeline import extract

    work, images, store, common = workspace(args)
    epochs = args.aug_epochs
    head_opts = dict(head="dense", epochs=epochs, lr=1e-4, units=256)
    rows, timings = [], {}

    fresh = functools.partial(fresh_dir, work)  # own names: the other mode's run directories are left alone
    plain = extract_plain(images, store, common, timings)
    t = time.perf_counter()
    aug = extract(str(images), store, pooling="avg", augment=args.views, aug_seed=0, **common)
    timings["extract_aug"] = time.perf_counter() - t
    recipe = aug["augment"]["recipe"]

    r = train(store, aug["feature_set"], out=fresh("cmp_head_aug"), **head_opts)
    rows.append({"method": f"dense head, cached augmentation (K={args.views})", "epochs": epochs,
                 "s_per_epoch": r["seconds"] / epochs, "total_s": r["seconds"],
                 "val_acc": r["validation"]["accuracy"], "test_acc": r["test"]["accuracy"],
                 "note": f"extraction incl. views {timings['extract_aug']:.0f} s this run "
                         f"({aug['extracted']} rows + {aug['views_extracted']} views extracted now, rest reused)"})

    head_only = {k: v for k, v in head_opts.items() if k != "head"}
    e = end_to_end_augmented(str(images), store, plain["feature_set"], args.weights, recipe, 0, head_only)
    train_part = (f", training part {sum(e['epoch_train_seconds']) / len(e['epoch_train_seconds']):.1f} s/epoch"
                  if e["epoch_train_seconds"] else "")
    rows.append({"method": "dense head, end-to-end augmented (frozen base, on-the-fly layers)", "epochs": epochs,
                 "s_per_epoch": sum(e["epoch_seconds"]) / len(e["epoch_seconds"]), "total_s": e["seconds"],
                 "val_acc": e["validation"]["accuracy"], "test_acc": e["test"]["accuracy"],
                 "note": f"epochs {', '.join(f'{s:.1f}' for s in e['epoch_seconds'])} s{train_part}; "
                         f"decode {e['decode_seconds']:.0f} s"})

    if args.with_finetune_augment:
        stage_two = fresh("cmp_head")
        train(store, plain["feature_set"], out=stage_two, **{**head_opts, "epochs": args.head_epochs})
        f = finetune(str(images), stage_two, fresh("cmp_ft_aug"), lr=1e-5, epochs=epochs, batch_size=20,
                     augment="all", aug_seed=0)
        rows.append({"method": "finetune --augment from images (top block, lr 1e-5)", "epochs": epochs,
                     "s_per_epoch": sum(f["epoch_seconds"]) / len(f["epoch_seconds"]), "total_s": f["seconds"],
                     "val_acc": f["validation"]["accuracy"], "test_acc": f["test"]["accuracy"],
                     "note": f"from a plain head trained {args.head_epochs} epochs; decode {f['data_seconds']:.0f} s"})

    load = os.getloadavg()
    result = {"images": str(images), "n_train": e["n_train"], "rows": rows, "load_avg": load, "timings": timings,
              "speedup_per_epoch": rows[1]["s_per_epoch"] / rows[0]["s_per_epoch"]}
    if args.json:
        print(_json.dumps(result, indent=2))
        return
    print("| method | epochs | s/epoch | total s | val acc | test acc | notes |\n|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['epochs']} | {row['s_per_epoch']:.2f} | {row['total_s']:.1f} | "
              f"{row['val_acc']:.4f} | {row['test_acc']:.4f} | {row['note']} |")
    print(f"\n{e['n_train']} training images; an epoch on cached views is {result['speedup_per_epoch']:.0f}x faster "
          f"than end to end; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
