"""Sharded extraction (--shard I/N), commit markers, and merging shards into virtual datasets."""
import json
import os
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, assert_same_rows, class_image, rows_by_digest, write_tree
from featcache import open_store
from featcache.cache.shards import marker_path, merge, read_marker
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract.images.discover import discover
from featcache.extract.pipeline import ExtractConfig, extract
from featcache.extract.scale.sharding import parse_shard, run_shard, select_shard, shard_of, shard_store_name

PIXELS = ["--base", "pixels", "--size", "16", "--no-progress"]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def shard_files(folder, count):
    return [folder / shard_store_name(i, count) for i in range(count)]


def run_shards(tree, folder, count, *options, only=None):
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for i, path in enumerate(shard_files(folder, count)):
        if only is None or i in only:
            r = invoke("extract", tree, path, "--shard", f"{i}/{count}", "--json", *(options or PIXELS))
            assert r.exit_code == 0, r.output
            results[i] = json.loads(r.stdout)
    return results






@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "images", per_class=15)


def test_shard_selection_is_a_stable_partition(tree):
    entries = discover(str(tree)).entries
    parts = [select_shard(entries, i, 3) for i in range(3)]
    assert sorted(e.relpath for p in parts for e in p) == sorted(e.relpath for e in entries)
    assert all(len(p) > 0 for p in parts)
    for i, part in enumerate(parts):
        assert all(shard_of(e.relpath, 3) == i for e in part)
    # Adding images never moves existing ones to another shard.
    for k in range(10):
        class_image(0, 500 + k).save(tree / "cats" / f"added{k}.jpg")
    grown = discover(str(tree)).entries
    for i, part in enumerate(parts):
        assert {e.relpath for e in part} <= {e.relpath for e in select_shard(grown, i, 3)}
    assert parse_shard("2/8") == (2, 8) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ("3/3", "1/0", "a/b", "-1/2", "1"):
        with pytest.raises(FeatcacheError, match=r"expected I/N with 0 <= I < N"):
            parse_shard(bad)


def test_sharded_and_merged_equals_single_run(tree, tmp_path):
    options = ["--base", "pixels", "--size", "64", "--no-progress"]
    single = invoke("extract", tree, tmp_path / "single.h5", "--json", *options)
    assert single.exit_code == 0, single.output
    folder = tmp_path / "run"
    results = run_shards(tree, folder / "shards", 3, *options)
    assert sum(r["shard_images"] for r in results.values()) == 30
    assert all(r["status"] == "extracted" and r["extracted"] == r["shard_images"] for r in results.values())
    assert all(read_marker(p)["feature_sets"] for p in shard_files(folder / "shards", 3))

    out = folder / "merged.h5"
    merged = invoke("merge", *shard_files(folder / "shards", 3), out)
    assert merged.exit_code == 0, merged.output
    assert "merged shards 0, 1, 2 of 3" in merged.stdout
    assert_same_rows(rows_by_digest(tmp_path / "single.h5"), rows_by_digest(out))

    with h5py.File(out, "r") as f:
        ds = f["feature_sets"][json.loads(single.stdout)["feature_set"]]["features"]
        assert ds.is_virtual and ds.shape == (30, 64, 64, 3)
        sources = {vs.file_name for vs in ds.virtual_sources()}
        assert sources == {f"shards/{shard_store_name(i, 3)}" for i in range(3)}  # relative: movable
        feature_bytes = ds.size * ds.dtype.itemsize
    assert os.path.getsize(out) < feature_bytes / 20  # no feature bytes copied

    # `info` and stage-two reads see the merged store like a single-run store.
    info_single = json.loads(invoke("info", tmp_path / "single.h5", "--json").stdout)["feature_sets"][0]
    info_merged = json.loads(invoke("info", out, "--json").stdout)["feature_sets"][0]
    for field in ("feature_set", "key", "shape", "dtype", "class_names", "counts", "rows_active", "failures"):
        assert info_merged[field] == info_single[field], field
    with open_store(tmp_path / "single.h5") as a, open_store(out) as b:
        xa, ya = a.select(backbone="pixels").load("train")
        xb, yb = b.select(backbone="pixels").load("train")
        assert xb.shape == xa.shape and sorted(ya) == sorted(yb)
        order_a = np.lexsort(xa.reshape(len(xa), -1).T)
        order_b = np.lexsort(xb.reshape(len(xb), -1).T)
        np.testing.assert_array_equal(xa[order_a], xb[order_b])
        np.testing.assert_array_equal(ya[order_a], yb[order_b])


