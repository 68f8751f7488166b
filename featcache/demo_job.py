"""`featcache demo`: the whole job on a machine with no data and no network.

It draws a small labelled image set itself, then runs the real pipeline through the
package's own APIs: extract (raw pixels, and MobileNet alpha 0.25 with the weights bundled in
the package), train heads on the cached features, compare them on the same test split,
export the best one.

The images are procedural textures: checkerboards, dots, stripes and zigzags, each drawn
with random colours, period, rotation and phase, inside a random rectangle or ellipse, with
clutter (random strokes and blobs), uneven lighting and sensor noise, saved as JPEG. The
class is the *kind of repeated structure*; everything a pixel can see on its own (colour,
brightness, where the pattern sits, the phase of the pattern) is random and independent of
the class. A linear model on raw pixels therefore sits near chance (each pixel's expected
value is the same for every class), while ImageNet conv features, which respond to edges,
corners and blobs wherever they are, separate the classes almost perfectly.
"""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from .errors import FeatcacheError

CLASSES = ("checkerboard", "dots", "stripes", "zigzag")
DEFAULT_PER_CLASS = 100  # 60 train / 20 validation / 20 test per class
DEFAULT_SEED = 0
IMAGE_SIZE = 128  # the generated images and the conv base's input size
PIXELS_SIZE = 32  # the pixel baseline: the image resized to 32x32x3 (3,072 numbers)
GENERATOR_VERSION = 1  # bump when the drawing changes, so old demo folders are redrawn
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
MANIFEST = "demo-images.json"  # beside images/, not in it (discover() would list it as skipped)
MARKER = ".featcache-demo"  # marks a work folder as the demo's own
_LUMA = np.array([0.299, 0.587, 0.114])


# --- the image generator ------------------------------------------------------------------

def _two_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random colours with enough brightness contrast for the pattern to be visible."""
    while True:
        a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if abs(float(a @ _LUMA - b @ _LUMA)) > 60:
            return a.astype(np.float32), b.astype(np.float32)


def _pattern(name: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the foreground colour, for rotated coordinates (u, v) in pixels."""
    if name == "stripes":
        return ((u / period) % 1.0) < rng.uniform(0.35, 0.65)
    if name == "checkerboard":
        return ((np.floor(u / period) + np.floor(v / period)) % 2) == 0
    if name == "dots":
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return du * du + dv * dv < rng.uniform(0.15, 0.3) ** 2
    if name == "zigzag":
        triangle = np.abs((v / period) % 2.0 - 1.0)
        return ((u / period + triangle * rng.uniform(0.8, 1.5)) % 1.0) < rng.uniform(0.35, 0.6)
    raise ValueError(f"unknown pattern {name!r}")


