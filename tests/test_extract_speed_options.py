"""Speed options of extract: decoding in processes or threads, worker counts, XLA flag, CLI."""
import json

import numpy as np
from click.testing import CliRunner

from conftest import write_tree
from featcache import open_store
from featcache.cli import cli
from featcache.extract.bases.feature_model import gpu_compute_capability
from featcache.extract.pipeline import ExtractConfig, extract

PIXELS = dict(base="pixels", size=24, progress=False, batch_size=3)


def rows_by_path(store, name):
    with open_store(store) as s:
        fs = s[name]
        rows = fs.rows()
        return dict(zip(fs.column("paths")[rows], fs.read(rows))), fs.failures()


def test_decode_processes_give_the_same_rows_and_failures_as_threads(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=5)
    (tree / "cats" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    threads = extract(str(tree), str(tmp_path / "t.h5"), ExtractConfig(**PIXELS, decode_workers=1))
    procs = extract(str(tree), str(tmp_path / "p.h5"), ExtractConfig(**PIXELS, decode_workers=2, decode_processes=True))
    assert threads["feature_set"] == procs["feature_set"]  # how decoding runs is not part of the key
    assert (threads["extracted"], threads["failed"]) == (procs["extracted"], procs["failed"]) == (10, 1)
    a, fail_a = rows_by_path(tmp_path / "t.h5", threads["feature_set"])
    b, fail_b = rows_by_path(tmp_path / "p.h5", procs["feature_set"])
    assert a.keys() == b.keys() and len(a) == 10
    for path in a:
        np.testing.assert_array_equal(a[path], b[path])
    assert fail_a == fail_b and fail_a[0][0] == "cats/broken.jpg"


def test_cli_speed_options(tmp_path):
    tree = write_tree(tmp_path / "i", per_class=3)
    result = CliRunner().invoke(cli, [
        "extract", str(tree), str(tmp_path / "s.h5"), "--base", "mobilenet_0.25", "--weights", "none",
        "--size", "32", "--batch-size", "4", "--precision", "auto", "--decode-workers", "2", "--decode-processes",
        "--xla", "--no-progress", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["extracted"] == 6 and out["shape"] == [6, 1, 1, 256]
    with open_store(tmp_path / "s.h5") as s:
        # auto: never "auto" in the key; fp32 for a depthwise base on any CPU
        expected = "fp16" if gpu_compute_capability() else "fp32"
        assert s[out["feature_set"]].summary()["key"]["precision"] == expected
    bad = CliRunner().invoke(cli, ["extract", str(tree), str(tmp_path / "x.h5"), "--decode-workers", "0"])
    assert bad.exit_code == 2 and "--decode-workers" in bad.stderr