def test_mobilenet_shards_equal_single_run(tmp_path):
    tree = write_tree(tmp_path / "images", per_class=5)
    config = ExtractConfig(base="mobilenet_0.25", weights="none", size=32, batch_size=4, progress=False)
    single = extract(str(tree), str(tmp_path / "single.h5"), config)
    paths = [str(tmp_path / shard_store_name(i, 2)) for i in range(2)]
    for i, path in enumerate(paths):
        assert run_shard(str(tree), path, config, (i, 2))["status"] == "extracted"
    result = merge(paths, str(tmp_path / "merged.h5"))
    assert result["feature_sets"][0]["feature_set"] == single["feature_set"]
    assert result["feature_sets"][0]["shape"] == single["shape"]
    # Batches differ between the runs, so compare with a float tolerance.
    assert_same_rows(rows_by_digest(tmp_path / "single.h5"), rows_by_digest(tmp_path / "merged.h5"), exact=False)


def test_merged_folder_can_be_moved_and_missing_shard_is_an_error(tree, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    run_shards(tree, folder / "shards", 2)
    assert invoke("merge", *shard_files(folder / "shards", 2), folder / "m.h5").exit_code == 0
    before = rows_by_digest(folder / "m.h5")
    moved = tmp_path / "elsewhere" / "run2"
    shutil.move(folder, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")  # HDF5 resolves the sources from the merged file's folder
    assert_same_rows(before, rows_by_digest(moved / "m.h5"))
    shard0 = moved / "shards" / shard_store_name(0, 2)
    shutil.copy(shard0, tmp_path / "keep.h5")
    h5py.File(shard0, "w").close()  # replaced by another file
    replaced = invoke("info", moved / "m.h5")
    assert replaced.exit_code == 1
    assert f"shard file shards/{shard_store_name(0, 2)} no longer holds the" in replaced.stderr
    shutil.copy(tmp_path / "keep.h5", shard0)
    os.remove(moved / "shards" / shard_store_name(1, 2))
    info = invoke("info", moved / "m.h5")
    assert info.exit_code == 1
    assert f"its features are read from shard file shards/{shard_store_name(1, 2)}, which is missing" in info.stderr


def _killed_shard(tree, store, shard, kill_at_commit):
    """Run one shard in a subprocess that SIGKILLs itself at its N-th store commit."""
    code = f"""
import os, signal, sys
from featcache.cache.writer import StoreWriter
from featcache.cli import main
real, calls = StoreWriter.commit, [0]
def commit(self):
    real(self)
    calls[0] += 1
    if calls[0] == {kill_at_commit}:
        os.kill(os.getpid(), signal.SIGKILL)
StoreWriter.commit = commit
sys.argv = ["featcache", "extract", {str(tree)!r}, {str(store)!r}, "--shard", {shard!r},
            "--base", "pixels", "--size", "16", "--batch-size", "2", "--no-progress"]
main()
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)


def test_killed_shard_is_redone_and_committed_ones_are_skipped(tree, tmp_path):
    folder = tmp_path / "shards"
    files = shard_files(folder, 3)
    entries = discover(str(tree)).entries
    killed = max(range(3), key=lambda i: len(select_shard(entries, i, 3)))
    others = [i for i in range(3) if i != killed]
    assert len(select_shard(entries, killed, 3)) > 4
    first = run_shards(tree, folder, 3, only=set(others))
    # Commits: 1 before the model runs, then one per batch of 2: killed right after 4 rows.
    proc = _killed_shard(tree, files[killed], f"{killed}/3", kill_at_commit=3)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    marker = read_marker(files[killed])
    assert marker["shard"] == [killed, 3] and marker["feature_sets"] == {}  # started, not committed
    with open_store(files[killed]) as s:
        assert s.select().n_committed == 4

    refused = invoke("merge", *files, tmp_path / "m.h5")
    assert refused.exit_code == 1
    assert f"uncommitted shards (their run did not finish; re-run them) {killed}/3 ({files[killed]})" in refused.stderr

    stamps = {i: (os.stat(files[i]).st_mtime_ns, os.stat(marker_path(files[i])).st_mtime_ns) for i in others}
    rerun = run_shards(tree, folder, 3)
    for i in others:
        assert rerun[i]["status"] == "skipped" and rerun[i]["extracted"] == 0
        assert rerun[i]["shape"] == first[i]["shape"]
        assert (os.stat(files[i]).st_mtime_ns, os.stat(marker_path(files[i])).st_mtime_ns) == stamps[i]
    assert rerun[killed]["status"] == "extracted"
    assert rerun[killed]["extracted"] == rerun[killed]["shard_images"] - 4  # resumed, not restarted
    assert invoke("merge", *files, tmp_path / "m.h5").exit_code == 0
    extract(str(tree), str(tmp_path / "single.h5"), ExtractConfig(base="pixels", size=16, progress=False))
    assert_same_rows(rows_by_digest(tmp_path / "single.h5"), rows_by_digest(tmp_path / "m.h5"))


def test_changed_listing_reruns_only_its_shard(tree, tmp_path):
    folder = tmp_path / "shards"
    run_shards(tree, folder, 3)
    name = next(f"dogs/new{k}.jpg" for k in range(100) if shard_of(f"dogs/new{k}.jpg", 3) == 2)
    class_image(1, 900).save(tree / name)
    rerun = run_shards(tree, folder, 3)
    assert [rerun[i]["status"] for i in range(3)] == ["skipped", "skipped", "extracted"]
    assert rerun[2]["extracted"] == 1
    assert invoke("merge", *shard_files(folder, 3), tmp_path / "m.h5").exit_code == 0
    assert name in {v[2] for v in rows_by_digest(tmp_path / "m.h5").values()}


def test_merge_refuses_mismatched_keys_and_class_names(tree, tmp_path):
    folder = tmp_path / "shards"
    a, b = shard_files(folder, 2)
    run_shards(tree, folder, 2, *PIXELS, only={0})
    run_shards(tree, folder, 2, "--base", "pixels", "--size", "8", "--no-progress", only={1})
    result = invoke("merge", a, b, tmp_path / "m.h5")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: merge: the shards hold different feature sets (keys differ): ")
    assert f"{a}: pixels-16-output-none-float32-" in result.stderr and f"{b}: pixels-8-output-none-float32-" in result.stderr
    assert not (tmp_path / "m.h5").exists()
    # Shard 0 also gets the size-8 set: that one is committed in both and can be merged alone.
    eight = run_shards(tree, folder, 2, "--base", "pixels", "--size", "8", "--no-progress", only={0})[0]["feature_set"]
    assert invoke("merge", a, b, tmp_path / "m.h5").exit_code == 1
    chosen = invoke("merge", a, b, tmp_path / "m.h5", "--feature-set", eight, "--json")
    assert chosen.exit_code == 0, chosen.output
    assert [fs["feature_set"] for fs in json.loads(chosen.stdout)["feature_sets"]] == [eight]
    with open_store(tmp_path / "m.h5") as s:
        assert s.feature_set_names() == [eight] and len(s[eight].rows()) == 30

    other = write_tree(tmp_path / "more", per_class=15, classes=("cats", "dogs", "birds"))
    shutil.rmtree(folder)
    run_shards(tree, folder, 2, only={0})
    run_shards(other, folder, 2, only={1})
    result = invoke("merge", a, b, tmp_path / "m.h5")
    assert result.exit_code == 1
    assert f"merge: {a} and {b} disagree on class_names of pixels-16-" in result.stderr


def test_merge_reports_missing_shards(tree, tmp_path):
    folder = tmp_path / "shards"
    files = shard_files(folder, 3)
    results = run_shards(tree, folder, 3, only={0, 2})
    refused = invoke("merge", files[0], files[2], tmp_path / "m.h5")
    assert refused.exit_code == 1
    assert refused.stderr.strip() == "error: merge: missing shards 1/3 (merge without them with --allow-missing)"
    partial = invoke("merge", files[0], files[2], tmp_path / "m.h5", "--allow-missing", "--json")
    assert partial.exit_code == 0, partial.output
    out = json.loads(partial.stdout)
    assert out["merged_shards"] == [0, 2] and out["missing"] == ["missing shards 1/3"]
    rows = results[0]["shard_images"] + results[2]["shard_images"]
    assert out["feature_sets"][0]["shape"][0] == rows
    with open_store(tmp_path / "m.h5") as s:
        assert len(s.select().rows()) == rows


def test_merge_and_shard_misuse(tree, tmp_path):
    folder = tmp_path / "shards"
    files = shard_files(folder, 2)
    run_shards(tree, folder, 2)
    single = tmp_path / "single.h5"
    assert invoke("extract", tree, single, *PIXELS).exit_code == 0

    not_shard = invoke("merge", files[0], single, tmp_path / "m.h5")
    assert not_shard.exit_code == 1 and f"written with extract --shard?): {single}" in not_shard.stderr
    overwrite = invoke("merge", *files, single)
    assert overwrite.exit_code == 1 and f"{single}: exists and is not a merged store" in overwrite.stderr
    twice = invoke("merge", files[0], files[0], tmp_path / "m.h5")
    assert twice.exit_code == 1 and f"merge: {files[0]} is given twice" in twice.stderr
    copy = tmp_path / "copy.h5"
    shutil.copy(files[0], copy)
    shutil.copy(marker_path(files[0]), marker_path(copy))
    same = invoke("merge", files[0], copy, files[1], tmp_path / "m.h5")
    assert same.exit_code == 1 and f"merge: {files[0]} and {copy} are both shard 0/2" in same.stderr
    marker = read_marker(copy)
    marker["shard"] = [1, 2]  # a hand-edited sidecar: the same images would count twice
    with open(marker_path(copy), "w") as fh:
        json.dump(marker, fh)
    twice_rows = invoke("merge", files[0], copy, tmp_path / "m.h5")
    assert twice_rows.exit_code == 1
    assert f"is in two shards ({files[0]} and {copy}) of pixels-16-" in twice_rows.stderr

    merged = tmp_path / "m.h5"
    assert invoke("merge", *files, merged).exit_code == 0
    assert invoke("merge", *files, merged).exit_code == 0  # a merged store is replaced by a new merge
    into_merged = invoke("extract", tree, merged, *PIXELS)
    assert into_merged.exit_code == 1 and "is merged from shard stores" in into_merged.stderr
    wrong = invoke("extract", tree, files[0], "--shard", "1/2", *PIXELS)
    assert wrong.exit_code == 1 and f"{files[0]}: holds shard 0/2" in wrong.stderr


def test_empty_shard_is_not_an_error(tmp_path):
    tree = write_tree(tmp_path / "images", per_class=1)
    count = 8
    empty = next(i for i in range(count) if not select_shard(discover(str(tree)).entries, i, count))
    result = invoke("extract", tree, tmp_path / "s.h5", "--shard", f"{empty}/{count}", *PIXELS)
    assert result.exit_code == 0, result.output
    assert f"shard {empty}/{count} of {tmp_path / 's.h5'}: committed (0 images in this shard)" in result.stdout


def test_scale_out_option_errors(tree, tmp_path, monkeypatch):
    cases = [
        (["--shards", "2"], "error: --shards: only with --ray (for a job array use --shard I/N)"),
        (["--gpus-per-worker", "1"], "error: --gpus-per-worker: only with --ray (for a job array use --shard I/N)"),
        (["--shard", "0/2", "--ray"], "error: --shard and --ray: use one"),
        (["--shard", "2/2"], "error: --shard 2/2: expected I/N with 0 <= I < N (shards are numbered from 0)"),
        (["--shard", "x"], "error: --shard 'x': expected I/N with 0 <= I < N, e.g. 0/8"),
    ]
    for options, message in cases:
        result = invoke("extract", tree, tmp_path / "s.h5", *PIXELS, *options)
        assert result.exit_code == 1 and result.stderr.startswith(message), (options, result.stderr)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    result = invoke("extract", tree, tmp_path / "s.h5", *PIXELS, "--ray", "--shards", "2")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: Ray is not installed: pip install 'featcache[ray]'"