def render(name: str, rng: np.random.Generator, size: int = IMAGE_SIZE):
    """One RGB PIL image of class ``name``; all randomness comes from ``rng``."""
    from PIL import Image, ImageDraw

    ss = 2  # drawn at twice the size and downsampled: no aliasing moiré that pixels could use
    n = size * ss
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) / ss
    theta = rng.uniform(0, np.pi)
    cx, cy = rng.uniform(0, size, 2)
    u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
    v = (y - cy) * np.cos(theta) - (x - cx) * np.sin(theta)
    period = rng.uniform(10, 26) * size / 128
    fg, bg = _two_colours(rng)
    img = np.where(_pattern(name, u, v, period, rng)[..., None], fg, bg)

    # The texture fills a random rectangle or ellipse; around it, a third random colour.
    region = Image.new("L", (n, n), 0)
    w, h = rng.uniform(0.55, 1.0, 2) * n
    x0, y0 = rng.uniform(0, n - w), rng.uniform(0, n - h)
    shape = ImageDraw.Draw(region).ellipse if rng.random() < 0.5 else ImageDraw.Draw(region).rectangle
    shape([x0, y0, x0 + w, y0 + h], fill=255)
    inside = np.asarray(region, np.float32)[..., None] / 255.0
    img = img * inside + rng.integers(0, 256, 3).astype(np.float32) * (1.0 - inside)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)

    # Clutter: a few random blobs, strokes and squares on top.
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x0, y0 = rng.uniform(0, size, 2)
        s = rng.uniform(4, 16) * size / 128
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x0 + s, y0 + s * rng.uniform(0.5, 1.5)], fill=colour)
        elif kind == 1:
            end = (x0 + rng.uniform(-40, 40), y0 + rng.uniform(-40, 40))
            draw.line([(x0, y0), end], fill=colour, width=int(rng.integers(1, 4)))
        else:
            draw.rectangle([x0, y0, x0 + s, y0 + s], fill=colour)

    # Uneven lighting and sensor noise.
    arr = np.asarray(pil, np.float32)
    gy, gx = np.mgrid[0:size, 0:size] / size
    light = 1.0 + rng.uniform(-0.25, 0.25) * gx + rng.uniform(-0.25, 0.25) * gy
    arr = arr * light[..., None] + rng.normal(0.0, rng.uniform(3, 12), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def split_counts(per_class: int) -> dict[str, int]:
    """Images per class in each split folder (60/20/20, at least one in each)."""
    if per_class < 5:
        raise FeatcacheError(f"--per-class {per_class}: needs at least 5 (train, validation and test images)")
    validation = max(1, round(per_class * SPLIT_FRACTIONS[1]))
    test = max(1, round(per_class * SPLIT_FRACTIONS[2]))
    return {"train": per_class - validation - test, "validation": validation, "test": test}


def generate_images(root: str, per_class: int = DEFAULT_PER_CLASS, seed: int = DEFAULT_SEED,
                    size: int = IMAGE_SIZE) -> dict[str, int]:
    """Write ``root/<split>/<class>/<class>.<NNN>.jpg``. Each image has its own seed derived
    from (seed, split, class, index), so the same arguments always give the same files."""
    counts = split_counts(per_class)
    for split_index, (split, n) in enumerate(counts.items()):
        for class_index, name in enumerate(CLASSES):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, split_index, class_index, i])
                render(name, rng, size).save(os.path.join(folder, f"{name}.{i:03d}.jpg"), quality=90)
    return counts


def prepare_images(workdir: str, per_class: int, seed: int) -> dict:
    """The demo's image folder: reused when the manifest says it was drawn completely with
    the same settings, drawn afresh otherwise (``workdir`` is the demo's own, see
    :func:`_claim_workdir`)."""
    root = os.path.join(workdir, "images")
    manifest_path = os.path.join(workdir, MANIFEST)
    wanted = {"generator_version": GENERATOR_VERSION, "per_class": per_class, "seed": seed,
              "size": IMAGE_SIZE, "classes": list(CLASSES)}
    manifest = None
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                manifest = json.load(f)
        except (OSError, ValueError):
            manifest = None
    started = time.perf_counter()
    if manifest == wanted and os.path.isdir(root):
        return {"root": root, "generated": False, "seconds": 0.0, "per_split": split_counts(per_class)}
    if os.path.exists(root):  # drawn with other settings, or cut off half-way: draw again
        shutil.rmtree(root)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    counts = generate_images(root, per_class, seed)
    with open(manifest_path, "w", encoding="utf-8") as f:  # written last: only complete sets are reused
        json.dump(wanted, f, indent=2)
    return {"root": root, "generated": True, "seconds": round(time.perf_counter() - started, 3), "per_split": counts}


