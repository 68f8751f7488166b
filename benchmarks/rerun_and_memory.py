#!/usr/bin/env python
"""The other extraction figures: unchanged re-run cost, flat memory, head training seconds.

1. Re-run: ``featcache extract`` (the command line, in a subprocess) on 2,000 synthetic
   500x375 JPEGs, cold into a fresh store, then twice more unchanged. Prints the seconds,
   the re-run/cold ratio (target <= 3%) and the hashing throughput in MB/s.
2. Memory: the same command on 1,000 and on 8,000 such images (fresh stores), each in its own
   subprocess; its peak RSS (ru_maxrss from os.wait4, in a small wrapper process). Target: 8,000 within 200 MB of 1,000.
3. Heads: `featcache.classify` trained on the re-run's store (Keras dense head at batch 20 and
   128, logistic regression), seconds as the harness reports them.

The JPEGs are generated once into --jpeg-dir (default /tmp/featcache-bench-jpegs-500x375) and
reused. Examples:
  python benchmarks/rerun_and_memory.py                      # all three, vgg16 / mobilenet_0.25
  python benchmarks/rerun_and_memory.py --skip-memory --rerun-base mobilenet_v2 \\
      --rerun-weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

CLASSES = ("cats", "dogs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jpeg-dir", default="/tmp/featcache-bench-jpegs-500x375")
    p.add_argument("--rerun-images", type=int, default=2000)
    p.add_argument("--rerun-base", default="vgg16")
    p.add_argument("--rerun-weights", default="none")
    p.add_argument("--precision", default="auto")
    p.add_argument("--memory-images", default="1000,8000", help="comma-separated image counts")
    p.add_argument("--memory-base", default="mobilenet_0.25")
    p.add_argument("--memory-weights", default="none")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--skip-rerun", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--skip-heads", action="store_true")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


_BACKGROUNDS: list = []


def _background(i: int):
    """One of 32 textured 500x375 backgrounds (noise, blurred): made once, shared by many images."""
    from PIL import Image, ImageFilter

    while len(_BACKGROUNDS) <= i % 32:
        rng = np.random.default_rng(10_000 + len(_BACKGROUNDS))
        yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
        angle = rng.uniform(0, np.pi)
        ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / 875.0
        img = 150 * (0.6 + 0.6 * ramp[..., None]) + rng.normal(0, 18, (375, 500, 3)).astype(np.float32)
        _BACKGROUNDS.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)))
    return _BACKGROUNDS[i % 32]


def synthetic_jpeg(rng: np.random.Generator, label: int, index: int) -> bytes:
    """A 500x375 photo-like JPEG (textured background, class-tinted shapes; ~30-40 KB at quality 90)."""
    import io

    from PIL import Image, ImageDraw

    tint = Image.new("RGB", (500, 375), [(200, 120, 80), (80, 130, 200)][label])
    pil = Image.blend(_background(index), tint, 0.35)
    draw = ImageDraw.Draw(pil)
    for _ in range(12):
        x0, y0 = rng.integers(0, 460), rng.integers(0, 335)
        box = (int(x0), int(y0), int(x0 + rng.integers(20, 200)), int(y0 + rng.integers(20, 150)))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    draw.text((5, 5), f"{label}-{index}", fill=(255, 255, 255))  # every file distinct
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_jpeg(item) -> None:
    i, path = item
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(synthetic_jpeg(np.random.default_rng(i), i % 2, i))
    tmp.replace(path)


def ensure_jpegs(root: pathlib.Path, count: int) -> list[pathlib.Path]:
    """``count`` JPEGs under root/<class>/, generated once (deterministic) and reused."""
    from concurrent.futures import ThreadPoolExecutor

    files = [root / CLASSES[i % 2] / f"{CLASSES[i % 2]}.{i // 2:05d}.jpg" for i in range(count)]
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    todo = [(i, f) for i, f in enumerate(files) if not f.exists()]
    _background(31)  # before the threads
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # Pillow releases the GIL while encoding
        list(pool.map(_write_jpeg, todo))
    return files


def linked_tree(files: list[pathlib.Path], dest: pathlib.Path) -> pathlib.Path:
    """A class-per-folder tree of hard links (regular files to featcache, no copying)."""
    for f in files:
        (dest / f.parent.name).mkdir(parents=True, exist_ok=True)
        os.link(f, dest / f.parent.name / f.name)
    return dest


# Linux counts the parent's resident memory at fork() in a child's ru_maxrss (exec records the
# old address space's high-water mark), so a child forked from this process, which holds
# TensorFlow after training heads, would report this process's peak. A small Python process
# in between starts the measured command and reports that grandchild's own peak.
_RSS_WRAPPER = ("import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, s, u = os.wait4(p.pid, 0); "
                "open(sys.argv[1], 'w').write(str(u.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(s))")


def run_cli(*args, peak_rss: bool = False) -> tuple[dict, float, float | None]:
    """featcache extract in a subprocess: (its JSON, wall seconds, peak RSS in MB or None)."""
    cmd = [sys.executable, "-m", "featcache", "extract", *map(str, args), "--json", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryDirectory() as tmp:
        rss_file = os.path.join(tmp, "maxrss")
        if peak_rss:
            cmd = [sys.executable, "-c", _RSS_WRAPPER, rss_file, *cmd]
        with open(os.path.join(tmp, "out"), "w+b") as out, open(os.path.join(tmp, "err"), "w+b") as err:
            started = time.perf_counter()
            code = subprocess.run(cmd, stdout=out, stderr=err, env=env).returncode
            seconds = time.perf_counter() - started
            out.seek(0)
            err.seek(0)
            text, errors = out.read().decode(), err.read().decode()
        if code != 0:
            raise SystemExit(f"featcache extract failed ({code}):\n{errors[-3000:]}")
        peak = int(open(rss_file).read()) / 1024 if peak_rss else None  # Linux: ru_maxrss in KiB
    return json.loads(text), seconds, peak


def rerun(args, files, work) -> dict:
    tree = linked_tree(files[: args.rerun_images], work / "rerun")
    store = work / "rerun.h5"
    size_mb = sum(f.stat().st_size for f in files[: args.rerun_images]) / 1e6
    common = ["--base", args.rerun_base, "--weights", args.rerun_weights, "--precision", args.precision,
              "--batch-size", args.batch_size]
    cold, cold_s, _ = run_cli(tree, store, *common)
    print(f"cold: {cold['extracted']} images in {cold_s:.1f} s ({cold['extracted'] / cold_s:.1f} images/s "
          f"end to end, {cold['images_per_second']:.1f} in the extraction loop)")
    warm = []
    for i in range(2):
        result, seconds, _ = run_cli(tree, store, *common)
        assert result["extracted"] == 0 and result["reused"] == len(files[: args.rerun_images]), result
        mbps = size_mb / result["hash_seconds"] if result["hash_seconds"] else float("inf")
        warm.append({"seconds": seconds, "in_process_seconds": result["seconds"], "hash_seconds": result["hash_seconds"],
                     "hash_mb_per_s": mbps, "ratio": seconds / cold_s})
        print(f"unchanged re-run {i + 1}: {seconds:.2f} s = {100 * seconds / cold_s:.2f}% of cold (target <= 3%); "
              f"inside featcache {result['seconds']:.2f} s; hashing {size_mb:.0f} MB in {result['hash_seconds']:.3f} s "
              f"= {mbps:.0f} MB/s")
    return {"images": args.rerun_images, "megabytes": size_mb, "cold_seconds": cold_s, "feature_set": cold["feature_set"],
            "store": str(store), "reruns": warm}


def memory(args, files, work) -> dict:
    out = {}
    for count in [int(c) for c in args.memory_images.split(",")]:
        tree = linked_tree(files[:count], work / f"mem{count}")
        result, seconds, peak = run_cli(tree, work / f"mem{count}.h5", "--base", args.memory_base,
                                        "--weights", args.memory_weights, "--batch-size", args.batch_size,
                                        peak_rss=True)
        out[count] = {"peak_rss_mb": peak, "seconds": seconds, "images_per_second": result["images_per_second"]}
        print(f"memory: {count} images, peak RSS {peak:.1f} MB ({seconds:.1f} s, "
              f"{result['images_per_second']:.0f} images/s in the loop)")
    counts = sorted(out)
    if len(counts) > 1:
        delta = out[counts[-1]]["peak_rss_mb"] - out[counts[0]]["peak_rss_mb"]
        print(f"memory: {counts[-1]} vs {counts[0]} images: {delta:+.1f} MB (target <= 200 MB)")
    return out


def heads(store: str) -> dict:
    try:
        from featcache.classify.train.harness import train
    except ImportError as exc:
        print(f"heads: skipped (featcache.classify not importable: {exc})")
        return {}
    out = {}
    for name, head, options in (("dense, batch 20, 30 epochs", "dense", {}),
                                ("dense, batch 128, 30 epochs", "dense", {"batch_size": 128}),
                                ("logreg (lbfgs)", "logreg", {})):
        summary = train(store, head=head, **options)
        out[name] = {"seconds": summary["seconds"], "validation_accuracy": summary["validation"]["accuracy"]}
        print(f"head {name}: {summary['seconds']:.2f} s to train "
              f"(validation accuracy {summary['validation']['accuracy']:.3f} on synthetic images)")
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    print(f"rerun_and_memory: load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores")
    needed = max([args.rerun_images * (not args.skip_rerun)]
                 + [int(c) for c in args.memory_images.split(",")] * (not args.skip_memory))
    started = time.perf_counter()
    files = ensure_jpegs(pathlib.Path(args.jpeg_dir), needed)
    print(f"{needed} synthetic 500x375 JPEGs ready in {args.jpeg_dir} ({time.perf_counter() - started:.1f} s)")
    work = pathlib.Path(tempfile.mkdtemp(prefix="featcache-rerun-"))
    results: dict = {"load_average": os.getloadavg()[0]}
    try:
        if not args.skip_rerun:
            results["rerun"] = rerun(args, files, work)
            if not args.skip_heads:
                results["heads"] = heads(results["rerun"]["store"])
        if not args.skip_memory:
            results["memory"] = memory(args, files, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
