#!/usr/bin/env python
"""Crash-safety torture: SIGKILL `featcache extract` at random moments many times, then finish.

Each round starts ``python -m featcache extract`` on the same store and kills it with SIGKILL:
about a third of the rounds at a random time after the process starts (interpreter and
TensorFlow start-up, model build, store set-up, extraction), the others a random number of
committed rows into the extraction plus a random few milliseconds. After every kill the store
must open for reading and `featcache verify` must find no damage (chunks the kill tore while
rewriting them in place are read from their raw bytes and counted as "torn", see
featcache/cache/torn.py). Then a last run finishes the job (verify: no damage, nothing torn left),
a clean run writes a second store, and the two are compared:

  rows       stored rows == good images (no in-flight tail kept, nothing extracted twice)
  duplicates digests or paths stored more than once (must be 0)
  missing    good images not in the store (must be 0)
  max |diff| largest absolute difference of any feature against the clean run

Exit status 0 if every check holds, 1 otherwise.

Example (about 5 minutes on a quiet 2-core machine):
  python benchmarks/torture.py --kills 30 --images 2000
"""
from __future__ import annotations

import argparse
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from featcache import open_store  # noqa: E402
from featcache.cache.store import committed_rows  # noqa: E402
from featcache.cache.integrity.verify import verify  # noqa: E402
from featcache.errors import FeatcacheError  # noqa: E402


def write_images(root: pathlib.Path, n: int, seed: int) -> None:
    """n small JPEGs in two classes, plus two broken files that must fail every run."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = ("cats", "dogs")[i % 2]
        (root / cls).mkdir(parents=True, exist_ok=True)
        base = np.array([(200, 60, 40), (40, 90, 200)][i % 2], dtype=np.float64)
        img = np.clip(base + rng.normal(0, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / cls / f"{cls}.{i:05d}.jpg", quality=90)
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (root / "dogs" / "empty.jpg").write_bytes(b"")




def command(tree, store, args) -> list[str]:
    return [sys.executable, "-m", "featcache", "extract", str(tree), str(store), "--base", args.base,
            "--weights", "none", "--size", str(args.size), "--batch-size", str(args.batch_size), "--no-progress"]


def stored(store: pathlib.Path):
    """(digest -> feature of active rows, all committed digests, all committed paths, failures)."""
    with open_store(store) as s:
        fs = s[s.feature_set_names()[0]]
        rows = fs.rows()
        features = dict(zip(fs.column("digests")[rows], fs.read(rows)))
        return features, list(fs.column("digests")), list(fs.column("paths")), fs.failures()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=30)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base", default="mobilenet_0.25")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--time-kills", type=float, default=0.33, help="share of kills at a random time after start")
    parser.add_argument("--max-delay", type=float, default=7.0, help="latest time-based kill, seconds after start")
    parser.add_argument("--workdir", help="keep the images and stores here (default: a temporary folder)")
    args = parser.parse_args()

    work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="featcache-torture-"))
    if args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    tree, store, clean = work / "images", work / "tortured.h5", work / "clean.h5"
    write_images(tree, args.images, args.seed)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(args.seed)
    started = time.time()
    landed = mid_extraction = unreadable = damaged = torn = 0

    for k in range(1, args.kills + 1):
        before = committed_rows(store)
        proc = subprocess.Popen(command(tree, store, args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        t0 = time.time()
        if rng.random() < args.time_kills:
            delay = rng.uniform(0.0, args.max_delay)
            time.sleep(delay)
            how = f"at {delay:.2f} s"
        else:
            target = before + rng.randint(1, 6 * args.batch_size)
            while committed_rows(store) < target and proc.poll() is None:
                time.sleep(0.01)
            extra = rng.uniform(0.0, 0.05)
            time.sleep(extra)
            how = f"past {target} rows +{extra * 1000:.0f} ms"
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
            status = "killed"
        else:
            status = f"finished first (exit {proc.returncode})"
        proc.communicate()
        after = committed_rows(store)
        mid_extraction += status == "killed" and before < after < args.images
        try:
            with open_store(store) as s:  # a reader must be able to open it after any kill
                s.feature_set_names()
        except FeatcacheError as exc:
            if store.exists():
                unreadable += 1
                print(f"    store unreadable after kill {k}: {exc}")
        if store.exists() and store.stat().st_size:
            checked = verify(str(store))  # checksums: a kill must never leave damage behind
            torn += sum(len(fs["torn"]) for fs in checked["feature_sets"])
            if not checked["ok"]:
                damaged += 1
                print(f"    damage after kill {k}: {checked['damage']} {[fs['damage'] for fs in checked['feature_sets']]}")
        print(f"kill {k:3d}: {how:<26} {status:<22} rows {before:5d} -> {after:5d}  ({time.time() - t0:5.1f} s)",
              flush=True)
        if after >= args.images and before < args.images:
            print("all rows committed before the kills ran out (more --images keeps the kills mid-run)")

    rows_before_final = committed_rows(store)
    final = subprocess.run(command(tree, store, args), env=env, capture_output=True, text=True)
    reference = subprocess.run(command(tree, clean, args), env=env, capture_output=True, text=True)
    if final.returncode or reference.returncode:
        print("final or clean run failed:", final.stderr[-2000:], reference.stderr[-2000:])
        return 1

    final_check = verify(str(store))
    ours, digests, paths, failures = stored(store)
    theirs, *_ = stored(clean)
    duplicates = (len(digests) - len(set(digests))) + (len(paths) - len(set(paths)))
    missing = len(set(theirs) - set(ours))
    max_diff = max(float(np.abs(ours[d] - theirs[d]).max()) for d in ours.keys() & theirs.keys())
    failed_paths = sorted(p for p, _ in failures)
    ok = (len(digests) == len(ours) == args.images and duplicates == 0 and missing == 0 and max_diff <= 1e-4
          and failed_paths == ["cats/broken.jpg", "dogs/empty.jpg"] and unreadable == 0 and damaged == 0
          and final_check["ok"] and not any(fs["torn"] for fs in final_check["feature_sets"]))
    print()
    print(f"kills sent        {landed} of {args.kills} rounds ({mid_extraction} in the middle of extracting)")
    print(f"store unreadable  {unreadable} times after a kill")
    print(f"verify            damage after {damaged} kills, {torn} torn chunks read raw; final store "
          f"{'ok' if final_check['ok'] else 'DAMAGED'}")
    print(f"rows              {len(digests)} stored, {len(ours)} active, {args.images} good images "
          f"({rows_before_final} committed before the final run)")
    print(f"duplicates        {duplicates}")
    print(f"missing           {missing}")
    print(f"failures          {failed_paths}")
    print(f"max |diff|        {max_diff:.3g} against a clean run")
    print(f"total             {time.time() - started:.0f} s; {'OK' if ok else 'FAILED'}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
