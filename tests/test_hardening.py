"""Crash safety, clean stops and one writer, through real `python -m featcache extract` processes.

The base is mobilenet_0.25 with random weights at 32x32, batches of 4: each batch is a real
model call and a commit, so a run lasts long enough to be killed, interrupted or read
from in the middle. The longer torture run is benchmarks/torture.py.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, class_image, features_by_digest, write_tree
from featcache.cache.store import committed_rows
from featcache import open_store
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract.pipeline import ExtractConfig, extract

FAST = dict(base="mobilenet_0.25", weights="none", size=32, batch_size=4, progress=False)
FAST_ARGS = ["--base", "mobilenet_0.25", "--weights", "none", "--size", "32", "--batch-size", "4", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
BAD = {"cats/broken.jpg": "truncated image data (image file ends early)", "dogs/empty.jpg": "empty file (0 bytes)"}


def start(tree, store, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "featcache", "extract", str(tree), str(store), *FAST_ARGS, *extra]
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)




def wait_for_rows(proc, store, rows, timeout=120.0) -> None:
    deadline = time.time() + timeout
    while committed_rows(store) < rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def tree_with_bad_files(root, per_class):
    write_tree(root, per_class=per_class)
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    return root




def check_complete(store, name, n_images):
    """Every good image exactly once, nothing else stored, the bad ones failed exactly once."""
    with open_store(store) as s:
        fs = s[name]
        digests, paths = fs.column("digests"), fs.column("paths")
        assert fs.n_committed == len(fs.rows()) == n_images  # no stale or duplicated rows stored
        assert len(set(digests)) == len(set(paths)) == n_images
        assert dict(fs.failures()) == BAD and len(fs.failures()) == len(BAD)


def test_torture_sigkill_at_random_moments_then_resume_equals_clean_run(tmp_path):
    tree = tree_with_bad_files(tmp_path / "i", per_class=80)
    store = tmp_path / "tortured.h5"
    rng = random.Random(20240611)
    kills = []  # (rows committed when the run started, rows committed when it was killed)
    for k in range(4):
        proc = start(tree, store)
        rows_before = committed_rows(store)
        if k == 0:  # any moment up to the first commit: interpreter and TF start-up, model build, store set-up
            # (not later: on a fast machine a late kill leaves too few rows for the mid-extraction kills)
            deadline = time.time() + rng.uniform(0.5, 6.0)
            while time.time() < deadline and committed_rows(store) == 0 and proc.poll() is None:
                time.sleep(0.01)
        else:  # mid-extraction: a few batches past what the last run left
            wait_for_rows(proc, store, rows_before + rng.randint(4, 20))
            time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append((rows_before, committed_rows(store)))
        proc.communicate()
    assert len(kills) >= 3, kills  # the kills landed in running processes
    assert sum(before < after < 160 for before, after in kills) >= 2, kills  # and in the middle of extracting

    before = committed_rows(store)
    final = extract(str(tree), str(store), ExtractConfig(**FAST))
    assert final["reused"] == before and final["extracted"] == 160 - before and final["failed"] == 2
    check_complete(store, final["feature_set"], 160)

    clean = extract(str(tree), str(tmp_path / "clean.h5"), ExtractConfig(**FAST))
    ours, reference = features_by_digest(store, final["feature_set"]), features_by_digest(tmp_path / "clean.h5", clean["feature_set"])
    assert sorted(ours) == sorted(reference)
    for digest, feature in ours.items():
        np.testing.assert_allclose(feature, reference[digest], rtol=1e-4, atol=1e-5)


INTERRUPTED = re.compile(r"interrupted: (\d+) images committed to (.+); run the same command again to resume")


def test_sigint_and_sigterm_commit_what_is_done_and_say_how_to_resume(tmp_path):
    tree = tree_with_bad_files(tmp_path / "i", per_class=80)
    store = tmp_path / "s.h5"
    done = 0
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        proc = start(tree, store)
        wait_for_rows(proc, store, done + 8)
        proc.send_signal(signal.SIGSTOP)  # the signal then surely meets the run mid-extraction
        proc.send_signal(sig)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == status, err
        assert "Traceback" not in err
        match = INTERRUPTED.fullmatch(err.strip().splitlines()[-1])
        assert match and match.group(2) == str(store), err
        n = int(match.group(1))
        with open_store(store) as s:  # the store closed cleanly: it says exactly what was committed
            fs = s[s.feature_set_names()[0]]
            assert len(fs.rows()) == fs.n_committed == n
        assert done + 8 <= n < 160
        done = n
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    final = extract(str(tree), str(store), ExtractConfig(**FAST))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored after
    assert final["reused"] == done and final["extracted"] == 160 - done
    check_complete(store, final["feature_set"], 160)


def test_second_writer_is_refused_at_once_and_readers_see_consistent_snapshots(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=200)
    store = tmp_path / "s.h5"
    first = start(tree, store, "--batch-size", "2", "--json")  # batches of 2: many commits to read between
    wait_for_rows(first, store, 4)
    first.send_signal(signal.SIGSTOP)  # held mid-run (as a slow run would be), whatever the machine's speed
    try:
        second = subprocess.run([sys.executable, "-m", "featcache", "extract", str(tree), str(store), *FAST_ARGS,
                                 "--batch-size", "2"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=120)
        paused_at = committed_rows(store)
    finally:
        first.send_signal(signal.SIGCONT)
    assert paused_at < 400 and second.returncode == 1
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: {store}: another featcache process is writing this store; "
        "wait for it to finish or write to another store")

    runner, seen, errors = CliRunner(), set(), 0
    while first.poll() is None:
        result = runner.invoke(cli, ["info", str(store), "--json"])
        if result.exit_code != 0:  # allowed: a clear one-line error, never garbage
            assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
            assert "try again in a moment" in result.stderr, result.stderr
            errors += 1
            continue
        for fs in json.loads(result.stdout)["feature_sets"]:
            n = fs["rows_active"]
            assert fs["shape"][0] == n == fs["rows_stored"]
            assert sum(sum(c.values()) for c in fs["counts"].values()) == n
            seen.add(n)
        with open_store(store) as s:
            for name in s.feature_set_names():
                fs = s[name]
                x, y = fs.load()
                assert len(x) == len(y) == len(fs.column("paths")) == fs.n_committed
                assert np.isfinite(x).all() and set(np.unique(y)) <= {0, 1}
    out, err = first.communicate()
    assert first.returncode == 0, err
    result = json.loads(out)
    assert result["extracted"] == 400 and result["failed"] == 0
    assert len({n for n in seen if 0 < n < 400}) >= 2, (seen, errors)  # really read mid-write
    with open_store(store) as s:
        assert len(set(s[result["feature_set"]].column("digests"))) == 400


def test_store_left_mid_set_up_by_a_killed_writer_is_readable_and_resumes(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    first = extract(str(image_tree), str(store), ExtractConfig(base="pixels", size=8, progress=False))
    # A writer in its set-up step has the file open outside SWMR: HDF5 turns SWMR readers away.
    code = ("import time; from featcache.cache.writer import StoreWriter; "
            f"w = StoreWriter({str(store)!r}); w.file.flush(); print('open', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code], env=ENV, cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        busy = CliRunner().invoke(cli, ["info", str(store)])
        assert busy.exit_code == 1 and busy.stderr == (
            f"error: {store}: a featcache run is setting the store up (or was killed doing so); "
            "try again in a moment, or run featcache extract on it to repair it\n")
    finally:
        holder.send_signal(signal.SIGKILL)  # killed right there: the mark stays behind
        holder.communicate()
    with pytest.raises(OSError, match="not already open for SWMR writing"):
        h5py.File(store, "r", libver="latest", swmr=True, locking=False)
    # The next reader finds no writer holding the lock, clears the stale mark and reads.
    info = CliRunner().invoke(cli, ["info", str(store), "--json"])
    assert info.exit_code == 0, info.output
    assert json.loads(info.stdout)["feature_sets"][0]["rows_active"] == 12
    again = extract(str(image_tree), str(store), ExtractConfig(base="pixels", size=8, progress=False))
    assert again["feature_set"] == first["feature_set"] and again["reused"] == 12 and again["extracted"] == 0


def test_reader_opened_before_a_run_reads_the_paths_and_failures_it_appended(tmp_path):
    """Text written after a reader opened the file (paths, failure reasons) must be readable by
    it: HDF5 variable-length strings were not (their heap lay past the reader's end of file)."""
    tree = write_tree(tmp_path / "i", per_class=2)
    store = tmp_path / "s.h5"
    args = ["--base", "pixels", "--size", "8", "--batch-size", "4", "--no-progress", "--json"]
    name = extract(str(tree), str(store), ExtractConfig(base="pixels", size=8, progress=False))["feature_set"]
    with open_store(store) as reader:
        assert len(reader[name].column("paths")) == 4
        long_name = "a-rather-long-image-name-" * 6
        for i in range(300):  # many batches of long paths: new file space after the reader opened
            class_image(i % 2, 1000 + i).save(tree / ("cats", "dogs")[i % 2] / f"{long_name}{i:03d}.jpg")
        tree_with_bad_files(tree, per_class=2)
        run = subprocess.run([sys.executable, "-m", "featcache", "extract", str(tree), str(store), *args],
                             env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and json.loads(run.stdout)["extracted"] == 300, run.stderr
        fs = reader[name]  # the same open file, the counter read afresh
        paths = fs.column("paths")
        assert fs.n_committed == len(paths) == 304 and len(set(paths)) == 304
        assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*.jpg") if p.name not in
                      ("broken.jpg", "empty.jpg")) == sorted(paths)
        assert dict(fs.failures()) == BAD


def test_reader_open_across_a_run_that_relists_is_told_to_open_again(image_tree, tmp_path):
    """A reader keeps the attributes it first saw (HDF5 SWMR); a run that adds a class rewrites
    class_names, so the old reader must not pair new labels with old names."""
    store = tmp_path / "s.h5"
    config = ExtractConfig(base="pixels", size=8, progress=False)
    name = extract(str(image_tree), str(store), config)["feature_set"]
    with open_store(store) as reader:
        assert reader[name].class_names == ["cats", "dogs"]
        write_tree(image_tree, per_class=2, classes=("birds",))
        run = subprocess.run([sys.executable, "-m", "featcache", "extract", str(image_tree), str(store),
                              "--base", "pixels", "--size", "8", "--no-progress"],
                             env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        with pytest.raises(FeatcacheError, match=f"^{re.escape(str(store))}: feature set {name} was re-listed "
                           "by a featcache run after this store was opened; open the store again"):
            reader[name]
    with open_store(store) as again:
        fs = again[name]
        assert fs.class_names == ["birds", "cats", "dogs"] and fs.n_committed == 14
        assert fs.summary()["rows_active"] == 14


def test_listing_left_half_written_by_a_killed_set_up_is_repaired_by_the_next_run(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    config = ExtractConfig(base="pixels", size=8, progress=False)
    name = extract(str(image_tree), str(store), config)["feature_set"]
    with h5py.File(store, "r+", libver="latest") as f:  # the attribute reached disk, the counter did not
        f["feature_sets"][name].attrs["listing_generation"] = 2
    info = CliRunner().invoke(cli, ["info", str(store)])
    assert info.exit_code == 1 and "if that run was killed setting up, run it again to repair" in info.stderr
    again = extract(str(image_tree), str(store), config)
    assert again["reused"] == 12 and again["extracted"] == 0
    info = CliRunner().invoke(cli, ["info", str(store), "--json"])
    assert info.exit_code == 0 and json.loads(info.stdout)["feature_sets"][0]["rows_active"] == 12
