"""Damaged stores: detected, never a hang or a crash, repaired, healed from the images.

test_every_command_on_many_damaged_stores damages copies of a small store in 110+ seeded ways
(bit flips in every dataset's chunks and in the metadata between them, zeroed blocks,
truncation at many offsets, a feature set, a dataset or an attribute deleted by another program)
and runs the commands on each in tests/damage_worker.py processes (info, verify, repair, extract
on every case; train --no-report (its HTML page would re-read the rows train read), compare and extract
before repair on every 4th; search on every 8th): a hang or a crash of one case
is caught by the time bound here and reported, the other cases go on. The other tests check
single behaviours: torn chunks of a killed writer, merged stores, old unchecked stores.
"""
from __future__ import annotations

import json
import os
import random
import select
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, rows_by_digest, write_tree
from featcache.cache.damage import StoreDamaged
from featcache.cache.store import open_store
from featcache.cli import cli

EXTRACT = ["--base", "pixels", "--size", "32", "--batch-size", "8", "--no-progress", "--json"]
CASE_SECONDS = 30  # one case runs 4-8 commands; each ends in well under a second when all is well
WORKERS = 2


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def chunk_map(store: str) -> list[tuple[int, int, str, int, int]]:
    """(file offset, size, dataset, first element, elements) of every chunk in the store."""
    out = []
    with h5py.File(store, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.chunks:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    out.append((info.byte_offset, info.size, name.rsplit("/", 1)[-1], info.chunk_offset[0],
                                obj.chunks[0]))
        f.visititems(visit)
    return sorted(out)


def rows_of_chunk(store: str, dataset: str, first: int, count: int, n_rows: int) -> tuple[int, int] | None:
    """The rows whose values lie in a chunk of ``dataset`` (None: not tied to rows)."""
    if dataset in ("features", "labels", "digests", "splits", "active", "paths_end",
                   "file_sizes", "file_mtimes_ns", "file_ctimes_ns", "file_inodes"):
        return (first, min(first + count, n_rows)) if first < n_rows else None
    if dataset == "paths_utf8":
        with h5py.File(store, "r") as f:
            ends = next(iter(f["feature_sets"].values()))["paths_end"][:n_rows]
        starts = np.concatenate([[0], ends[:-1]])
        rows = np.flatnonzero((ends > first) & (starts < first + count))
        return (int(rows[0]), int(rows[-1]) + 1) if len(rows) else None
    return None


def make_cases(store: str, n_rows: int, name: str, seed: int = 13) -> list[dict]:
    rng = random.Random(seed)
    size = os.path.getsize(store)
    chunks = chunk_map(store)
    in_chunk = np.zeros(size, bool)
    for offset, length, *_ in chunks:
        in_chunk[offset : offset + length] = True
    metadata = np.flatnonzero(~in_chunk)
    data = open(store, "rb").read()
    cases = []

    def add(**case):
        cases.append({"id": len(cases), "full": len(cases) % 4 == 0, **case})

    for i in range(45):  # a flipped bit inside a chunk: every dataset, features most
        offset, length, dataset, first, count = rng.choice([c for c in chunks if c[2] == "features"] if i % 2 else chunks)
        where = offset + rng.randrange(length)
        if dataset == "features":  # checked by row (CRC): exactly the row holding the byte
            row = first + (where - offset) // (length // count)
            rows = (row, row + 1) if row < n_rows else None
        else:  # Fletcher-32: every row of the chunk
            rows = rows_of_chunk(store, dataset, first, count, n_rows)
        add(kind="flip", offset=where, bit=rng.randrange(8), dataset=dataset, rows=rows)
    for _ in range(30):  # a flipped bit outside the chunks: superblock, object headers, indexes, free space
        add(kind="flip", offset=int(rng.choice(metadata)), bit=rng.randrange(8))
    while sum(c["kind"] == "zero" for c in cases) < 12:  # a zeroed block that changes something
        length = rng.choice([512, 4096, 16384])
        offset = rng.randrange(0, size - 1)
        if any(data[offset : offset + length]):
            add(kind="zero", offset=offset, length=length)
    for offset in sorted({0, 7, 40, 100, size - 1, *(rng.randrange(size) for _ in range(15))}):
        add(kind="truncate", offset=offset)
    add(kind="delete_set", feature_set=name)
    for dataset in ("labels", "digests", "features", "committed"):
        add(kind="delete_dataset", feature_set=name, dataset=dataset)
    for attr in ("class_names", "key"):
        add(kind="delete_attr", feature_set=name, attr=attr)
    return cases


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage")
    tree = write_tree(root / "images", splits={"train": 12, "validation": 4, "test": 4})
    store = root / "clean.h5"
    extracted = json.loads(invoke("extract", tree, store, *EXTRACT).stdout)
    trained = json.loads(invoke("train", store, "--head", "logreg", "--out", root / "run", "--json",
                                "--no-report").stdout)
    compared = json.loads(invoke("compare", store, "--heads", "logreg", "--json").stdout)
    searched = json.loads(invoke("search", store, "--out", root / "search", "--trials", "1", "--heads", "logreg",
                                 "--json").stdout)["best"]
    info = json.loads(invoke("info", store, "--json").stdout)
    info["store"] = "clean.h5"
    clean = {"info": info, "rows": extracted["shape"][0], "shape": extracted["shape"],
             "train": {s: trained[s] for s in ("train", "validation", "test")},
             "compare": [[e["validation"], e["test"]] for e in compared["leaderboard"]],
             "search": [searched["params"], searched["loss"], searched["test"]]}
    (root / "clean.json").write_text(json.dumps(clean))
    return root, extracted


def run_cases(root, ids: list[int]) -> tuple[dict, list[str]]:
    """Run cases in WORKERS worker processes; a case that outlives CASE_SECONDS or kills its
    worker is a failure of that case, and a new worker takes the rest."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    queues = [ids[i::WORKERS] for i in range(WORKERS)]
    results, failures = {}, []
    workers = {}

    def start(queue):
        if not queue:
            return
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "damage_worker.py"), str(root), *map(str, queue)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env)
        workers[proc] = {"queue": list(queue), "case": None, "since": time.monotonic()}

    for queue in queues:
        start(queue)
    while workers:
        ready, _, _ = select.select([p.stdout for p in workers], [], [], 1.0)
        for proc in list(workers):
            state = workers[proc]
            if proc.stdout in ready:
                line = proc.stdout.readline()
                if line:
                    message = json.loads(line)
                    if "start" in message:
                        state["case"], state["since"] = message["start"], time.monotonic()
                    else:
                        results[message["done"]] = message
                        state["queue"].remove(message["done"])
                        state["case"] = None
                    continue
                proc.wait()
                del workers[proc]
                if state["case"] is not None:  # it died inside a case: HDF5 crashed
                    failures.append(f"case {state['case']}: the process died (exit {proc.returncode})")
                    state["queue"].remove(state["case"])
                    start(state["queue"])
            elif state["case"] is not None and time.monotonic() - state["since"] > CASE_SECONDS:
                proc.kill()
                proc.wait()
                del workers[proc]
                failures.append(f"case {state['case']}: still running after {CASE_SECONDS} s")
                state["queue"].remove(state["case"])
                start(state["queue"])
    return results, failures


def test_every_command_on_many_damaged_stores(work):
    root, extracted = work
    cases = make_cases(str(root / "clean.h5"), extracted["shape"][0], extracted["feature_set"])
    (root / "cases.json").write_text(json.dumps(cases))
    assert len(cases) >= 100
    results, failures = run_cases(root, [c["id"] for c in cases])
    by_id = {c["id"]: c for c in cases}
    for i, result in sorted(results.items()):
        failures += [f"case {i} {by_id[i]}: {p}" for p in result["problems"]]
    assert not failures, "\n".join(failures[:20])
    assert len(results) == len(cases)
    # the damage was real, and what truncation left was given back
    assert sum(not r["verify_ok"] for r in results.values()) >= 80
    kept = [r["kept"] for i, r in results.items() if by_id[i]["kind"] == "truncate" and r["kept"] is not None]
    assert any(0 < k < extracted["shape"][0] for k in kept)
    slowest, failing = {}, 0.0  # seconds
    for r in results.values():
        for command, seconds in r["seconds"].items():
            slowest[command] = max(slowest.get(command, 0), seconds)
            if r["exits"][command] == 1:
                failing = max(failing, seconds)
    print(f"\n{len(cases)} damaged stores: slowest command to fail {failing:.2f} s; slowest per command (s):",
          json.dumps(slowest))
    assert failing < 10


# -- single behaviours -------------------------------------------------------------------------

PIXELS = ["--base", "pixels", "--size", "8", "--batch-size", "4", "--no-progress", "--json"]


def extract_json(tree, store, *extra):
    result = invoke("extract", tree, store, *PIXELS, *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def flip(path, offset, bit=0):
    with open(path, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ (1 << bit)]))


def feature_offset(store, name, row):
    """The file offset of a row's first feature byte (features are chunked by rows, unfiltered)."""
    with h5py.File(store, "r") as f:
        ds = f["feature_sets"][name]["features"]
        step = ds.chunks[0]
        info = ds.id.get_chunk_info_by_coord((row - row % step,) + (0,) * (ds.ndim - 1))
        return info.byte_offset + (row % step) * int(np.prod(ds.shape[1:])) * ds.dtype.itemsize


def one_error_line(result):
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_a_damaged_row_is_refused_by_readers_reported_by_verify_and_healed(tmp_path):
    tree = write_tree(tmp_path / "images", per_class=10)
    store = tmp_path / "s.h5"
    first = extract_json(tree, store)
    clean = rows_by_digest(store)
    flip(store, feature_offset(store, first["feature_set"], 5) + 11)
    # readers: one line naming the file, the feature set and the row
    line = one_error_line(invoke("train", store, "--head", "logreg", "--out", tmp_path / "run"))
    assert line == (f"error: {store}: feature set {first['feature_set']}: damaged features, row 5 (checksum "
                    f"mismatch); run `featcache repair {store}` to keep what can still be read")
    with open_store(store) as s, pytest.raises(StoreDamaged, match="row 5"):
        s[first["feature_set"]].load()
    # verify: exit 1, the row on stdout, one error line on stderr
    report = invoke("verify", store)
    assert report.exit_code == 1
    assert f"{first['feature_set']}: damaged (20 rows, 1 lost)" in report.stdout
    assert "  damaged features, row 5: checksum mismatch" in report.stdout
    assert one_error_line(report) == f"error: {store} is damaged; `featcache repair {store}` keeps what can still be read"
    verified = json.loads(invoke("verify", store, "--json").stdout)
    assert verified["feature_sets"][0]["damage"] == [{"what": "features", "rows": [5, 5], "reason": "checksum mismatch"}]
    # repair keeps the other 19 rows and the damaged file beside the store
    before = store.read_bytes()
    repaired = json.loads(invoke("repair", store, "--json").stdout)
    assert repaired["kept"] == [{"feature_set": first["feature_set"], "rows": 20, "rows_kept": 19, "rows_lost": 1,
                                 "rows_set_aside": 0, "lost": None}]
    assert open(repaired["damaged_copy"], "rb").read() == before
    assert json.loads(invoke("verify", store, "--json").stdout)["ok"]
    # the next extract recomputes exactly that row
    healed = extract_json(tree, store)
    assert healed["extracted"] == 1 and healed["reused"] == 19
    assert_same = rows_by_digest(store)
    assert assert_same.keys() == clean.keys()
    for digest, (features, *rest) in clean.items():
        np.testing.assert_array_equal(assert_same[digest][0], features)
        assert assert_same[digest][1:] == tuple(rest)


def test_damaged_listing_columns_are_set_aside_and_taken_back_without_the_model(tmp_path):
    tree = write_tree(tmp_path / "images", per_class=10)
    store = tmp_path / "s.h5"
    first = extract_json(tree, store)
    with h5py.File(store, "r") as f:
        offset = f["feature_sets"][first["feature_set"]]["labels"].id.get_chunk_info(0).byte_offset
    flip(store, offset + 2)
    assert "damaged labels column" in one_error_line(invoke("info", store))
    repaired = json.loads(invoke("repair", store, "--json").stdout)
    assert repaired["kept"][0]["rows_kept"] == 20 and repaired["kept"][0]["rows_set_aside"] == 20
    with open_store(store) as s:
        assert len(s.select().rows()) == 0  # kept, but not part of the dataset until the next extract
    healed = extract_json(tree, store)
    assert healed["extracted"] == 0 and healed["reused"] == 20


def test_a_feature_set_deleted_by_another_program_is_just_gone(tmp_path):
    tree = write_tree(tmp_path / "images", per_class=6)
    store = tmp_path / "s.h5"
    keep = extract_json(tree, store)
    gone = extract_json(tree, store, "--pooling", "avg")
    with h5py.File(store, "r+") as f:
        del f["feature_sets"][gone["feature_set"]]
    info = json.loads(invoke("info", store, "--json").stdout)
    assert [fs["feature_set"] for fs in info["feature_sets"]] == [keep["feature_set"]]
    verified = invoke("verify", store)
    assert verified.exit_code == 0 and verified.stdout == f"{keep['feature_set']}: ok (12 rows)\n"
    assert "no feature set" in one_error_line(invoke("train", store, "--feature-set", gone["feature_set"],
                                                     "--head", "logreg", "--out", tmp_path / "run"))


def test_a_truncated_store_is_refused_and_repair_gives_back_what_it_holds(tmp_path):
    tree = write_tree(tmp_path / "images", per_class=30)
    store = tmp_path / "s.h5"
    first = extract_json(tree, store)
    size = store.stat().st_size
    cut = feature_offset(store, first["feature_set"], 52)  # the last feature chunks lie at the end
    os.truncate(store, cut)
    line = one_error_line(invoke("info", store))
    assert line.startswith(f"error: {store}: damaged file (truncated: it holds {cut} of its {size} bytes)")
    assert "truncated" in one_error_line(invoke("extract", tree, store, *PIXELS))
    repaired = json.loads(invoke("repair", store, "--json").stdout)
    kept = repaired["kept"][0]["rows_kept"]
    assert 0 < kept < 60
    assert extract_json(tree, store)["extracted"] == 60 - kept


def test_verify_and_info_say_unchecked_for_stores_written_before_checksums(tmp_path):
    tree = write_tree(tmp_path / "images", per_class=6)
    store, old = tmp_path / "s.h5", tmp_path / "old.h5"
    first = extract_json(tree, store)
    write_unchecked_copy(store, old)
    info = invoke("info", old)
    assert "(unchecked: written before featcache stored checksums)" in info.stdout.splitlines()[0]
    verified = invoke("verify", old, "--json")
    result = json.loads(verified.stdout)
    assert verified.exit_code == 0 and result["ok"] and result["unchecked"] == [first["feature_set"]]
    trained = invoke("train", old, "--head", "logreg", "--out", tmp_path / "run", "--json")
    assert trained.exit_code == 0, trained.output
    # what checksums would catch passes; what the columns' own rules catch does not
    with h5py.File(old, "r+") as f:
        f["feature_sets"][first["feature_set"]]["labels"][3] = 7
    assert "damaged labels column (row 3 has label 7, not one of the 2 classes)" in one_error_line(invoke("info", old))


def write_unchecked_copy(src, dst):
    """``src`` as featcache wrote it before checksums: the same datasets without Fletcher-32, no
    CRC column, a contiguous commit counter."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w", libver="latest") as g:
        for key, value in f.attrs.items():
            g.attrs[key] = value
        for name, group in f["feature_sets"].items():
            out = g.create_group(f"feature_sets/{name}")
            for key, value in group.attrs.items():
                out.attrs[key] = value
            for dname, ds in group.items():
                if dname == "features_crc32":
                    continue
                if dname == "committed":
                    out.create_dataset(dname, data=ds[:])
                    continue
                out.create_dataset(dname, data=ds[:], maxshape=ds.maxshape, chunks=ds.chunks)


def test_a_killed_writers_torn_chunk_is_read_and_rewritten_by_the_next_run(tmp_path):
    """SIGKILL can stop the kernel's copy of a chunk being rewritten in place at a page boundary:
    the committed rows' bytes are the same in both versions, the checksum matches neither."""
    from featcache.cache.writer import StoreWriter
    from featcache.extract.pipeline import ExtractConfig, key_spec

    tree = write_tree(tmp_path / "images", per_class=10)
    store, killed = tmp_path / "s.h5", tmp_path / "killed.h5"
    first = extract_json(tree, store)
    clean = rows_by_digest(store)
    spec = key_spec(ExtractConfig(base="pixels", size=8))
    with StoreWriter(store) as writer:  # a run that appends a batch and dies before its commit
        writer.existing(spec)
        writer.start_appending()
        writer.append(np.ones((3, 8, 8, 3), "float32"), [1] * 3, ["x/1.jpg", "x/2.jpg", "x/3.jpg"], ["0" * 64] * 3,
                      ["train"] * 3)
        writer.file.flush()
        shutil_copy(store, killed)  # the file as SIGKILL leaves it: marked open for SWMR writing
        info = writer.group["labels"].id.get_chunk_info(0)  # 20 committed rows and the 3 in flight
    with open(killed, "r+b") as fh:  # torn: the in-flight rows' labels (1) as in the old version (fill: 0)
        fh.seek(info.byte_offset + 20 * 4)
        fh.write(bytes(12))
    with h5py.File(killed, "r", libver="latest", swmr=True) as f, pytest.raises(OSError, match="filter returned failure"):
        f["feature_sets"][first["feature_set"]]["labels"][:20]
    assert json.loads(invoke("verify", killed, "--json").stdout)["feature_sets"][0]["torn"] == [
        {"what": "labels", "rows": [0, 19], "reason": "chunk torn by a killed run: read from its raw bytes"}]
    info_killed = json.loads(invoke("info", killed, "--json").stdout)
    assert info_killed["feature_sets"][0]["shape"][0] == 20
    resumed = extract_json(tree, killed)
    assert resumed["extracted"] == 0 and resumed["reused"] == 20
    after = json.loads(invoke("verify", killed, "--json").stdout)
    assert after["ok"] and after["feature_sets"][0]["torn"] == [] and not after["left_by_killed_run"]
    got = rows_by_digest(killed)
    assert got.keys() == clean.keys() and all(np.array_equal(got[d][0], clean[d][0]) for d in clean)


def shutil_copy(src, dst):
    import shutil

    shutil.copyfile(src, dst)


def test_a_damaged_shard_is_named_through_its_merged_store_and_healed_by_its_shard_run(tmp_path):
    from featcache.cache.shards import read_marker
    from featcache.extract.scale.sharding import shard_store_name

    tree = write_tree(tmp_path / "images", per_class=10)
    shards = [tmp_path / shard_store_name(i, 2) for i in range(2)]
    runs = [extract_json(tree, path, "--shard", f"{i}/2") for i, path in enumerate(shards)]
    merged = tmp_path / "merged.h5"
    assert invoke("merge", *shards, merged).exit_code == 0
    clean = rows_by_digest(merged)
    name = runs[0]["feature_set"]
    flip(shards[1], feature_offset(shards[1], name, 2) + 5)
    line = one_error_line(invoke("train", merged, "--head", "logreg", "--out", tmp_path / "run"))
    assert line.startswith(f"error: {shards[1]}: feature set {name}: damaged features, row 2 (read through merged "
                           f"store {merged}) (checksum mismatch); run `featcache repair {shards[1]}`")
    verified = json.loads(invoke("verify", merged, "--json").stdout)
    assert [d["file"] for d in verified["feature_sets"][0]["damage"]] == [str(shards[1])]
    assert "merged from shard stores" in one_error_line(invoke("repair", merged))
    # the shard: repaired, its commit record withdrawn (merge refuses it), its shard run heals it
    repaired = json.loads(invoke("repair", shards[1], "--json").stdout)
    assert repaired["shard_records_withdrawn"] == [name] and not read_marker(shards[1])["feature_sets"]
    assert "uncommitted shards" in one_error_line(invoke("merge", *shards, merged))
    assert extract_json(tree, shards[1], "--shard", "1/2")["extracted"] == 1
    assert invoke("merge", *shards, merged).exit_code == 0
    got = rows_by_digest(merged)
    assert got.keys() == clean.keys() and all(np.array_equal(got[d][0], clean[d][0]) for d in clean)


def test_streamed_dense_training_stops_at_a_damaged_row_with_one_line(tmp_path):
    """Keras runs the streaming generator inside TensorFlow, which wraps its exceptions."""
    tree = write_tree(tmp_path / "images", splits={"train": 8, "validation": 2, "test": 2})
    store = tmp_path / "s.h5"
    first = extract_json(tree, store)
    with open_store(store) as s:
        row = int(s.select().rows("train")[-1])
    flip(store, feature_offset(store, first["feature_set"], row) + 3)
    line = one_error_line(invoke("train", store, "--head", "dense", "--memory-budget", "0", "--epochs", "1",
                                 "--out", tmp_path / "run"))
    assert f"damaged features, row {row} (checksum mismatch)" in line
