#!/usr/bin/env python
"""Extraction at scale (issue 23): generated trees of distinct tiny images, ``--base pixels
--size 8`` (the model costs nothing: what is left is the pipeline itself).

For each tree size: walk + stat of the tree, a cold run into a fresh store, an unchanged
re-run, and a re-run after 10% of the files moved to new paths (their features copied in
bulk). Prints the seconds, the run's own breakdown (--json's list/hash/copy/write seconds),
files read, the ratios the issue targets, and the peak RSS of the extraction runs (each tree
size runs in a process of its own, so the figure is that size's).

--twins: a cold run over a tree of byte-identical pairs (each image twice, under two paths)
against a cold run over one of each. --photos N: a cold run over N real-size JPEGs (500x375,
made from the photos of ../shared/data, each with its own noise so every file is distinct):
the wall-clock rate against the steady-state rate. --commands: the other commands on the
largest store (info, verify, repair, train streamed, compare, search, predict --features,
audit, similar), each in its own process: seconds and peak RSS.

Trees are generated once under --tree-dir (64x64 JPEGs of noise, 10 class folders) with
mtimes an hour back (files just written are "racy" and would be hashed again, see
featcache/extract/filestat.py). Examples:
  python benchmarks/scale.py --images 10000
  python benchmarks/scale.py --images 10000 100000
  python benchmarks/scale.py --images 1000000 --commands
  python benchmarks/scale.py --images 10000 --twins --photos 10000
  python benchmarks/scale.py --images 2000 --twins --base mobilenet_v2 --size 96   # twins with a model's cost
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CLASSES = 10
OPTIONS = dict(base="pixels", size=8, weights="none", batch_size=256, progress=False)


def make_tree(root: pathlib.Path, n: int) -> pathlib.Path:
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(n)
    past = time.time() - 3600
    for i in range(n):
        folder = root / f"class{i % CLASSES}" / f"part{i // 1000:04d}"
        if not folder.exists():
            folder.mkdir(parents=True)
        path = folder / f"img{i:07d}.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path, quality=80)
        os.utime(path, (past, past))
    done.write_text("")
    return root


def walk_and_stat(root: pathlib.Path) -> float:
    started = time.perf_counter()
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.stat(os.path.join(dirpath, name))
    return time.perf_counter() - started


def move_tenth(root: pathlib.Path) -> int:
    """Move every 10th image of each class into a new folder of that class."""
    moved = 0
    past = time.time() - 3600
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        target = class_dir / "moved"
        target.mkdir()
        files = sorted(class_dir.rglob("*.jpg"))
        for path in files[::10]:
            new = target / path.name
            os.rename(path, new)
            os.utime(new, (past, past))
            moved += 1
    return moved


def run(tree: pathlib.Path, store: pathlib.Path) -> dict:
    from featcache.extract.pipeline import ExtractConfig, extract

    started = time.perf_counter()
    result = extract(str(tree), str(store), ExtractConfig(**OPTIONS))
    result["outer_seconds"] = time.perf_counter() - started
    return result


def line(what: str, r: dict) -> str:
    parts = ", ".join(f"{k.replace('_seconds', '')} {r[k]:.2f}" for k in
                      ("list_seconds", "hash_seconds", "setup_seconds", "copy_seconds", "write_seconds"))
    return (f"  {what:<22} {r['outer_seconds']:7.2f} s  read {r['files_read']:>7}  extracted {r['extracted']:>7}  "
            f"copied {r['copied']:>6}  wall {r['wall_images_per_second']:8.0f} img/s  ({parts})")


# Runs a command and prints its peak RSS last: the wrapper's only child is the command, so
# RUSAGE_CHILDREN is that command's own peak.
_PEAK = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
         "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def child(args: list[str], timeout: float = 1800) -> tuple[float, float, int, str]:
    """(seconds, peak RSS in MB, exit code, last line of output) of one command."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", _PEAK, *args], capture_output=True, text=True, cwd=REPO,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return time.perf_counter() - started, float("nan"), -1, f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - started
    lines = done.stdout.strip().splitlines() or ["0"]
    last = (done.stderr.strip().splitlines() or lines[-2:-1] or [""])[-1]
    return seconds, int(lines[-1]) / 1024, done.returncode, last[:160]


