"""Issue 7: `finetune --from-cache` reads boundary activations from a store merged from shards
(HDF5 virtual datasets) exactly as from a single-run store (mobilenet_0.25, bundled weights, 64 px)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_tree
from featcache.classify.train.harness import train
from featcache.cli import cli
from featcache.extract.bases.backbones import get_backbone
from featcache.extract.scale.sharding import shard_store_name

BASE = ["--base", "mobilenet_0.25", "--size", "64", "--weights", "bundled", "--precision", "fp32", "--no-progress"]
BOUNDARY = get_backbone("mobilenet_0.25").boundary_layer  # conv_pw_12_relu


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output)
    return result


def test_finetune_from_merged_store_equals_single_run_store(tmp_path):
    tree = write_tree(tmp_path / "images", splits={"train": 8, "validation": 4, "test": 4})
    # Stage two: a dense head on pooled features of a plain single store.
    plain = json.loads(invoke("extract", tree, tmp_path / "plain.h5", *BASE, "--pooling", "avg", "--json").stdout)
    run = tmp_path / "run"
    train(str(tmp_path / "plain.h5"), plain["feature_set"], head="dense", out=str(run), epochs=3, lr=1e-3, units=8,
          report=False)  # reports are not what this file checks: --no-report / report=False throughout

    # Boundary activations: once as a single run, once as 2 shards merged into virtual datasets.
    single = json.loads(invoke("extract", tree, tmp_path / "single.h5", *BASE, "--layer", BOUNDARY, "--json").stdout)
    shards = [tmp_path / "shards" / shard_store_name(i, 2) for i in range(2)]
    counts = []
    for i, path in enumerate(shards):
        out = json.loads(invoke("extract", tree, path, *BASE, "--layer", BOUNDARY, "--shard", f"{i}/2",
                                "--json").stdout)
        counts.append(out["shard_images"])
    assert sum(counts) == 32 and all(counts)  # both shards hold images: the merge really joins two files
    merged = tmp_path / "merged.h5"
    invoke("merge", *shards, merged)
    with h5py.File(merged, "r") as f:
        ds = f["feature_sets"][single["feature_set"]]["features"]
        assert ds.is_virtual and ds.shape == (32, 2, 2, 256)

    results = {}
    for name, store in (("A", merged), ("B", tmp_path / "single.h5")):
        r = invoke("finetune", run, "--from-cache", store, "--out", tmp_path / name, "--epochs", "1",
                   "--lr", "1e-4", "--json", "--no-report")
        results[name] = json.loads(r.stdout)
    a, b = results["A"], results["B"]
    assert a["source"] == b["source"] == "cache"
    assert a["boundary_feature_set"] == b["boundary_feature_set"] == single["feature_set"]
    assert a["train"]["loss"] != pytest.approx(a["before"]["train"]["loss"], abs=1e-6)  # the epoch changed the model
    stage_two = json.loads((run / "metrics.json").read_text())
    # Before any step both are the stage-two model; after one epoch both trained on the same numbers.
    assert a["before"]["validation"]["accuracy"] == stage_two["validation"]["accuracy"]
    for split in ("train", "validation", "test"):
        assert a["before"][split]["n"] == b["before"][split]["n"] > 0
        assert a["before"][split]["accuracy"] == b["before"][split]["accuracy"]
        assert a["before"][split]["loss"] == pytest.approx(b["before"][split]["loss"], abs=1e-5)
        assert a[split]["n"] == b[split]["n"] and a[split]["accuracy"] == b[split]["accuracy"]
        assert a[split]["loss"] == pytest.approx(b[split]["loss"], abs=1e-5)
    ma = json.loads((tmp_path / "A" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "B" / "metrics.json").read_text())
    np.testing.assert_allclose(ma["test"]["confusion_matrix"], mb["test"]["confusion_matrix"])
    ca = json.loads((tmp_path / "A" / "config.json").read_text())["boundary"]
    assert ca["store"] == str(merged) and ca["feature_set"] == single["feature_set"]

    # The trained weights agree too (the fine-tuned block learnt from the same activations).
    import keras

    ka = keras.saving.load_model(str(tmp_path / "A" / "model.keras"))
    kb = keras.saving.load_model(str(tmp_path / "B" / "model.keras"))
    wa, wb = ka.get_weights(), kb.get_weights()
    assert len(wa) == len(wb)
    for x, y in zip(wa, wb):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
