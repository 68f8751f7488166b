"""Deployment formats on cats vs dogs: file size, test accuracy and fidelity of each export.

    python benchmarks/deploy.py [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5]
        [--workdir /tmp/featcache-deploy] [--heads dense,logreg] [--calibration-images 300] [--json FILE]

Extracts MobileNetV2@160 features (avg-pooled; real ImageNet weights) of the 2,000 / 1,000 /
1,000 images once into WORKDIR/store.h5 (a rerun reuses them), trains each head, exports it as
.keras, .tflite (float, float16, int8) and a SavedModel with `featcache export`, then runs
every exported file over the 1,000 test images the way a deployment runs it (LiteRT
interpreter, the SavedModel's serving_default, Keras) and compares it with featcache's own
probabilities (the head on the cached test features: what `featcache predict` computes):
test accuracy, top-1 agreement, max and mean |probability difference|. The SavedModel's
serving_bytes signature (JPEG bytes decoded and resized inside the graph) is compared too,
and its decoded pixels against extract's Pillow decoding. Seconds are wall clock on a shared
machine; the load average is printed beside them.
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

import numpy as np  # noqa: E402

EXPORTS = [  # (name, file name, export options)
    ("keras", "model.keras", {}),
    ("tflite float32", "model.tflite", {}),
    ("tflite float16", "model_f16.tflite", {"quantize": "float16"}),
    ("tflite int8", "model_int8.tflite", {"quantize": "int8"}),
    ("savedmodel", "savedmodel", {}),
]


def _compare(p: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict:
    diff = np.abs(p - reference)
    return {"accuracy": float(np.mean(p.argmax(1) == labels)),
            "top1_agreement": float(np.mean(p.argmax(1) == reference.argmax(1))),
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean())}


def _batched(predict, images, batch=32):
    return np.concatenate([predict(images[i : i + batch]) for i in range(0, len(images), batch)])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    parser.add_argument("--workdir", default="/tmp/featcache-deploy")
    parser.add_argument("--heads", default="dense,logreg", help="Comma-separated heads [dense,logreg].")
    parser.add_argument("--calibration-images", type=int, default=300)
    parser.add_argument("--json", help="Also write the results to this JSON file.")
    args = parser.parse_args(argv)

    import tensorflow as tf

    from featcache import open_store
    from featcache.classify.deploy import run_exported as deployed
    from featcache.classify.runs import run_dir as rundir
    from featcache.classify.deploy.savedmodel import decode_in_graph
    from featcache.classify.deploy.export import export
    from featcache.classify.train.harness import train
    from featcache.extract.images.decode import decode_image, read_bytes
    from featcache.extract.pipeline import ExtractConfig, extract

    work = pathlib.Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = str(work / "store.h5")
    size = 160
    result = extract(args.data, store, ExtractConfig(base="mobilenet_v2", size=size, weights=args.weights,
                                                     pooling="avg", progress=False))
    fs_name = result["feature_set"]
    print(f"extract: {fs_name}, extracted {result['extracted']}, reused {result['reused']}, {result['seconds']:.1f} s",
          flush=True)
    with open_store(store) as s:
        fs = s[fs_name]
        rows = fs.rows("test")
        paths = [os.path.join(args.data, p) for p in fs.column("paths")[rows]]
        features, labels = fs.read(rows), fs.column("labels")[rows].astype(np.int64)
    t0 = time.perf_counter()
    images = np.stack([decode_image(read_bytes(p), size) for p in paths])
    encoded = [read_bytes(p) for p in paths]
    print(f"decoded {len(paths)} test images in {time.perf_counter() - t0:.1f} s", flush=True)

    out_dir = work / "exports"
    shutil.rmtree(out_dir, ignore_errors=True)  # exports are never overwritten: start clean
    shutil.rmtree(work / "runs", ignore_errors=True)
    out_dir.mkdir()
    report = {"feature_set": fs_name, "test_images": len(paths), "heads": {}}
    for head in [h for h in args.heads.split(",") if h]:
        run = str(work / "runs" / head)
        options = {"pool": "avg"} if head == "dense" else {}
        summary = train(store, fs_name, head=head, out=run, **options)
        _, trained = rundir.load_head(run)
        reference = trained.predict_proba(features)  # featcache predict's probabilities
        print(f"\n{head}: run test accuracy {summary['test']['accuracy']:.4f} (load {os.getloadavg()[0]:.1f})", flush=True)
        rows_out = []
        for name, file, opts in EXPORTS:
            target = out_dir / f"{head}_{file}"
            if "quantize" in opts and opts["quantize"] == "int8":
                opts = {**opts, "calibration_images_count": args.calibration_images}
            t0 = time.perf_counter()
            info = export(run, str(target), evaluate=False, **opts)
            export_seconds = time.perf_counter() - t0
            fmt = info["format"]
            runner = deployed.load_runner(str(target), fmt)
            t0 = time.perf_counter()
            p = _batched(runner.predict_proba, images)
            run_seconds = time.perf_counter() - t0
            row = {"format": name, "bytes": info["bytes"], **_compare(p, reference, labels),
                   "export_seconds": round(export_seconds, 1), "test_pass_seconds": round(run_seconds, 1),
                   "load": round(os.getloadavg()[0], 1)}
            rows_out.append(row)
            if fmt == "savedmodel":
                serve = runner.loaded.signatures["serving_bytes"]
                t0 = time.perf_counter()
                q = _batched(lambda batch: serve(image_bytes=tf.constant(batch))["probabilities"].numpy(), encoded)
                rows_out.append({"format": "savedmodel serving_bytes (JPEG in)", "bytes": info["bytes"],
                                 **_compare(np.asarray(q, np.float64), reference, labels),
                                 "export_seconds": None, "test_pass_seconds": round(time.perf_counter() - t0, 1),
                                 "load": round(os.getloadavg()[0], 1)})
            print(f"  {rows_out[-1]['format']} done", flush=True)
        report["heads"][head] = {"run_test_accuracy": summary["test"]["accuracy"], "exports": rows_out}
        print(f"\n| {head} head: format | size | test accuracy | top-1 agreement with predict | max abs diff | "
              "mean abs diff | export s | 1,000-image pass s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows_out:
            print(f"| {r['format']} | {r['bytes'] / 2**20:.2f} MiB | {r['accuracy']:.4f} | {r['top1_agreement']:.4f} | "
                  f"{r['max_abs_diff']:.2g} | {r['mean_abs_diff']:.2g} | {r['export_seconds'] or '-'} | "
                  f"{r['test_pass_seconds']} |")

    # The in-graph decoder against Pillow, pixel by pixel (bilinear at 160).
    decode = tf.function(lambda data: decode_in_graph(data, size, "bilinear"))
    diffs = np.concatenate([np.abs(decode(tf.constant(d)).numpy().astype(int) - img.astype(int)).ravel()
                            for d, img in zip(encoded, images)])
    report["decoding"] = {"max": int(diffs.max()), "mean": float(diffs.mean()), "share_differing": float((diffs > 0).mean())}
    print(f"\nserving_bytes decoding vs Pillow (bilinear, {len(encoded)} JPEGs): max {diffs.max()} levels, "
          f"mean {diffs.mean():.3f}, {100 * (diffs > 0).mean():.1f}% of values differ")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
