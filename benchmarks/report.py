"""How long `featcache report` takes on a large split (target: a 4,000-row feature set's report
in under 30 s on 2 cores).

    python benchmarks/report.py [--workdir /tmp/featcache-report-bench] [--rows 4000] [--dims 1280]
        [--real] [--data ../shared/data/cats_vs_dogs_small_max256]
        [--weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5] [--json FILE]

synthetic (always): a logreg run on a feature set whose *test split alone* has --rows rows of
--dims float32 features (harder than the target: the map is drawn over the whole split), made
from generated 96x80 JPEGs (features: the pixels base at the size giving about --dims numbers,
so the run is a real run with real files and thumbnails); 5% of the test files are moved into
the other class's folder, so there are mistakes to show.

--real: cats vs dogs (2,000/1,000/1,000 photos), MobileNetV2@160 avg-pooled features with the
shared ImageNet weights, a logreg run, reports of its test split and (--split train) of its
2,000 training images. Extraction is not timed.

Prints the report's stages (per-image predictions, thumbnails, map, plots), wall and CPU
seconds (all threads) and the load average around each report: on a shared machine, wall
seconds follow the CPU share the other processes leave, CPU seconds do not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
TARGET_SECONDS = 30.0


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def synthetic_tree(root: pathlib.Path, rows: int, seed: int = 0) -> pathlib.Path:
    """train 400/class, validation 100/class, test rows/2 per class; 5% of test files moved."""
    import numpy as np
    from PIL import Image

    if (root / ".complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    colours = np.array([(200, 60, 50), (50, 90, 200)], np.float64)
    for split, per_class in (("train", 400), ("validation", 100), ("test", rows // 2)):
        for label, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                # colour overlaps between classes: a linear head makes some honest mistakes too
                base = colours[label] * 0.6 + colours[1 - label] * 0.4 * rng.uniform(0, 1)
                img = base + rng.normal(0, 40, (80, 96, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{name}.{i:05d}.jpg", quality=85)
    moved = 0
    for label, (src, dst) in enumerate((("red", "blue"), ("blue", "red"))):
        files = sorted((root / "test" / src).iterdir())
        for path in files[: len(files) // 20]:
            os.replace(path, root / "test" / dst / f"moved-{path.name}")
            moved += 1
    (root / ".complete").write_text(f"{moved} moved\n")
    return root


def timed_report(run_dir: str, split: str | None, label: str) -> dict:
    from featcache.classify.report.run_page import write_report

    before = load()
    wall, cpu = time.perf_counter(), time.process_time()
    result = write_report(run_dir, os.path.join(run_dir, f"report-{split or 'default'}.html"), split)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    row = {"case": label, "split": result["split"], "images": result["images"], "map_points": result["map_points"],
           "mistakes": result["mistakes"], "thumbnails": result["mistake_thumbnails"] + result["right_thumbnails"],
           "stages": result["stage_seconds"], "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
           "bytes": result["bytes"], "load_before": before, "load_after": load()}
    stages = ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items())
    print(f"{label}: {result['split']} split, {result['images']} images, {result['mistakes']} mistakes, "
          f"map {result['map_points']} points; {row['wall_seconds']:.1f} s wall ({stages}), "
          f"{row['cpu_seconds']:.1f} CPU s; {wall / TARGET_SECONDS:.2f} x the {TARGET_SECONDS:.0f} s target; "
          f"{result['bytes'] / 2**20:.2f} MiB; load {before} -> {row['load_after']}", flush=True)
    return row


def run_synthetic(workdir: pathlib.Path, rows: int, dims: int) -> list[dict]:
    from featcache.classify.train.harness import train
    from featcache.extract.pipeline import extract

    tree = synthetic_tree(workdir / f"images-{rows}", rows)
    size = max(2, round(math.sqrt(dims / 3)))  # the pixels base: size x size x 3 numbers
    store = workdir / f"synthetic-{rows}.h5"
    fs = extract(str(tree), str(store), base="pixels", size=size, progress=False)
    run_dir = workdir / f"run-synthetic-{rows}"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(str(store), fs["feature_set"], head="logreg", out=str(run_dir), report=False)
    print(f"synthetic: {fs['shape'][0]} rows of {fs['shape'][1:]} = {int(math.prod(fs['shape'][1:]))} features "
          f"(float32) in {store}", flush=True)
    return [timed_report(str(run_dir), "test", f"synthetic {rows} x {int(math.prod(fs['shape'][1:]))}")]


def run_real(workdir: pathlib.Path, data: str, weights: str) -> list[dict]:
    from featcache.classify.train.harness import train
    from featcache.extract.pipeline import extract

    store = workdir / "cats_dogs_mobilenet_v2.h5"
    started = time.perf_counter()
    fs = extract(data, str(store), base="mobilenet_v2", size=160, weights=weights, pooling="avg",
                 precision="fp32", progress=False)
    print(f"real: {fs['shape']} extracted {fs['extracted']}, reused {fs['reused']} in "
          f"{time.perf_counter() - started:.0f} s (not part of the report)", flush=True)
    run_dir = workdir / "run-cats-dogs"
    shutil.rmtree(run_dir, ignore_errors=True)
    train(str(store), fs["feature_set"], head="logreg", out=str(run_dir), report=False)
    return [timed_report(str(run_dir), split, f"cats vs dogs mobilenet_v2@160 avg ({fs['shape'][0]} rows)")
            for split in ("test", "train")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/featcache-report-bench")
    parser.add_argument("--rows", type=int, default=4000, help="test rows of the synthetic feature set")
    parser.add_argument("--dims", type=int, default=1280)
    parser.add_argument("--real", action="store_true")
    parser.add_argument("--data", default=str(SHARED / "data" / "cats_vs_dogs_small_max256"))
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5"))
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores visible; load {load()}", flush=True)
    results = run_synthetic(workdir, args.rows, args.dims)
    if args.real:
        results += run_real(workdir, args.data, args.weights)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
