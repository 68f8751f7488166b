"""The extraction pipeline: decoding threads and processes (shared-memory ring), dispatch ahead,
the writer thread, the steady-state rate, and clean stops with decoding processes."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO, features_by_digest, write_tree
from featcache import open_store
from featcache.cache.store import committed_rows
from featcache.cli import cli
from featcache.extract import config as C
from featcache.extract.images import feeder
from featcache.extract.bases.backbones import get_backbone
from featcache.extract.config import ExtractConfig, key_spec
from featcache.extract.images.decode import decode_image
from featcache.extract.bases.feature_model import FeatureModel
from featcache.extract.pipeline import extract
from featcache.extract.bases.weights import resolve_weights

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
MOBILE = dict(base="mobilenet_0.25", weights="none", size=32, progress=False)
BROKEN = {"cats/broken.jpg": "truncated image data (image file ends early)", "dogs/empty.jpg": "empty file (0 bytes)"}


def tree_with_failures(root, per_class):
    write_tree(root, per_class=per_class)
    (root / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (root / "dogs" / "empty.jpg").write_bytes(b"")
    return root


def rows_by_path(store, name):
    with open_store(store) as s:
        fs = s[name]
        rows = fs.rows()
        return dict(zip(fs.column("paths")[rows], fs.read(rows))), dict(fs.failures())


def per_image_reference(tree, paths, base, size, resize="bilinear"):
    """A plain loop: each image decoded on its own and run through the model alone, batch of one."""
    backbone = get_backbone(base)
    model = FeatureModel(backbone, size, resolve_weights(backbone, "none", 0, size), None, "none", "fp32", 0)
    return {p: model(decode_image((tree / p).read_bytes(), size, resize)[None])[0] for p in paths}


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_features_equal_a_per_image_reference_row_for_row(tmp_path, decode):
    tree = tree_with_failures(tmp_path / "i", per_class=7)  # 14 good images: batches of 4 with a short last one
    result = extract(str(tree), str(tmp_path / "s.h5"),
                     ExtractConfig(**MOBILE, batch_size=4, decode=decode, decode_workers=2, resize="bilinear"))
    assert result["decode"] == decode and result["extracted"] == 14 and result["failed"] == 2
    rows, failures = rows_by_path(tmp_path / "s.h5", result["feature_set"])
    assert failures == BROKEN
    reference = per_image_reference(tree, sorted(rows), "mobilenet_0.25", 32)
    assert sorted(rows) == sorted(reference) and len(rows) == 14
    for path, feature in rows.items():
        np.testing.assert_allclose(feature, reference[path], rtol=1e-4, atol=1e-5, err_msg=path)


def test_process_ring_gives_exactly_the_thread_pixels_with_failures_inside_batches(tmp_path):
    tree = tree_with_failures(tmp_path / "i", per_class=9)
    pixels = dict(base="pixels", size=20, progress=False, batch_size=5, resize="bilinear")
    a = extract(str(tree), str(tmp_path / "t.h5"), ExtractConfig(**pixels, decode="threads"))
    b = extract(str(tree), str(tmp_path / "p.h5"), ExtractConfig(**pixels, decode="processes", decode_workers=2))
    assert a["feature_set"] == b["feature_set"]
    rows_a, fail_a = rows_by_path(tmp_path / "t.h5", a["feature_set"])
    rows_b, fail_b = rows_by_path(tmp_path / "p.h5", b["feature_set"])
    assert rows_a.keys() == rows_b.keys() and len(rows_a) == 18 and fail_a == fail_b == BROKEN
    for path in rows_a:
        np.testing.assert_array_equal(rows_a[path], rows_b[path])


def test_ring_holds_the_model_batches_and_two_chunks_per_process():
    assert feeder.ring_slots(rows=256, workers=15, chunk=18) == 2 + 3
    assert feeder.ring_slots(rows=32, workers=2, chunk=16) == 2 + 2
    assert feeder.default_workers("processes") == max(1, (os.cpu_count() or 1) - 1)


def test_json_reports_start_up_apart_from_the_steady_rate(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=6)
    out = CliRunner().invoke(cli, ["extract", str(tree), str(tmp_path / "s.h5"), "--base", "mobilenet_0.25",
                                   "--weights", "none", "--size", "32", "--batch-size", "4", "--no-progress", "--json"])
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert result["extracted"] == 12 and result["resize"] == key_spec(ExtractConfig(**MOBILE)).resize
    assert 0 < result["startup_seconds"] < result["seconds"]
    assert result["images_per_second"] > 0
    again = json.loads(CliRunner().invoke(cli, ["extract", str(tree), str(tmp_path / "s.h5"), "--base", "mobilenet_0.25",
                                                "--weights", "none", "--size", "32", "--no-progress", "--json"]).stdout)
    assert again["extracted"] == 0 and again["startup_seconds"] == 0 and again["images_per_second"] == 0


class _SyncModel:
    """A model that computes on dispatch, as TensorFlow does on a CPU: 50 ms a batch."""

    def dispatch(self, images):
        time.sleep(0.05)
        return np.zeros((len(images), 2), np.float32)

    def fetch(self, handle):
        return handle


class _Writer:
    def __init__(self):
        self.rows, self.group = 0, {"features": np.zeros((0, 2))}

    def append(self, features, *columns):
        self.rows += len(features)

    def add_failures(self, failed):
        pass

    def commit(self):
        pass


def test_the_steady_rate_counts_no_batch_computed_during_start_up():
    """Batch 2 is dispatched only once batch 1's features are back: with a backend that computes
    on dispatch, overlapping them ran batch 2 inside the start-up yet counted it as steady."""
    from featcache.extract.batch_loop import run_batches
    from featcache.extract.images.batches import Batch

    from featcache.extract.images.discover import ImageEntry

    entry = ImageEntry("cats/a.jpg", 0, "train")
    batches = [Batch([entry] * 4, [f"d{k}{i}" for i in range(4)], np.zeros((4, 1)), []) for k in range(5)]
    writer = _Writer()
    result = run_batches(writer, iter(batches), _SyncModel(), "float32", [])
    assert result.extracted == writer.rows == 20 and result.steady_images == 16
    assert result.steady_seconds >= 4 * 0.05  # batches 2..5 were all computed inside the steady window
    assert result.images_per_second <= 16 / (4 * 0.05)


def test_short_batches_are_padded_to_one_compiled_shape_and_cut_back(tmp_path):
    backbone = get_backbone("mobilenet_0.25")
    weights = resolve_weights(backbone, "none", 0, 32)
    padded = FeatureModel(backbone, 32, weights, jit_compile=True, pad_rows=4)  # XLA: one shape per compile
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    assert padded._pad and padded._padded(images).shape == (4, 32, 32, 3)
    plain = FeatureModel(backbone, 32, weights)
    assert not plain._pad  # plain TF runs any batch size without retracing: no rows computed for nothing
    features = padded(images)
    assert features.shape == (2, 1, 1, 256)
    np.testing.assert_allclose(features, plain(images), rtol=1e-4, atol=1e-5)
    # the pipeline pads to the batch size, or to the whole run when it is smaller than a batch
    tree = write_tree(tmp_path / "i", per_class=3)
    seen = []
    real = FeatureModel.dispatch
    FeatureModel.dispatch = lambda self, x: seen.append((len(x), self.pad_rows)) or real(self, x)
    try:
        extract(str(tree), str(tmp_path / "s.h5"), ExtractConfig(**MOBILE, batch_size=4))
        extract(str(tree), str(tmp_path / "t.h5"), ExtractConfig(**MOBILE, batch_size=32))
    finally:
        FeatureModel.dispatch = real
    assert seen == [(4, 4), (2, 4), (6, 6)]


@pytest.mark.parametrize("cores, gpu, installed, decode, resize", [
    (2, False, False, "threads", "bilinear"),  # this machine: what it always was, the same keys
    (4, False, True, "threads", "bilinear"),
    (16, False, False, "processes", "bilinear+jpeg-draft"),
    (4, True, False, "processes", "bilinear+jpeg-draft"),
    (2, True, False, "threads", "bilinear+jpeg-draft"),
    (8, True, True, "gpu", "gpu-bilinear"),  # few cores beside a GPU: decoding on it is faster
    (16, True, True, "processes", "bilinear+jpeg-draft"),  # 15 processes outran the GPU decoder on an H200
])
def test_auto_decoder_and_resize_per_machine(monkeypatch, cores, gpu, installed, decode, resize):
    monkeypatch.setattr(C.os, "cpu_count", lambda: cores)
    monkeypatch.setattr(C, "gpu_compute_capability", lambda: (9, 0) if gpu else None)
    monkeypatch.setattr(C, "gpu_decode_installed", lambda: installed)
    config = ExtractConfig(base="pixels", size=8)
    assert C.resolve_decode(config) == decode
    assert key_spec(config).resize == resize  # resolved, never "auto", in the key
    assert key_spec(ExtractConfig(base="pixels", size=8, resize="lanczos")).resize == "lanczos"
    # how the CPU decodes never changes the key
    assert key_spec(ExtractConfig(base="pixels", size=8, decode="threads")) == key_spec(
        ExtractConfig(base="pixels", size=8, decode="processes"))


def test_decoder_options_that_contradict_are_refused(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=1)
    both = CliRunner().invoke(cli, ["extract", str(tree), str(tmp_path / "s.h5"), "--base", "pixels",
                                    "--decode", "threads", "--decode-processes"])
    assert both.exit_code == 1 and both.stderr == "error: --decode-processes and --decode threads: choose one\n"
    assert C.resolve_decode(ExtractConfig(decode_processes=True)) == "processes"


# -- stops with decoding processes (real `python -m featcache extract` processes) ------------------

ARGS = ["--base", "mobilenet_0.25", "--weights", "none", "--size", "32", "--batch-size", "4", "--no-progress",
        "--decode", "processes", "--decode-workers", "2"]


def start(tree, store, *extra):
    cmd = [sys.executable, "-m", "featcache", "extract", str(tree), str(store), *ARGS, *extra]
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(proc, store, rows, timeout=120.0):
    deadline = time.time() + timeout
    while committed_rows(store) < rows and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)


def decoding_processes(pid: int) -> list[int]:
    """The pool's processes: children of ``pid`` started by multiprocessing's spawn."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


