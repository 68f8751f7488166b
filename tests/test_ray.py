"""The Ray runner on a local Ray instance (2 CPUs): shards as tasks, merged, equal to a single run."""
import json
import os

import pytest
from click.testing import CliRunner

from conftest import REPO, assert_same_rows, rows_by_digest, write_tree
from featcache.cli import cli
from featcache.extract.pipeline import ExtractConfig, extract
from featcache.extract.scale.sharding import shard_store_name

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray instance for the module: starting Ray costs 5-10 s on 2 cores."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_DEDUP_LOGS")}
    # Workers import featcache: give them this checkout (an installed featcache needs nothing).
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved["PYTHONPATH"]) if p)
    os.environ["RAY_DEDUP_LOGS"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 << 20, log_to_driver=False,
             runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    yield ray
    ray.shutdown()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])






def test_ray_run_equals_single_run_and_reruns_skip(ray_session, tmp_path):
    tree = write_tree(tmp_path / "images", per_class=12)
    options = ["--base", "pixels", "--size", "16", "--no-progress"]
    out = tmp_path / "out.h5"
    result = invoke("extract", tree, out, *options, "--ray", "--shards", "3", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["extracted"] == 24 and summary["shape"] == [24, 16, 16, 3]
    assert [s["shard"] for s in summary["shards"]] == [[0, 3], [1, 3], [2, 3]]
    assert all(s["status"] == "extracted" for s in summary["shards"])
    assert "ray: 3 shards on 2 CPUs" in result.stderr
    assert sorted(os.listdir(tmp_path / "out.h5.shards")) == sorted(
        name for i in range(3) for name in (shard_store_name(i, 3), shard_store_name(i, 3) + ".lock",
                                            shard_store_name(i, 3) + ".shard.json"))
    extract(str(tree), str(tmp_path / "single.h5"), ExtractConfig(base="pixels", size=16, progress=False))
    assert_same_rows(rows_by_digest(tmp_path / "single.h5"), rows_by_digest(out))

    again = invoke("extract", tree, out, *options, "--ray", "--shards", "3", "--json")
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert [s["status"] for s in rerun["shards"]] == ["skipped"] * 3
    assert rerun["extracted"] == 0 and rerun["reused"] == 24
    assert_same_rows(rows_by_digest(tmp_path / "single.h5"), rows_by_digest(out))


def test_ray_runs_a_keras_base_per_worker(ray_session, tmp_path):
    tree = write_tree(tmp_path / "images", per_class=4)
    options = ["--base", "mobilenet_0.25", "--weights", "none", "--size", "32", "--batch-size", "4", "--no-progress"]
    out = tmp_path / "out.h5"
    result = invoke("extract", tree, out, *options, "--ray", "--shards", "2", "--cpus-per-worker", "1", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["extracted"] == 8
    config = ExtractConfig(base="mobilenet_0.25", weights="none", size=32, batch_size=4, progress=False)
    extract(str(tree), str(tmp_path / "single.h5"), config)
    assert_same_rows(rows_by_digest(tmp_path / "single.h5"), rows_by_digest(out), exact=False)


def test_ray_reports_failed_shards(ray_session, tmp_path):
    tree = write_tree(tmp_path / "images", per_class=3)
    out = tmp_path / "out.h5"
    (tmp_path / "out.h5.shards").mkdir()
    (tmp_path / "out.h5.shards" / shard_store_name(1, 2)).write_text("not a store")
    result = invoke("extract", tree, out, "--base", "pixels", "--size", "8", "--no-progress", "--ray", "--shards", "2")
    assert result.exit_code == 1
    assert result.stderr.strip().endswith(
        f"error: 1 of 2 shards failed (1/2: {tmp_path / 'out.h5.shards' / shard_store_name(1, 2)}: not an HDF5 file "
        f"(refusing to touch it; choose another store path)); committed shards are kept in {tmp_path / 'out.h5.shards'}, "
        "run the same command again to redo only the others"
    )
    assert not out.exists()
