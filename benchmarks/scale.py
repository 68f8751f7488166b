#!/usr/bin/env python
"""Extraction at scale (issue 23): generated trees of distinct tiny images, ``--base pixels
--size 8`` (the model costs nothing: what is left is the pipeline itself).

For each tree size: walk + stat of the tree, a cold run into a fresh store, an unchanged
re-run, and a re-run after 10% of the files moved to new paths (their features copied in
bulk). Prints the seconds, the run's own breakdown (--json's list/hash/copy/write seconds),
files read, the ratios the issue targets, and the peak RSS of this process.

Trees are generated once under --tree-dir (64x64 JPEGs of noise, 10 class folders) with
mtimes an hour back (files just written are "racy" and would be hashed again, see
featcache/extract/filestat.py). Examples:
  python benchmarks/scale.py --images 10000
  python benchmarks/scale.py --images 10000 100000
"""
from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[10_000])
    parser.add_argument("--tree-dir", default=os.path.join(tempfile.gettempdir(), "featcache-scale"))
    args = parser.parse_args()
    for n in args.images:
        base = pathlib.Path(args.tree_dir)
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
        moved = move_tenth(tree)
        after = run(tree, store)
        print(line(f"{moved} moved re-run", after))
        print(f"  ratios: unchanged/walk+stat {same['outer_seconds'] / stat:.1f}x; moved/unchanged "
              f"{after['outer_seconds'] / same['outer_seconds']:.1f}x; copy {1e3 * after['copy_seconds'] / max(moved, 1):.3f} "
              f"ms/row; cold {1e6 * cold['outer_seconds'] / n:.0f} us/image")
        print(f"  peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