INTERRUPTED = re.compile(r"interrupted: (\d+) images committed to (.+); run the same command again to resume")


def test_ctrl_c_and_kill_minus_9_with_decoding_processes_then_resume_equals_clean_run(tmp_path):
    tree = tree_with_failures(tmp_path / "i", per_class=60)
    store = tmp_path / "s.h5"
    proc = start(tree, store)
    wait_for_rows(proc, store, 8)
    proc.send_signal(signal.SIGSTOP)  # the signal surely meets the run mid-extraction
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    match = INTERRUPTED.fullmatch(err.strip().splitlines()[-1])
    assert match and match.group(2) == str(store), err
    interrupted_at = int(match.group(1))
    assert 8 <= interrupted_at < 120 and committed_rows(store) == interrupted_at

    proc = start(tree, store)
    wait_for_rows(proc, store, interrupted_at + 8)
    workers = decoding_processes(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = committed_rows(store)
    assert interrupted_at + 8 <= killed_at < 120 and len(workers) == 2, (killed_at, workers)
    deadline = time.time() + 10  # the decoding processes follow their main process
    while any(alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in workers)

    resumed = extract(str(tree), str(store), ExtractConfig(**MOBILE, batch_size=4))
    assert resumed["reused"] == killed_at and resumed["extracted"] == 120 - killed_at and resumed["failed"] == 2
    clean = extract(str(tree), str(tmp_path / "clean.h5"), ExtractConfig(**MOBILE, batch_size=4))
    ours, reference = features_by_digest(store, resumed["feature_set"]), features_by_digest(tmp_path / "clean.h5")
    assert sorted(ours) == sorted(reference) and len(ours) == 120
    for digest, feature in ours.items():
        np.testing.assert_allclose(feature, reference[digest], rtol=1e-4, atol=1e-5)
    with open_store(store) as s:
        fs = s[resumed["feature_set"]]
        assert fs.n_committed == len(set(fs.column("digests"))) == 120 and dict(fs.failures()) == BROKEN


def test_a_decoding_process_that_dies_is_an_error_line_not_a_hang(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=100)
    store = tmp_path / "s.h5"
    proc = start(tree, store)
    wait_for_rows(proc, store, 8)
    proc.send_signal(signal.SIGSTOP)  # held mid-run, whatever the machine's speed
    workers = decoding_processes(proc.pid)
    assert workers, "no decoding processes found"
    os.kill(workers[0], signal.SIGKILL)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    line = err.strip().splitlines()[-1]
    match = re.fullmatch(r"error: a decoding process was terminated abruptly \(killed, or out of memory\): "
                         r"(\d+) images committed to (.+), nothing lost; run the same command again to resume", line)
    assert match and match.group(2) == str(store), err
    assert 8 <= int(match.group(1)) == committed_rows(store) < 200
    again = extract(str(tree), str(store), ExtractConfig(**MOBILE, batch_size=4))
    assert again["reused"] == int(match.group(1)) and again["extracted"] == 200 - int(match.group(1))
