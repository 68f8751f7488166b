"""Re-runs by file stat, bulk copies of reused features, and the run's time report (issue 23).

Every re-run is compared row for row (by path: digest, label, split, features) with a fresh
extraction of the same tree into a new store."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, write_tree
from featcache import open_store
from featcache.cache.layout import STAT_COLUMNS, UNKNOWN_SIZE
from featcache.cache.store import committed_rows
from featcache.cli import cli
from featcache.extract import filestat, plan
from featcache.extract.pipeline import ExtractConfig, extract

PIXELS = dict(base="pixels", size=8, weights="none", batch_size=4, progress=False)
PIXEL_ARGS = ["--base", "pixels", "--size", "8", "--weights", "none", "--batch-size", "4", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
OLD = time.time() - 3600  # mtimes well before any run: not racy


def backdate(root, when=OLD):
    for dirpath, _, files in os.walk(root):
        for name in files:
            os.utime(os.path.join(dirpath, name), (when, when))


def bmp_tree(root, per_class=6):
    """BMP images: their pixel bytes can change without the file's size changing."""
    write_tree(root, per_class=per_class, ext=".bmp")
    backdate(root)
    return root


def rows_by_path(store) -> dict:
    """Active rows as path -> (digest, label, split, features)."""
    with open_store(store) as s:
        fs = s.select()
        rows = fs.rows()
        cols = [fs.column(c)[rows] for c in ("paths", "digests", "labels", "splits")]
        return {p: (d, int(y), sp, f) for p, d, y, sp, f in zip(*cols, fs.read(rows))}


def assert_same_as_fresh(tree, store, tmp_path):
    fresh = tmp_path / f"fresh-{time.monotonic_ns()}.h5"
    extract(str(tree), str(fresh), ExtractConfig(**PIXELS))
    ours, reference = rows_by_path(store), rows_by_path(fresh)
    assert ours.keys() == reference.keys() and ours
    for path, (digest, label, split, features) in reference.items():
        assert ours[path][:3] == (digest, label, split), path
        np.testing.assert_array_equal(ours[path][3], features, err_msg=path)


def stored_stats(store) -> dict:
    """Active rows as path -> (size, mtime_ns, ctime_ns, inode)."""
    with open_store(store) as s:
        fs = s.select()
        rows = fs.rows()
        columns = [fs.column(c)[rows] for c in STAT_COLUMNS]
        return {p: tuple(int(c[i]) for c in columns) for i, p in enumerate(fs.column("paths")[rows])}


def counting_reads(monkeypatch, module, name: str) -> list[str]:
    """The paths ``module.name(path)`` is called with from here on (relative to the cwd)."""
    seen = []
    real = getattr(module, name)

    def counting(path):
        seen.append(os.path.relpath(path))
        return real(path)

    monkeypatch.setattr(module, name, counting)
    return seen


@pytest.fixture
def reads(monkeypatch):
    """The paths whose bytes a run reads to hash them."""
    return counting_reads(monkeypatch, plan, "file_digest")


def rel(tree, *paths):
    return sorted(os.path.relpath(tree / p) for p in paths)