def commands(store: pathlib.Path, tree: pathlib.Path, work: pathlib.Path) -> None:
    """Each command over the store, in a process of its own: seconds and peak RSS."""
    from featcache.extract.images.discover import discover

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    query = discover(str(tree)).entries[1].relpath  # still in place after move_tenth (it moves every 10th from the first)
    copy = work / "copy.h5"
    shutil.copyfile(store, copy)
    fc = [sys.executable, "-m", "featcache"]
    steps = [
        ("info", [*fc, "info", str(store), "--json"]),
        ("verify", [*fc, "verify", str(store), "--json"]),
        ("repair (a copy)", [*fc, "repair", str(copy), "--json"]),
        ("train logreg", [*fc, "train", str(store), "--head", "logreg", "--out", str(work / "logreg"), "--no-report"]),
        ("train dense, streamed", [*fc, "train", str(store), "--head", "dense", "--epochs", "2", "--batch-size", "1024",
                                   "--memory-budget", "256", "--out", str(work / "dense"), "--no-report"]),
        ("export --head-only", [*fc, "export", str(work / "dense"), str(work / "head.keras"), "--head-only",
                                "--no-evaluate"]),
        ("predict --features", [*fc, "predict", str(work / "head.keras"), "--features", str(store), "--json"]),
        ("audit", [*fc, "audit", str(store), "--out", str(work / "audit"), "--json"]),
        ("similar", [*fc, "similar", str(store), query, "-k", "5", "--json"]),
        ("compare logreg,dense", [*fc, "compare", str(store), "--heads", "logreg,dense", "--epochs", "1",
                                  "--batch-size", "1024", "--memory-budget", "256"]),
        ("search 2 trials", [*fc, "search", str(store), "--heads", "logreg", "--trials", "2", "--out",
                             str(work / "search")]),
    ]
    for what, args in steps:
        seconds, rss, code, last = child(args)
        print(f"  {what:<24} {seconds:8.1f} s  peak RSS {rss:6.0f} MB  exit {code}" + ("" if code == 0 else f"  ({last})"),
              flush=True)


def make_photos(root: pathlib.Path, n: int) -> pathlib.Path:
    """n distinct 500x375 JPEGs in two class folders, from the shared photos plus noise."""
    from PIL import Image

    done = root / ".complete"
    if done.exists():
        return root
    source = sorted((REPO.parent / "shared" / "data").rglob("*.jpg"))
    if not source:
        raise SystemExit("--photos needs ../shared/data (a labelled photo set)")
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(n)
    past = time.time() - 3600
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = np.asarray(Image.open(source[i % len(source)]).convert("RGB").resize((500, 375)), np.int16)
        image = np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
        path = folder / f"photo{i:06d}.jpg"
        Image.fromarray(image).save(path, quality=90)
        os.utime(path, (past, past))
    done.write_text("")
    return root


def twins(base: pathlib.Path, n: int) -> None:
    """Cold runs: n distinct images, then the same n each under two paths (hard links)."""
    one = make_tree(base / f"tree-{n}", n)
    two = base / f"twins-{n}"
    shutil.rmtree(two, ignore_errors=True)
    shutil.copytree(one, two, copy_function=os.link)
    for class_dir in sorted(p for p in one.iterdir() if p.is_dir()):
        shutil.copytree(class_dir, two / class_dir.name / "again", copy_function=os.link)
    results = []
    for tree in (one, two):
        store = base / f"twins-store-{tree.name}-{OPTIONS['base']}.h5"
        store.unlink(missing_ok=True)
        results.append(run(tree, store))
        print(line(f"cold {tree.name}", results[-1]))
    # set-up (the model build) aside too: the first run in the process pays the imports and compiles
    after_setup = [r["outer_seconds"] - r["setup_seconds"] for r in results]
    print(f"  twins: {2 * n} listed, {n} distinct: {results[1]['outer_seconds'] / results[0]['outer_seconds']:.2f}x "
          f"the run over one of each ({after_setup[1] / after_setup[0]:.2f}x with set-up aside)")
    shutil.rmtree(two, ignore_errors=True)


