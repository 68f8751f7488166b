#!/usr/bin/env python
"""Extraction speed: featcache extract against the model alone and against the classic loop.

On the same N images, in one process:

  (a) model alone: featcache's own compiled step (FeatureModel: uint8 -> features, the
      tf.function featcache runs) on pre-decoded batches, warm;
  (b) ``featcache extract`` end to end into a fresh HDF5 store, through the Python API:
      discovery, hashing, building the model, decoding, inference, appends and commits are
      all inside the timing;
  (c) the classic hand-written loop: ``ImageDataGenerator(preprocessing_function=
      preprocess_input).flow_from_directory(target_size, batch_size, class_mode="binary",
      shuffle=False)`` + ``conv_base.predict`` per batch into a preallocated array, with a
      plain keras.applications base built under the same Keras dtype policy (inside the timing).

Prints images/s for each, the CPU cores the process kept busy, and b/a (target >= 0.90) and
b/c (target >= 1.0). ``--n 0`` (default) picks N so that (a) takes about ``--seconds``.

Examples:
  python benchmarks/extract_speed.py --base vgg16 --size 150 --weights none --precision bf16
  python benchmarks/extract_speed.py --base mobilenet_v2 --size 160 \\
      --weights ../shared/weights/mobilenet_v2_1.0_224_coralquant_dequant_no_top.h5
  # on a GPU box: decode on every core, XLA
  python benchmarks/extract_speed.py --decode-workers all --xla --precision auto
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DEFAULT_IMAGES = pathlib.Path(__file__).resolve().parents[2] / "shared/data/cats_vs_dogs_small_max256"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--image-dir", default=str(DEFAULT_IMAGES),
                   help="a folder of class folders, or of split folders holding them (train first)")
    p.add_argument("--base", default="vgg16")
    p.add_argument("--size", type=int, help="input size [default: the base's default]")
    p.add_argument("--weights", default="none", help="none, imagenet or a .h5 path")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--n", type=int, default=0, help="number of images; 0: enough for --seconds of model time")
    p.add_argument("--seconds", type=float, default=20.0, help="model-alone seconds that --n 0 aims at")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--decode-workers", default=None, help="decode threads: a number or 'all' (every core)")
    p.add_argument("--decode-processes", action="store_true", help="decode in processes, not threads")
    p.add_argument("--decode", default=None, choices=["auto", "threads", "processes", "gpu"],
                   help="featcache's --decode for (b) [default: processes with --decode-processes, else threads]")
    p.add_argument("--resize", default="bilinear")
    p.add_argument("--xla", action="store_true", help="jit_compile the model step (XLA)")
    p.add_argument("--repeat", type=int, default=1, help="run (a), (b), (c) this many times each")
    p.add_argument("--skip-classic", action="store_true")
    p.add_argument("--classic-n", type=int, default=0, help="images for (c) [default: all N]; its rate is per image")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def decode_workers(value) -> int | None:
    if value in (None, "", "auto"):
        return None
    if value in ("all", "all-cores"):
        return os.cpu_count() or 1
    return int(value)


def list_images(root: pathlib.Path) -> list[tuple[str, pathlib.Path]]:
    """(class, path) pairs, classes interleaved, split folders in train, validation, test order."""
    splits = [root / s for s in ("train", "validation", "test") if (root / s).is_dir()] or [root]
    pairs = []
    for split in splits:
        classes = sorted(d for d in split.iterdir() if d.is_dir())
        files = [sorted(f for f in c.iterdir() if f.is_file()) for c in classes]
        for i in range(max(map(len, files), default=0)):
            pairs += [(c.name, fs[i]) for c, fs in zip(classes, files) if i < len(fs)]
    return pairs


def copy_tree(pairs, dest: pathlib.Path) -> pathlib.Path:
    for cls, path in pairs:
        (dest / cls).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest / cls / path.name)
    return dest


class Meter:
    """Wall seconds and CPU seconds (all threads) of a block: cores busy = cpu / wall."""

    def __enter__(self):
        self.wall0, self.cpu0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall0, _cpu() - self.cpu0

    @property
    def cores(self) -> float:
        return self.cpu / self.wall if self.wall else 0.0


def _cpu() -> float:
    """CPU seconds of this process and of its finished children (decoding processes)."""
    return sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))


def device_text() -> str:
    import keras

    from featcache.extract.bases.feature_model import cpu_has_bf16, gpu_compute_capability

    capability = gpu_compute_capability()
    if capability is not None:
        where = f"GPU (compute capability {capability[0]}.{capability[1]})"
    else:
        where = f"CPU ({os.cpu_count()} cores{', AVX512_BF16/AMX' if cpu_has_bf16() else ''})"
    versions = f"Keras {keras.__version__} backend {keras.backend.backend()}"
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        versions = f"TF {tf.__version__} " + versions
    return f"{where}; {versions}"


def model_alone(model, images: np.ndarray, batch_size: int) -> Meter:
    model(images[:batch_size])  # warm: trace, compile, allocate
    model(images[: max(1, len(images) % batch_size or batch_size)])  # and the last batch's shape
    with Meter() as meter:
        for start in range(0, len(images), batch_size):
            model(images[start : start + batch_size])
    return meter


def classic_loop(tree: pathlib.Path, n: int, args, precision: str, out_shape) -> tuple[float, str]:
    """The hand-written loop people write; returns (seconds, what ran)."""
    import importlib

    import keras

    from featcache.extract.bases.backbones import build_keras_base, get_backbone
    from featcache.extract.bases.feature_model import PRECISION_POLICIES
    from featcache.extract.bases.weights import resolve_weights

    backbone = get_backbone(args.base)
    size = args.size or backbone.default_size
    preprocess = importlib.import_module(f"keras.applications.{backbone.module}").preprocess_input
    started = time.perf_counter()
    keras.config.set_dtype_policy(PRECISION_POLICIES[precision])
    try:
        conv_base = build_keras_base(backbone, size, resolve_weights(backbone, args.weights, 0, size).keras_arg)
    finally:
        keras.config.set_dtype_policy("float32")
    features = np.zeros((n, *conv_base.output.shape[1:]), dtype=np.float32)
    labels = np.zeros((n,), dtype=np.float32)
    try:  # Keras 3 keeps the classic class only under its private legacy path
        from keras.src.legacy.preprocessing.image import ImageDataGenerator
    except ImportError:
        ImageDataGenerator = None
    bs = args.batch_size
    if ImageDataGenerator is not None:
        what = "ImageDataGenerator.flow_from_directory + predict"
        generator = ImageDataGenerator(preprocessing_function=preprocess).flow_from_directory(
            str(tree), target_size=(size, size), batch_size=bs, class_mode="binary", shuffle=False)
        i = 0
        for inputs_batch, labels_batch in generator:
            k = len(inputs_batch)
            features[i : i + k] = conv_base.predict(inputs_batch, verbose=0)
            labels[i : i + k] = labels_batch
            i += k
            if i >= n:
                break
    else:
        what = "image_dataset_from_directory + predict (ImageDataGenerator is gone)"
        dataset = keras.utils.image_dataset_from_directory(
            str(tree), image_size=(size, size), batch_size=bs, shuffle=False, label_mode="binary", verbose=False)
        i = 0
        for inputs_batch, labels_batch in dataset:
            k = len(inputs_batch)
            features[i : i + k] = conv_base.predict(preprocess(np.asarray(inputs_batch)), verbose=0)
            labels[i : i + k] = np.asarray(labels_batch)[:, 0]
            i += k
    return time.perf_counter() - started, what


def main(argv=None) -> dict:
    args = parse_args(argv)
    import keras

    from featcache.extract.bases.backbones import get_backbone
    from featcache.extract.images.decode import decode_image
    from featcache.extract.images.feeder import default_workers
    from featcache.extract.bases.feature_model import FeatureModel, resolve_precision
    from featcache.extract.pipeline import ExtractConfig, extract
    from featcache.extract.bases.weights import resolve_weights

    backbone = get_backbone(args.base)
    size = args.size or backbone.default_size
    precision = resolve_precision(args.precision, backbone)
    workers = decode_workers(args.decode_workers)
    decoder = args.decode or ("processes" if args.decode_processes else "threads")
    args.decode_processes = decoder == "processes"
    pool_workers = workers or default_workers(decoder)  # featcache's default

    load = os.getloadavg()[0]
    print(f"extract_speed: base={backbone.name} size={size} weights={args.weights} precision={precision}"
          f"{' (auto)' if args.precision == 'auto' else ''} batch={args.batch_size} decode_workers={pool_workers}"
          f"{' (processes)' if args.decode_processes else ''} xla={args.xla} resize={args.resize}")
    print(f"device: {device_text()}; load average {load:.2f}")

    pairs = list_images(pathlib.Path(args.image_dir))
    if not pairs:
        raise SystemExit(f"{args.image_dir}: no images")
    with Meter() as build:
        model = FeatureModel(backbone, size, resolve_weights(backbone, args.weights, 0, size), None, "none",
                             precision, 0, jit_compile=args.xla)

    def decode(path):
        return decode_image(path.read_bytes(), size, args.resize)

    n = args.n
    if n <= 0:  # time two warm batches to size the run
        probe = np.stack([decode(p) for _, p in pairs[: args.batch_size]])
        model(probe)
        t = time.perf_counter()
        model(probe)
        model(probe)
        rate = 2 * len(probe) / (time.perf_counter() - t)
        n = int(rate * args.seconds) // args.batch_size * args.batch_size + args.batch_size // 2
        n = max(args.batch_size, min(n, len(pairs)))
    pairs = pairs[:n]
    n = len(pairs)
    print(f"images: {n} from {args.image_dir}; model built in {build.wall:.1f} s")

    work = pathlib.Path(tempfile.mkdtemp(prefix="featcache-speed-"))
    results: dict = {"base": backbone.name, "size": size, "weights": args.weights, "precision": precision,
                     "n": n, "batch_size": args.batch_size, "decode_workers": pool_workers,
                     "decode_processes": args.decode_processes, "xla": args.xla, "load_average": load,
                     "device": device_text(), "runs": []}
    try:
        tree = copy_tree(pairs, work / "images")
        if args.decode_processes:  # as featcache does it: spawned processes, decode_file
            import functools
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            from featcache.extract.images.decode import decode_file

            # the pool's lifetime is timed (its start too) so that the workers' CPU is counted
            with Meter() as dec, ProcessPoolExecutor(pool_workers, multiprocessing.get_context("spawn")) as pool:
                job = functools.partial(decode_file, size=size, resize=args.resize)
                images = np.stack([r[0] for r in pool.map(job, [str(p) for _, p in pairs], chunksize=16)])
        else:
            with Meter() as dec, ThreadPoolExecutor(pool_workers) as pool:
                images = np.stack(list(pool.map(decode, [p for _, p in pairs])))
        mode = "processes" if args.decode_processes else "threads"
        rows = [(f"decode only ({pool_workers} {mode})", n / dec.wall, dec.wall, dec.cores, "")]
        for r in range(args.repeat):
            run = {}
            a = model_alone(model, images, args.batch_size)
            run["a"] = n / a.wall
            rows.append(("(a) model alone, warm", run["a"], a.wall, a.cores, ""))
            config = ExtractConfig(base=args.base, size=size, weights=args.weights, precision=precision,
                                   resize=args.resize, batch_size=args.batch_size, decode_workers=workers,
                                   progress=False, xla=args.xla, decode=decoder)
            store = work / f"store{r}.h5"
            with Meter() as b:
                summary = extract(str(tree), str(store), config)
            assert summary["extracted"] == n, summary
            run["b"] = n / b.wall
            run["b_loop"] = summary["images_per_second"]
            run["b_startup"] = summary["startup_seconds"]
            rows.append(("(b) featcache extract -> HDF5", run["b"], b.wall, b.cores,
                         f"steady state (first batch excluded): {summary['images_per_second']:.1f}/s; "
                         f"start-up {summary['startup_seconds']:.1f} s; decode={summary['decode']}"))
            if not args.skip_classic:
                n_c = min(n, args.classic_n) if args.classic_n > 0 else n
                tree_c = tree if n_c == n else copy_tree(pairs[:n_c], work / f"classic{n_c}")
                with Meter() as c:
                    seconds_c, what = classic_loop(tree_c, n_c, args, precision, model.output_shape)
                run["c"] = n_c / seconds_c
                run["classic"] = what
                rows.append(("(c) classic loop", run["c"], seconds_c, c.cores, f"{what}, {n_c} images"))
            run["cores"] = {"a": a.cores, "b": b.cores, **({"c": c.cores} if "c" in run else {})}
            run["b/a"] = run["b"] / run["a"]
            run["b/a per cpu-second"] = (run["b"] / b.cores) / (run["a"] / a.cores)
            if "c" in run:
                run["b/c"] = run["b"] / run["c"]
            results["runs"].append(run)
        # images per CPU-second: what each path gets out of the cores it was given (on a shared
        # machine the wall-clock rates follow the share of the CPU the other processes leave)
        print(f"{'':38s} {'images/s':>9s} {'seconds':>8s} {'cores':>6s} {'img/cpu-s':>9s}")
        for name, rate, seconds, cores, note in rows:
            per_cpu = rate / cores if cores > 0.05 else float("nan")
            print(f"{name:38s} {rate:9.1f} {seconds:8.2f} {cores:6.2f} {per_cpu:9.1f}  {note}")
        for i, run in enumerate(results["runs"]):
            text = (f"run {i + 1}: b/a = {run['b/a']:.3f} (target >= 0.90; per cpu-second "
                    f"{run['b/a per cpu-second']:.3f}; steady state {run['b_loop'] / run['a']:.3f})")
            if "b/c" in run:
                text += f"   b/c = {run['b/c']:.2f} (target >= 1.0)"
            print(text)
        results["decode_only"] = n / dec.wall
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