def test_rerun_reads_only_files_whose_stat_changed_and_equals_a_fresh_run(tmp_path, reads):
    tree = bmp_tree(tmp_path / "i", per_class=6)
    store = tmp_path / "s.h5"
    first = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert first["extracted"] == first["files_read"] == 12
    st = os.stat(tree / "cats/cats.000.bmp")
    assert stored_stats(store)["cats/cats.000.bmp"] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    reads.clear()
    again = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert (again["files_read"], again["extracted"], again["reused"], reads) == (0, 0, 12, [])

    os.utime(tree / "cats/cats.001.bmp", (OLD + 60, OLD + 60))  # touched, same bytes
    changed = tree / "cats/cats.002.bmp"  # new bytes, same size, mtime put back
    data = bytearray(changed.read_bytes())
    data[-30:] = bytes(255 - b for b in data[-30:])
    changed.write_bytes(bytes(data))
    os.utime(changed, (OLD, OLD))  # (the kernel still moves its ctime: it is read again)
    os.rename(tree / "dogs/dogs.000.bmp", tree / "dogs/moved.bmp")  # moved
    shutil.copy(tree / "dogs/dogs.001.bmp", tree / "cats/twin-a.bmp")  # twins of a stored file
    shutil.copy(tree / "dogs/dogs.001.bmp", tree / "cats/twin-b.bmp")
    shutil.copy(tree / "dogs/dogs.002.bmp", tree / "dogs/new.bmp")
    data = bytearray((tree / "dogs/new.bmp").read_bytes())
    data[-3:] = b"\x01\x02\x03"
    (tree / "dogs/new.bmp").write_bytes(bytes(data))  # new bytes
    shutil.copy(tree / "dogs/new.bmp", tree / "dogs/new-twin.bmp")  # twins within the listing
    backdate(tree / "dogs", OLD + 120)  # not racy (their ctimes moved: dogs/* are read again)
    os.utime(tree / "cats/twin-a.bmp", (OLD + 120, OLD + 120))
    os.utime(tree / "cats/twin-b.bmp", (OLD + 120, OLD + 120))
    reads.clear()
    result = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    expected_reads = rel(tree, "cats/cats.001.bmp", "cats/cats.002.bmp", "cats/twin-a.bmp", "cats/twin-b.bmp",
                         *(f"dogs/{p.name}" for p in (tree / "dogs").iterdir()))
    assert sorted(reads) == expected_reads
    assert result["extracted"] == 2  # the changed file and one of the new twins
    assert result["copied"] == 4  # moved, twin-a, twin-b (from stored rows) and the new twin
    assert_same_as_fresh(tree, store, tmp_path)
    reads.clear()
    assert extract(str(tree), str(store), ExtractConfig(**PIXELS))["files_read"] == 0 and reads == []


def test_rehash_reads_every_file_and_catches_what_the_stat_cannot(tmp_path, reads, monkeypatch):
    # A file system whose ctime and inode say nothing (both read as 0): new bytes of the same
    # size with the mtime put back look unchanged, as they do to git; --rehash finds them.
    real = filestat.stat_listing
    monkeypatch.setattr(filestat, "stat_listing", lambda listing: real(listing) * np.array([1, 1, 0, 0]))
    monkeypatch.setattr("featcache.extract.pipeline.stat_listing", filestat.stat_listing)
    tree = bmp_tree(tmp_path / "i", per_class=4)
    store = tmp_path / "s.h5"
    extract(str(tree), str(store), ExtractConfig(**PIXELS))
    changed = tree / "dogs/dogs.003.bmp"
    data = bytearray(changed.read_bytes())
    data[-12:] = bytes(12)
    changed.write_bytes(bytes(data))
    os.utime(changed, (OLD, OLD))
    stale = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert stale["files_read"] == 0 and stale["extracted"] == 0  # the stat cannot tell
    reads.clear()
    fixed = extract(str(tree), str(store), ExtractConfig(**PIXELS, rehash=True))
    assert fixed["files_read"] == 8 and len(reads) == 8 and fixed["extracted"] == 1
    assert_same_as_fresh(tree, store, tmp_path)


def test_files_modified_just_before_the_run_are_hashed_again_next_time(tmp_path, reads):
    tree = write_tree(tmp_path / "i", per_class=3)  # written now: racy
    store = tmp_path / "s.h5"
    extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert {s[0] for s in stored_stats(store).values()} == {UNKNOWN_SIZE}
    assert extract(str(tree), str(store), ExtractConfig(**PIXELS))["files_read"] == 6
    backdate(tree)
    assert extract(str(tree), str(store), ExtractConfig(**PIXELS))["files_read"] == 6  # records them
    assert extract(str(tree), str(store), ExtractConfig(**PIXELS))["files_read"] == 0