def photos(base: pathlib.Path, n: int) -> None:
    tree = make_photos(base / f"photos-{n}", n)
    store = base / f"photos-store-{n}.h5"
    store.unlink(missing_ok=True)
    cold = run(tree, store)
    print(line(f"cold, {n} photos", cold))
    print(f"  wall {cold['wall_images_per_second']:.0f} img/s against steady {cold['images_per_second']:.0f} img/s: "
          f"{cold['wall_images_per_second'] / cold['images_per_second']:.2f}")


def one_size(n: int, base: pathlib.Path, with_commands: bool) -> None:
    print(f"{n} images")
    started = time.perf_counter()
    pristine = make_tree(base / f"tree-{n}", n)
    print(f"  generated/found in {time.perf_counter() - started:.1f} s")
    tree = base / f"work-{n}"
    shutil.rmtree(tree, ignore_errors=True)
    shutil.copytree(pristine, tree, copy_function=os.link)  # hard links: same inodes, no copying
    store = base / f"store-{n}.h5"
    for p in (store, pathlib.Path(f"{store}.lock")):
        p.unlink(missing_ok=True)
    stat = walk_and_stat(tree)
    print(f"  walk + stat            {stat:7.2f} s")
    cold = run(tree, store)
    print(line("cold", cold))
    same = run(tree, store)
    print(line("unchanged re-run", same))
    stat_again = walk_and_stat(tree)
    moved = move_tenth(tree)
    after = run(tree, store)
    print(line(f"{moved} moved re-run", after))
    print(f"  ratios: unchanged/walk+stat {same['outer_seconds'] / stat:.1f}x (walk + stat again {stat_again:.2f} s); "
          f"moved/unchanged {after['outer_seconds'] / same['outer_seconds']:.1f}x; copy "
          f"{1e3 * after['copy_seconds'] / max(moved, 1):.3f} ms/row; cold {1e6 * cold['outer_seconds'] / n:.0f} us/image")
    print(f"  peak RSS of the extraction runs {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB",
          flush=True)
    if with_commands:
        commands(store, tree, base / f"commands-{n}")
    shutil.rmtree(tree, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="*", default=[10_000])
    parser.add_argument("--tree-dir", default=os.path.join(tempfile.gettempdir(), "featcache-scale"))
    parser.add_argument("--commands", action="store_true", help="the other commands on the largest store")
    parser.add_argument("--twins", action="store_true", help="a tree of byte-identical pairs (smallest size)")
    parser.add_argument("--photos", type=int, default=0, help="a cold run over this many real-size photos")
    parser.add_argument("--base", default=OPTIONS["base"], help="the extraction base [default: pixels: no model cost]")
    parser.add_argument("--size", type=int, default=OPTIONS["size"])
    parser.add_argument("--one", action=argparse.BooleanOptionalAction, default=False, help=argparse.SUPPRESS)
    args = parser.parse_args()
    OPTIONS.update(base=args.base, size=args.size)
    base = pathlib.Path(args.tree_dir)
    if args.one:  # a single size in this process (its peak RSS is that size's)
        one_size(args.images[0], base, args.commands)
        return
    sizes = sorted(args.images)
    for n in sizes:
        subprocess.run([sys.executable, __file__, "--images", str(n), "--tree-dir", str(base), "--one",
                        "--base", args.base, "--size", str(args.size),
                        *(["--commands"] if args.commands and n == sizes[-1] else [])], check=True)
    if args.twins and sizes:
        twins(base, sizes[0])
    if args.photos:
        photos(base, args.photos)


if __name__ == "__main__":
    main()
