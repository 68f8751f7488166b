#!/usr/bin/env python
"""What checking the store costs: write and read MB/s of features without checksums, with HDF5's
Fletcher-32 filter and with featcache's CRC-32 per row; and how long `featcache verify` takes.

For each case (default: 2000 and 16000 rows of 4x4x512 float32, VGG16's output at 150 px):

1. The checksum alone, at the h5py level: rows appended batch by batch (32 rows, one chunk each)
   in SWMR mode with a flush per batch, then read back batch by batch. ``plain``: no checksum;
   ``fletcher32``: HDF5's filter on the dataset; ``crc32``: plain + zlib.crc32 of every row
   (computed on write and stored in a column, recomputed and compared on read).
2. featcache's own path: StoreWriter.append + commit per batch (every column included) and
   FeatureSet.read per batch (CRCs checked), in a subprocess. With ``--baseline SRC`` the same
   runs on another featcache source tree too (e.g. the commit before checksums:
   ``git archive 74cee40 | tar -x -C /tmp/before``), so before and after are measured side by side.
3. ``verify`` on featcache's store (every chunk of every dataset, every CRC): seconds per GB.

MB/s are per CPU-second of the process (user + system: what checking costs, whatever share of
the machine other processes leave) and per wall-clock second; the median of --repeat runs; the
files are read from the page cache (this measures the CPU cost of checking, not the disk).
  python benchmarks/checksum_cost.py
  python benchmarks/checksum_cost.py --rows 2000 --baseline /tmp/before
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zlib

REPO = pathlib.Path(__file__).resolve().parents[1]

import h5py  # noqa: E402
import numpy as np  # noqa: E402

SHAPE = (4, 4, 512)
BATCH = 32


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2000, 16000], help="Rows per case.")
    p.add_argument("--repeat", type=int, default=5, help="Runs per figure (the median is kept).")
    p.add_argument("--baseline", help="Another featcache source tree to measure the same way (before/after).")
    p.add_argument("--dir", default=None, help="Folder for the stores [default: a temporary folder].")
    p.add_argument("--json", help="Also write the results to this file.")
    p.add_argument("--featcache-path", nargs=3, metavar=("SRC", "STORE", "ROWS"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def timed(fn, repeat) -> tuple[float, float]:
    """Median (CPU seconds, wall seconds) of ``repeat`` runs."""
    cpu, wall = [], []
    for _ in range(repeat):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return float(np.median(cpu)), float(np.median(wall))


def rates(mb, seconds) -> dict:
    cpu, wall = seconds
    return {"cpu": round(mb / cpu, 1), "wall": round(mb / wall, 1)}


def row_crc(x):
    return np.fromiter((zlib.crc32(r) for r in x.reshape(len(x), -1)), np.uint32, len(x))


def write_h5py(path, x, kind):
    with h5py.File(path, "w", libver="latest") as f:
        ds = f.create_dataset("features", shape=(0, *SHAPE), maxshape=(None, *SHAPE), chunks=(BATCH, *SHAPE),
                              dtype="float32", fletcher32=kind == "fletcher32")
        crc = f.create_dataset("crc", shape=(0,), maxshape=(None,), chunks=(4096,), dtype="uint32", fletcher32=True)
        f.swmr_mode = True
        for start in range(0, len(x), BATCH):
            batch = x[start : start + BATCH]
            ds.resize(start + len(batch), axis=0)
            ds[start:] = batch
            if kind == "crc32":
                crc.resize(start + len(batch), axis=0)
                crc[start:] = row_crc(batch)
            f.flush()


def read_h5py(path, n, kind):
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        ds = f["features"]
        stored = f["crc"][:] if kind == "crc32" else None
        for start in range(0, n, BATCH):
            batch = ds[start : start + BATCH]
            if stored is not None and np.any(row_crc(batch) != stored[start : start + BATCH]):
                raise AssertionError("checksum mismatch")


def featcache_path(src: str, store: str, n: int, repeat: int) -> dict:
    """StoreWriter/FeatureSet of the featcache in ``src`` (runs in a subprocess of its own)."""
    sys.path.insert(0, src)
    from featcache.cache.key import KeySpec
    from featcache.cache.store import open_store

    try:
        from featcache.cache.writer import StoreWriter
    except ImportError:  # before store.py was split
        from featcache.cache.store import StoreWriter

    x = np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32)
    spec = KeySpec("bench", "random:seed=0", 150, "bilinear", "none", "output", "none", "float32")
    digests = [f"{i:064x}" for i in range(n)]

    def write():
        if os.path.exists(store):
            os.remove(store)
        with StoreWriter(store) as writer:
            writer.existing(spec)
            writer.create(spec, SHAPE, "float32", BATCH)
            writer.set_listing_attrs(["a", "b"], 0)
            writer.start_appending()
            for start in range(0, n, BATCH):
                k = len(x[start : start + BATCH])
                writer.append(x[start : start + k], [0] * k, [f"a/{i}.jpg" for i in range(start, start + k)],
                              digests[start : start + k], ["train"] * k)
                writer.commit()

    def read():
        with open_store(store) as s:
            fs = s.select()
            rows = np.arange(n)
            for start in range(0, n, BATCH):
                fs.read(rows[start : start + BATCH])

    mb = x.nbytes / 1e6
    return {"write": rates(mb, timed(write, repeat)), "read": rates(mb, timed(read, repeat))}


def run_featcache(src, store, n, repeat) -> dict:
    out = subprocess.run([sys.executable, __file__, "--featcache-path", src, store, str(n), "--repeat", str(repeat)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def run_case(folder, n, repeat, baseline):
    x = np.random.default_rng(0).random((n, *SHAPE), dtype=np.float32)
    mb = x.nbytes / 1e6
    out = {"rows": n, "features_mb": round(mb, 1)}
    for kind in ("plain", "fletcher32", "crc32"):
        path = os.path.join(folder, f"{kind}-{n}.h5")
        out[kind] = {"write": rates(mb, timed(lambda: write_h5py(path, x, kind), repeat)),
                     "read": rates(mb, timed(lambda: read_h5py(path, n, kind), repeat))}
        os.remove(path)
    store = os.path.join(folder, f"featcache-{n}.h5")
    out["featcache"] = run_featcache(str(REPO), store, n, repeat)
    sys.path.insert(0, str(REPO))
    from featcache.cache.integrity.verify import verify

    assert verify(store)["ok"]
    cpu, wall = timed(lambda: verify(store), repeat)
    out["verify"] = {"cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "wall_s_per_gb": round(wall / (mb / 1000), 2),
                     "store_mb": round(os.path.getsize(store) / 1e6, 1)}
    os.remove(store)
    if baseline:
        out["baseline"] = run_featcache(baseline, os.path.join(folder, f"baseline-{n}.h5"), n, repeat)
    return out


def describe(r) -> list[str]:
    def fmt(kind, op):
        v, p = r[kind][op], r["plain"][op]
        return f"{kind} {v['cpu']:.0f} ({v['cpu'] / p['cpu']:.2f}x)"

    lines = [f"{r['rows']} x 4x4x512 float32 ({r['features_mb']} MB); MB per CPU-second (vs plain):"]
    for op in ("write", "read"):
        lines.append(f"  h5py {op}: plain {r['plain'][op]['cpu']:.0f}, " + ", ".join(fmt(k, op) for k in ("fletcher32", "crc32")))
    for op in ("write", "read"):
        line = f"  featcache {op}: {r['featcache'][op]['cpu']:.0f}"
        if "baseline" in r:
            b = r["baseline"][op]["cpu"]
            line += f" (baseline {b:.0f}: {r['featcache'][op]['cpu'] / b:.2f}x)"
        lines.append(line + f"; wall {r['featcache'][op]['wall']:.0f}")
    v = r["verify"]
    lines.append(f"  verify: {v['wall_s']} s wall ({v['cpu_s']} s CPU) for a {v['store_mb']} MB store: "
                 f"{v['wall_s_per_gb']} s per GB of features")
    return lines


def main(argv=None):
    args = parse_args(argv)
    if args.featcache_path:
        src, store, n = args.featcache_path
        print(json.dumps(featcache_path(src, store, int(n), args.repeat)))
        return
    print("load average %.2f %.2f %.2f on %d cores" % (*os.getloadavg(), os.cpu_count()), flush=True)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for n in args.rows:
            r = run_case(folder, n, args.repeat, args.baseline)
            results.append(r)
            print("\n".join(describe(r)), flush=True)
    print("load average %.2f %.2f %.2f after" % os.getloadavg())
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