def test_a_store_written_before_the_stat_columns_hashes_once_and_gains_them(tmp_path):
    tree = bmp_tree(tmp_path / "i", per_class=5)
    store = tmp_path / "old.h5"
    extract(str(tree), str(store), ExtractConfig(**PIXELS))
    with h5py.File(store, "r+") as f:  # what featcache wrote before this change
        group = next(iter(f["feature_sets"].values()))
        for name in STAT_COLUMNS:
            del group[name]
    assert CliRunner().invoke(cli, ["verify", str(store), "--json"]).exit_code == 0
    rerun = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert (rerun["files_read"], rerun["reused"], rerun["extracted"]) == (10, 10, 0)
    st = os.stat(tree / "dogs/dogs.004.bmp")
    assert stored_stats(store)["dogs/dogs.004.bmp"] == (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    shutil.copy(tree / "dogs/dogs.004.bmp", tree / "cats/copy.bmp")
    os.utime(tree / "cats/copy.bmp", (OLD, OLD))
    after = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert (after["files_read"], after["copied"], after["extracted"]) == (1, 1, 0)
    verified = json.loads(CliRunner().invoke(cli, ["verify", str(store), "--json"]).stdout)
    assert verified["ok"] and verified["unchecked"] == []
    assert_same_as_fresh(tree, store, tmp_path)


def _chunk_offset(store, column):
    with h5py.File(store, "r") as f:
        return next(iter(f["feature_sets"].values()))[column].id.get_chunk_info(0).byte_offset


def test_damaged_stat_columns_are_caught_by_verify_and_healed_by_repair_and_extract(tmp_path, reads):
    tree = bmp_tree(tmp_path / "i", per_class=5)
    store = tmp_path / "s.h5"
    extract(str(tree), str(store), ExtractConfig(**PIXELS))
    clean = rows_by_path(store)
    with open(store, "r+b") as fh:  # a flipped bit in the mtime column: Fletcher-32 catches it
        fh.seek(_chunk_offset(store, "file_mtimes_ns") + 3)
        byte = fh.read(1)[0]
        fh.seek(-1, 1)
        fh.write(bytes([byte ^ 0x10]))
    result = CliRunner().invoke(cli, ["verify", str(store), "--json"])
    report = json.loads(result.stdout)
    assert result.exit_code != 0 and not report["ok"]
    assert [d["what"] for d in report["feature_sets"][0]["damage"]] == ["file_mtimes_ns column"]
    assert report["feature_sets"][0]["rows_lost"] == 0  # a stat record is not needed to use the row
    refused = CliRunner().invoke(cli, ["extract", str(tree), str(store), *PIXEL_ARGS])
    assert refused.exit_code == 1 and "file_mtimes_ns" in refused.output
    assert CliRunner().invoke(cli, ["repair", str(store)]).exit_code == 0
    reads.clear()
    healed = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert healed["extracted"] == 0 and healed["files_read"] == 10  # hashed again: their stat is unknown
    assert {p: r[:3] for p, r in rows_by_path(store).items()} == {p: r[:3] for p, r in clean.items()}
    assert extract(str(tree), str(store), ExtractConfig(**PIXELS))["files_read"] == 0


def test_an_impossible_size_is_caught_by_verify(tmp_path):
    tree = bmp_tree(tmp_path / "i", per_class=3)
    store = tmp_path / "s.h5"
    extract(str(tree), str(store), ExtractConfig(**PIXELS))
    with h5py.File(store, "r+") as f:  # written through HDF5: its checksum is right, the value is not
        next(iter(f["feature_sets"].values()))["file_sizes"][2] = -7
    report = json.loads(CliRunner().invoke(cli, ["verify", str(store), "--json"]).stdout)
    damage = report["feature_sets"][0]["damage"]
    assert not report["ok"] and damage[0]["what"] == "file_sizes column" and damage[0]["rows"] == [2, 2]


def test_moved_rows_are_copied_in_batches_row_for_row(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(plan, "COPY_BATCH_MAX_ROWS", 3)  # several batches, each with its own commit
    commits = []
    monkeypatch.setattr(plan.StoreWriter, "commit", lambda self, real=plan.StoreWriter.commit: (commits.append(1), real(self)))
    tree = bmp_tree(tmp_path / "i", per_class=8)
    store = tmp_path / "s.h5"
    extract(str(tree), str(store), ExtractConfig(**PIXELS))
    for name in sorted(os.listdir(tree / "cats"))[::2]:  # every other cat moved: sparse source rows
        os.rename(tree / "cats" / name, tree / "dogs" / f"was-{name}")
    for i, name in enumerate(sorted(os.listdir(tree / "dogs"))[:3]):  # copies in reverse source order
        shutil.copy(tree / "dogs" / name, tree / "cats" / f"copy-{9 - i}.bmp")
        os.utime(tree / "cats" / f"copy-{9 - i}.bmp", (OLD, OLD))
    commits.clear()
    result = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert result["copied"] == 7 and result["extracted"] == 0 and len(commits) == 1 + 3  # set-up, 3 batches
    assert result["copy_seconds"] > 0
    assert_same_as_fresh(tree, store, tmp_path)


KILL_DURING_COPY = """
import sys, time
from featcache.extract import plan
from featcache.cli import cli
plan.COPY_BATCH_MAX_ROWS = 4
real = plan.StoreWriter.commit
def slow_commit(self):
    real(self)
    time.sleep(0.15)
plan.StoreWriter.commit = slow_commit
cli(sys.argv[1:])
"""


def test_kill_9_during_a_bulk_copy_loses_nothing_committed(tmp_path):
    tree = bmp_tree(tmp_path / "i", per_class=30)
    store = tmp_path / "s.h5"
    extract(str(tree), str(store), ExtractConfig(**PIXELS))
    os.rename(tree / "cats", tree / "felines")  # 30 rows to copy: 8 batches of 4
    before = committed_rows(store)
    proc = subprocess.Popen([sys.executable, "-c", KILL_DURING_COPY, "extract", str(tree), str(store), *PIXEL_ARGS],
                            env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while committed_rows(store) < before + 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    seen = committed_rows(store)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert before + 8 <= seen < before + 30, (before, seen)  # killed in the middle of the copy
    after_kill = committed_rows(store)
    assert after_kill >= seen  # every committed batch is still there
    resumed = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    assert resumed["extracted"] == 0 and resumed["reused"] == 60
    assert resumed["copied"] == 30 - (after_kill - before)  # the copies committed before the kill are kept
    assert_same_as_fresh(tree, store, tmp_path)
    verified = json.loads(CliRunner().invoke(cli, ["verify", str(store), "--json"]).stdout)
    assert verified["ok"]


def test_json_says_where_the_time_went_and_rehash_is_an_option(tmp_path):
    tree = bmp_tree(tmp_path / "i", per_class=3)
    store = tmp_path / "s.h5"
    first = CliRunner().invoke(cli, ["extract", str(tree), str(store), *PIXEL_ARGS, "--json"])
    out = json.loads(first.output)
    for key in ("list_seconds", "hash_seconds", "setup_seconds", "copy_seconds", "write_seconds"):
        assert out[key] >= 0, key
    assert out["wall_images_per_second"] == pytest.approx(6 / out["seconds"], rel=0.05)
    assert out["files_read"] == 6 and out["write_seconds"] > 0
    again = json.loads(CliRunner().invoke(cli, ["extract", str(tree), str(store), *PIXEL_ARGS, "--json"]).stdout)
    assert again["files_read"] == 0
    rehashed = json.loads(CliRunner().invoke(cli, ["extract", str(tree), str(store), *PIXEL_ARGS, "--json",
                                                   "--rehash"]).output)
    assert rehashed["files_read"] == 6 and rehashed["reused"] == 6


@pytest.fixture
def decoder_reads(monkeypatch):
    """The paths whose bytes the decoders read (in this process: the threads decoder)."""
    from featcache.extract.images import decode

    return counting_reads(monkeypatch, decode, "read_bytes")


def twin_tree(root):
    """8 distinct cats and dogs, plus byte-identical twins: in one batch, across batches, of a
    dog in the cats folder, and an unreadable file."""
    tree = bmp_tree(root, per_class=4)
    for name in ("cats/cats.000.bmp", "cats/cats.000.bmp", "dogs/dogs.003.bmp"):
        shutil.copy(tree / name, tree / "cats" / f"twin-{len(os.listdir(tree / 'cats'))}.bmp")
    shutil.copy(tree / "cats/cats.001.bmp", tree / "dogs/zz-twin.bmp")
    (tree / "dogs/empty.bmp").write_bytes(b"")
    backdate(tree)
    return tree


def test_a_cold_run_reads_each_file_once_and_extracts_twins_once(tmp_path, reads, decoder_reads):
    tree = twin_tree(tmp_path / "i")
    store = tmp_path / "cold.h5"
    cold = extract(str(tree), str(store), ExtractConfig(**PIXELS))
    listed = rel(tree, *(f"{c}/{n}" for c in ("cats", "dogs") for n in os.listdir(tree / c)))
    assert reads == [] and sorted(decoder_reads) == listed  # no pass before the model: one read each
    assert (cold["extracted"], cold["copied"], cold["failed"], cold["files_read"]) == (8, 4, 1, 13)
    assert cold["failures"] == [{"path": "dogs/empty.bmp", "reason": "empty file (0 bytes)"}]
    rows = rows_by_path(store)
    for twin, of in (("cats/twin-4.bmp", "cats/cats.000.bmp"), ("cats/twin-5.bmp", "cats/cats.000.bmp"),
                     ("cats/twin-6.bmp", "dogs/dogs.003.bmp"), ("dogs/zz-twin.bmp", "cats/cats.001.bmp")):
        assert rows[twin][0] == rows[of][0] == hashlib.sha256((tree / of).read_bytes()).hexdigest()
        np.testing.assert_array_equal(rows[twin][3], rows[of][3])
    # The same rows as a store grown in two runs (the second one hashing before its plan).
    grown = tmp_path / "grown.h5"
    half = tmp_path / "half"
    shutil.copytree(tree, half, copy_function=shutil.copy2)
    for name in ("dogs", "cats/twin-5.bmp", "cats/twin-6.bmp"):
        shutil.rmtree(half / name) if (half / name).is_dir() else os.remove(half / name)
    (half / "dogs").mkdir()
    extract(str(half), str(grown), ExtractConfig(**PIXELS))
    shutil.rmtree(half)
    shutil.copytree(tree, half, copy_function=shutil.copy2)
    extract(str(half), str(grown), ExtractConfig(**PIXELS))
    theirs = rows_by_path(grown)
    assert rows.keys() == theirs.keys()
    for path, (digest, label, split, features) in theirs.items():
        assert rows[path][:3] == (digest, label, split), path
        np.testing.assert_array_equal(rows[path][3], features, err_msg=path)


def test_a_cold_run_decodes_each_content_once(tmp_path, monkeypatch):
    """Twins are claimed by the decoder that hashes them first: the others skip the decode."""
    from featcache.extract.images import decode

    decoded, real = [], decode.decode_image
    monkeypatch.setattr(decode, "decode_image", lambda data, *a, **k: decoded.append(data) or real(data, *a, **k))
    tree = twin_tree(tmp_path / "i")
    result = extract(str(tree), str(tmp_path / "s.h5"), ExtractConfig(**PIXELS))
    assert (result["extracted"], result["copied"], result["failed"]) == (8, 4, 1)
    assert len(decoded) == len(set(decoded)) == 9  # 8 images and the empty file (whose decode fails), once each


def test_progress_counts_twins(tmp_path, monkeypatch):
    import tqdm

    steps = []

    class Bar:
        def __init__(self, total, **options):
            steps.append(total)

        def update(self, n):
            steps.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    extract(str(twin_tree(tmp_path / "i")), str(tmp_path / "s.h5"), ExtractConfig(**{**PIXELS, "progress": True}))
    assert steps[0] == sum(steps[1:]) == 13  # 8 extracted, 4 twins, 1 failure


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_twins_of_a_broken_image_fail_as_it_does(tmp_path, decode):
    tree = bmp_tree(tmp_path / "i", per_class=2)
    (tree / "cats/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    shutil.copy(tree / "cats/broken.jpg", tree / "dogs/broken-twin.jpg")
    shutil.copy(tree / "cats/broken.jpg", tree / "dogs/zz-broken-twin.jpg")
    result = extract(str(tree), str(tmp_path / "s.h5"), ExtractConfig(**PIXELS, decode=decode, decode_workers=2))
    assert (result["extracted"], result["failed"]) == (4, 3)
    reasons = {f["path"]: f["reason"] for f in result["failures"]}
    assert sorted(reasons) == ["cats/broken.jpg", "dogs/broken-twin.jpg", "dogs/zz-broken-twin.jpg"]
    assert len(set(reasons.values())) == 1 and "broken" not in next(iter(reasons.values()))
    with open_store(tmp_path / "s.h5") as s:
        assert dict(s.select().failures()) == reasons  # the store records the twins' failures too


def test_shared_claims_across_processes_and_a_full_table(tmp_path):
    from featcache.extract.images.claims import LocalClaims, SharedClaims

    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(200)]
    shared = SharedClaims.create(len(digests))
    try:
        other = SharedClaims.attach(shared.handle())  # as a decoding process sees it
        assert [shared.claim(d) for d in digests[:100]] == [True] * 100
        assert [other.claim(d) for d in digests] == [False] * 100 + [True] * 100
        assert [shared.claim(d) for d in digests] == [False] * 200
        other.close()
    finally:
        shared.close()
    local = LocalClaims()
    assert [local.claim(d) for d in digests[:3] * 2] == [True] * 3 + [False] * 3


def test_decoding_processes_hash_what_they_decode(tmp_path, reads):
    tree = twin_tree(tmp_path / "i")
    threads, processes = tmp_path / "t.h5", tmp_path / "p.h5"
    extract(str(tree), str(threads), ExtractConfig(**PIXELS))
    result = extract(str(tree), str(processes), ExtractConfig(**PIXELS, decode="processes", decode_workers=2))
    assert reads == [] and (result["extracted"], result["copied"], result["failed"]) == (8, 4, 1)
    ours, reference = rows_by_path(processes), rows_by_path(threads)
    assert ours.keys() == reference.keys()
    for path, (digest, label, split, features) in reference.items():
        assert ours[path][:3] == (digest, label, split), path
        np.testing.assert_array_equal(ours[path][3], features, err_msg=path)


def test_merge_carries_the_shards_stat_records(tmp_path):
    from featcache.cache.shards import merge
    from featcache.extract.scale.sharding import run_shard, shard_store_name

    tree = bmp_tree(tmp_path / "i", per_class=5)
    single = tmp_path / "single.h5"
    extract(str(tree), str(single), ExtractConfig(**PIXELS))
    shards = [tmp_path / shard_store_name(i, 2) for i in range(2)]
    for i, path in enumerate(shards):
        run_shard(str(tree), str(path), ExtractConfig(**PIXELS), (i, 2))
    merge([str(p) for p in shards], str(tmp_path / "merged.h5"))
    expected = stored_stats(single)
    assert UNKNOWN_SIZE not in {s[0] for s in expected.values()}
    assert stored_stats(tmp_path / "merged.h5") == expected
    verified = json.loads(CliRunner().invoke(cli, ["verify", str(tmp_path / "merged.h5"), "--json"]).stdout)
    assert verified["ok"] and verified["unchecked"] == []

    old_paths = set(rows_by_path(shards[1]))
    with h5py.File(shards[1], "r+") as f:  # a shard written before the stat columns
        group = next(iter(f["feature_sets"].values()))
        for name in STAT_COLUMNS:
            del group[name]
    merge([str(p) for p in shards], str(tmp_path / "mixed.h5"))
    mixed = stored_stats(tmp_path / "mixed.h5")
    assert mixed.keys() == expected.keys() and old_paths
    assert all(mixed[p][0] == UNKNOWN_SIZE if p in old_paths else mixed[p] == expected[p] for p in expected)