def write_samples(root: str, path: str, per_row: int = 8) -> str:
    """A picture of the first training images of each class, one row per class."""
    from PIL import Image, ImageDraw

    tiles = []
    for name in CLASSES:
        folder = os.path.join(root, "train", name)
        files = sorted(os.listdir(folder))[:per_row]
        row = Image.new("RGB", (IMAGE_SIZE * per_row, IMAGE_SIZE), "white")
        for i, file in enumerate(files):
            with Image.open(os.path.join(folder, file)) as img:
                row.paste(img.convert("RGB"), (i * IMAGE_SIZE, 0))
        tiles.append((name, row))
    label_width = 110
    sheet = Image.new("RGB", (label_width + IMAGE_SIZE * per_row, IMAGE_SIZE * len(tiles)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, row) in enumerate(tiles):
        sheet.paste(row, (label_width, r * IMAGE_SIZE))
        draw.text((8, r * IMAGE_SIZE + IMAGE_SIZE // 2 - 6), name, fill="black")
    sheet.save(path, quality=90)
    return path


# --- the run --------------------------------------------------------------------------------

# (leaderboard name, extraction settings, head, head options). The dense head's classic
# RMSprop lr 2e-5 is tuned for thousands of 8,192-wide VGG16 features; on 240 rows of
# 256 pooled MobileNet features it has not converged after 30 epochs, so the demo uses 1e-3.
FEATURE_SETS = {
    "pixels": dict(base="pixels", size=PIXELS_SIZE, weights=None, pooling="none"),
    "mobilenet_0.25": dict(base="mobilenet_0.25", size=IMAGE_SIZE, weights="bundled", pooling="avg"),
}
ENTRIES = (
    ("pixels", "logreg", {}),
    ("mobilenet_0.25", "logreg", {}),
    ("mobilenet_0.25", "dense", {"lr": 1e-3}),
)
DEFAULT_WORKDIR = "featcache-demo"


def _claim_workdir(workdir: str) -> None:
    """Create the work folder, or check that an existing one is a demo's: the demo replaces
    its own images, runs and model there, so it never works in a folder it did not make."""
    marker = os.path.join(workdir, MARKER)
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.isfile(marker):
        raise FeatcacheError(
            f"{workdir}: exists, is not empty and was not made by featcache demo; choose another --workdir")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(marker, "w", encoding="utf-8") as f:
            f.write("made by featcache demo: it may replace images/, runs/ and model.keras here\n")
    except OSError as exc:
        raise FeatcacheError(f"{workdir}: cannot create the demo folder ({exc.strerror}); choose another --workdir") from None


def _clear_run_dir(path: str) -> None:
    """Remove a run folder of an earlier demo run (the harness never overwrites runs)."""
    if not os.path.exists(path):
        return
    from .classify.runs.run_dir import CONFIG

    if os.path.isdir(path) and (not os.listdir(path) or os.path.isfile(os.path.join(path, CONFIG))):
        shutil.rmtree(path)
    else:
        raise FeatcacheError(f"{path}: exists and is not a featcache run folder; choose another --workdir")


def _quiet(log):
    return log or (lambda message: None)


def run_demo(workdir: str | None = None, per_class: int = DEFAULT_PER_CLASS, seed: int = DEFAULT_SEED,
             log=None) -> dict:
    """Draw the images (or reuse them), extract, train, compare, export, report the best run. Returns a summary
    dict; ``log`` (a callable taking one line) hears about each step as it starts."""
    import sklearn.linear_model  # noqa: F401  (loads scipy's BLAS now, so threadpool_limits sees it)
    from threadpoolctl import threadpool_limits  # installed with scikit-learn

    from .classify.train.harness import rank_key, train
    from .extract.pipeline import extract

    log = _quiet(log)
    started = time.perf_counter()
    workdir = os.fspath(workdir or DEFAULT_WORKDIR)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise FeatcacheError(f"{workdir}: exists and is not a folder; choose another --workdir")
    counts = split_counts(per_class)
    _claim_workdir(workdir)

    total = per_class * len(CLASSES)
    log(f"images: {total} ({', '.join(CLASSES)}) in {os.path.join(workdir, 'images')}")
    images = prepare_images(workdir, per_class, seed)
    samples = write_samples(images["root"], os.path.join(workdir, "samples.jpg"))

    store = os.path.join(workdir, "features.h5")
    extracted = {}
    for name, settings in FEATURE_SETS.items():
        log(f"extract: {name} at {settings['size']} px -> {store}")
        extracted[name] = extract(images["root"], store, progress=False, **settings)

    rows, summaries = [], []
    for base, head, options in ENTRIES:
        name = f"{base}+{head}"
        run_dir = os.path.join(workdir, "runs", name)
        _clear_run_dir(run_dir)
        log(f"train: {name}")
        # One BLAS thread: for a few hundred rows, threads cost more than they give, and on a
        # busy machine OpenBLAS threads spinning against TensorFlow's turned the 0.2 s pixel
        # fit into 5-15 s. (Keras' head runs on TensorFlow's own pool: unaffected.)
        with threadpool_limits(1, user_api="blas"):
            summary = train(store, extracted[base]["feature_set"], head=head, out=run_dir, report=False, **options)
        rows.append({
            "name": name,
            "feature_set": summary["feature_set"],
            "head": head,
            "test_accuracy": summary["test"]["accuracy"],
            "test_loss": summary["test"]["loss"],
            "validation_accuracy": summary["validation"]["accuracy"],
            "validation_loss": summary["validation"]["loss"],
            "seconds": summary["seconds"],
            "run_dir": os.path.abspath(run_dir),
        })
        summaries.append(summary)
    # Ranked by `featcache compare`'s own key (validation accuracy, then loss): the test split
    # only reports, so the pick of the best model is not tuned on it.
    order = sorted(range(len(rows)), key=lambda i: rank_key(cv=False)(summaries[i]))
    rows = [rows[i] for i in order]
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    best = rows[0]

    model_path = os.path.join(workdir, "model.keras")
    log(f"export: {best['name']} -> {model_path}")
    exported = export_best(best["run_dir"], model_path)

    from .classify.report.run_page import write_report

    log(f"report: {best['name']} -> {os.path.join(best['run_dir'], 'report.html')}")
    report = write_report(best["run_dir"])
    plots = {name: os.path.abspath(os.path.join(best["run_dir"], name))
             for name in ("curves.png", "confusion_matrix.png")
             if os.path.isfile(os.path.join(best["run_dir"], name))}
    return {
        "workdir": os.path.abspath(workdir),
        "classes": list(CLASSES),
        "images": {"root": os.path.abspath(images["root"]), "per_split": counts, "total": total,
                   "generated": images["generated"], "seconds": images["seconds"], "seed": seed},
        "samples": os.path.abspath(samples),
        "store": os.path.abspath(store),
        "extract": [{"name": name, "feature_set": r["feature_set"], "shape": r["shape"],
                     "extracted": r["extracted"], "reused": r["reused"], "seconds": r["seconds"]}
                    for name, r in extracted.items()],
        "leaderboard": rows,
        "best": best["name"],
        "model": os.path.abspath(model_path),
        "model_input": {"shape": exported["input_shape"], "values": exported["input"]},
        "plots": plots,
        "report": {"path": os.path.abspath(report["report"]), "split": report["split"], "images": report["images"],
                   "mistakes": report["mistakes"]},
        "seconds": round(time.perf_counter() - started, 3),
    }


def _shown(path: str) -> str:
    """A path as the user can type it: relative when it lies under the current folder."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def format_report(result: dict) -> str:
    """The text `featcache demo` prints."""
    images = result["images"]
    lines = [
        f"featcache demo in {_shown(result['workdir'])}",
        f"  images    {images['total']} ({', '.join(result['classes'])}; train/validation/test per class "
        f"{images['per_split']['train']}/{images['per_split']['validation']}/{images['per_split']['test']}), "
        + (f"drawn in {images['seconds']:.1f} s" if images["generated"] else "reused"),
        f"  samples   {_shown(result['samples'])}",
        f"  features  {_shown(result['store'])}",
    ]
    for e in result["extract"]:
        lines.append(f"    {e['name']:<16} {e['feature_set']}  shape {tuple(e['shape'])}  "
                     f"extracted {e['extracted']}, reused {e['reused']} in {e['seconds']:.1f} s")
    n_test = images["per_split"]["test"] * len(result["classes"])
    lines += ["", f"leaderboard (ranked by validation accuracy; test = {n_test} held-out images)",
              f"  {'rank':<5}{'name':<24}{'test acc':>9}{'val acc':>9}{'seconds':>9}"]
    for r in result["leaderboard"]:
        lines.append(f"  {r['rank']:<5}{r['name']:<24}{r['test_accuracy']:>9.3f}{r['validation_accuracy']:>9.3f}"
                     f"{r['seconds']:>9.1f}")
    best = result["leaderboard"][0]
    lines += [""]
    for name, path in result["plots"].items():
        lines.append(f"plot      {_shown(path)}")
    r = result["report"]
    lines += [
        f"report    {_shown(r['path'])}  (open in a browser: {r['mistakes']} mistakes of {r['images']} {r['split']} "
        "images, a map of the features)",
        f"run       {_shown(best['run_dir'])}  (config, metrics, model of {best['name']})",
        f"model     {_shown(result['model'])}  (keras.models.load_model: {tuple(result['model_input']['shape'])} "
        f"RGB 0..255 in, {len(result['classes'])} class probabilities out)",
        f"try       featcache predict {_shown(best['run_dir'])} {_shown(os.path.join(result['images']['root'], 'test', result['classes'][1]))}",
        f"done in {result['seconds']:.1f} s",
    ]
    return "\n".join(lines)


def export_best(run_dir: str, out: str) -> dict:
    """The run as one Keras model file with its labels and card (featcache.classify.deploy.export);
    replaces the previous demo's export, since exports themselves are never overwritten."""
    from .classify.deploy.export import export
    from .classify.deploy.card import companion_paths

    for path in (out, *companion_paths(out, "keras")):
        if os.path.isfile(path):
            os.remove(path)
    return export(run_dir, out)
