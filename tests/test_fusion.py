"""Fused heads: one head on several feature sets of the same images (train --feature-sets),
predicted and exported through every base (pixels@8 and the bundled MobileNet 0.25 at 32 px)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_tree
from featcache import open_store
from featcache.classify import evaluation as reports
from featcache.classify.train.harness import train
from featcache.classify.runs.cached import split_probabilities
from featcache.classify.runs.kinds import load_run
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract.images.decode import decode_image, read_bytes
from featcache.extract.pipeline import extract

CLASSES = ("cats", "dogs")


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    tree = write_tree(root / "images", splits={"train": 8, "validation": 3, "test": 3}, classes=CLASSES)
    store = str(root / "store.h5")
    pixels = extract(str(tree), store, base="pixels", size=8, progress=False)["feature_set"]
    mobile = extract(str(tree), store, base="mobilenet_0.25", weights="bundled", size=32, precision="fp32",
                     progress=False)["feature_set"]  # unpooled (1, 1, 256)
    runs = {}
    # Only the logreg run's report.html is read (test_the_report_of_a_fused_run...): none for the dense one.
    for head, options in (("logreg", {"pool": "avg"}), ("dense", {"epochs": 4, "lr": 1e-3, "units": 8, "report": False})):
        runs[head] = str(root / f"fused-{head}")
        train(store, head=head, out=runs[head], feature_sets=[pixels, mobile], **options)
    return {"root": root, "tree": tree, "store": store, "pixels": pixels, "mobile": mobile, "runs": runs}


def _features_by_path(store, name, split):
    with open_store(store) as s:
        fs = s[name]
        rows = fs.rows(split)
        return dict(zip(fs.column("paths")[rows], fs.read(rows).astype(np.float32))), \
            dict(zip(fs.column("paths")[rows], fs.column("labels")[rows]))


def test_fused_logreg_is_logreg_on_the_concatenated_features(fused):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def xy(split):
        a, labels = _features_by_path(fused["store"], fused["pixels"], split)
        b, _ = _features_by_path(fused["store"], fused["mobile"], split)
        paths = sorted(a)  # the same images in both sets, matched by path
        x = np.stack([np.concatenate([a[p].mean(axis=(0, 1)), b[p].mean(axis=(0, 1))]) for p in paths])
        return x, np.array([labels[p] for p in paths])

    x, y = xy("train")
    xt, yt = xy("test")
    assert x.shape == (16, 3 + 256)
    plain = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x, y)
    expected = reports.score(yt, plain.predict_proba(xt), 2)
    metrics = json.loads((fused["root"] / "fused-logreg" / "metrics.json").read_text())
    assert metrics["test"]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert metrics["test"]["accuracy"] == expected["accuracy"] and metrics["kind"] == "fused"
    config = json.loads((fused["root"] / "fused-logreg" / "config.json").read_text())
    assert config["kind"] == "fused" and "feature_set" not in config
    assert [r["name"] for r in config["feature_sets"]] == [fused["pixels"], fused["mobile"]]
    assert config["class_names"] == list(CLASSES) and config["settings"]["pool"] == "avg"


def test_fused_dense_is_one_multi_input_model(fused):
    import keras

    model = keras.saving.load_model(str(fused["root"] / "fused-dense" / "model.keras"), safe_mode=True)
    assert [t.name for t in model.inputs] == ["features_0", "features_1"]
    assert [tuple(t.shape[1:]) for t in model.inputs] == [(8, 8, 3), (1, 1, 256)]
    assert isinstance(model.get_layer("fuse"), keras.layers.Concatenate)
    assert model.get_layer("hidden").kernel.shape == (8 * 8 * 3 + 256, 8)  # both flattened (--pool none)
    # The run's test probabilities are the model's on the stored features of both sets.
    a, labels = _features_by_path(fused["store"], fused["pixels"], "test")
    b, _ = _features_by_path(fused["store"], fused["mobile"], "test")
    paths, y, proba = split_probabilities(fused["runs"]["dense"], "test")
    assert list(paths) == sorted(a) and list(y) == [labels[p] for p in paths]
    direct = np.asarray(model.predict_on_batch([np.stack([a[p] for p in paths]), np.stack([b[p] for p in paths])]))
    np.testing.assert_allclose(proba[:, 1], direct[:, 0], atol=1e-6)
    metrics = json.loads((fused["root"] / "fused-dense" / "metrics.json").read_text())
    assert reports.score(y, proba, 2)["loss"] == pytest.approx(metrics["test"]["loss"], abs=1e-6)


@pytest.mark.parametrize("head", ["logreg", "dense"])
def test_fused_predict_builds_every_base_and_export_matches(fused, head, tmp_path):
    import keras

    from featcache.classify.deploy.export import export
    from featcache.classify.deploy.predict import predict

    run = fused["runs"][head]
    result = predict(run, [str(fused["tree"] / "test")], top_k=2)
    assert len(result["predictions"]) == 6 and result["kind"] == "fused"
    got = np.array([[{t["class"]: t["probability"] for t in p["top"]}[c] for c in CLASSES] for p in result["predictions"]])
    # predict (images -> both bases -> head) == the cached features' probabilities
    paths, _, cached = split_probabilities(run, "test")
    by_path = dict(zip(paths, cached))
    rel = [os.path.relpath(p["path"], fused["tree"]).replace(os.sep, "/") for p in result["predictions"]]
    np.testing.assert_allclose(got, np.stack([by_path[r] for r in rel]), atol=1e-5)
    info = export(run, str(tmp_path / "m.keras"))
    assert [(i["name"], i["shape"]) for i in info["inputs"]] == [("image_8", [8, 8, 3]), ("image_32", [32, 32, 3])]
    model = keras.models.load_model(str(tmp_path / "m.keras"))  # safe mode
    feeds = [np.stack([decode_image(read_bytes(p["path"]), s) for p in result["predictions"]]).astype("float32")
             for s in (8, 32)]
    assert np.abs(np.asarray(model.predict_on_batch(feeds)) - got).max() < 1e-4


def test_the_report_of_a_fused_run_maps_the_joined_features(fused, tmp_path):
    from featcache.classify.report import run_data as report_data
    from featcache.classify.report.run_page import write_report
    from featcache.classify.runs.run_dir import read_config

    run = fused["runs"]["logreg"]
    assert os.path.isfile(os.path.join(run, "report.html"))  # written at the end of train
    page = write_report(run, out=str(tmp_path / "r.html"))
    assert page["per_image"] and page["images"] == 6 and page["map_points"] == 6 and page["notes"] == []
    assert page["kind"] == "fused" and page["feature_set"] == f"{fused['pixels']}+{fused['mobile']}"
    config = read_config(run)
    features, _, _ = report_data.map_features(config, report_data.split_predictions(run, "test"))
    assert features.shape == (6, 3 + 256)  # both sets pooled (--pool avg) and side by side


def test_fused_training_on_the_command_line(fused, tmp_path):
    r = CliRunner().invoke(cli, ["train", fused["store"], "--feature-sets", f"{fused['pixels']},{fused['mobile']}",
                                 "--head", "logreg", "--out", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["feature_set"] == f"{fused['pixels']}+{fused['mobile']}" and summary["test"]["n"] == 6
    assert load_run(str(tmp_path / "run")).kind == "fused"


def test_fusion_refuses_bad_input_in_one_line(fused, tmp_path):
    runner = CliRunner()
    base = ["train", fused["store"], "--head", "logreg", "--out", str(tmp_path / "r")]
    for extra, message in (
        (["--feature-sets", f"{fused['pixels']},nope"], f"error: {fused['store']}: no feature set 'nope' (feature sets: "),
        (["--feature-sets", fused["pixels"]], f"error: --feature-sets {fused['pixels']}: a fused head needs two or more"),
        (["--feature-sets", f"{fused['pixels']},{fused['pixels']}"], f"error: --feature-sets: {fused['pixels']} listed twice"),
        (["--feature-sets", f"{fused['pixels']},{fused['mobile']}", "--feature-set", fused["pixels"]],
         "error: --feature-sets: give either --feature-sets (a fused head) or --feature-set/--base, not both"),
    ):
        r = runner.invoke(cli, base + extra)
        assert r.exit_code == 1 and r.stderr.startswith(message) and len(r.stderr.splitlines()) == 1, r.stderr
    # A set extracted before an image was added does not cover the same images as one made after.
    tree = write_tree(tmp_path / "images", splits={"train": 4, "validation": 2}, classes=CLASSES)
    store = str(tmp_path / "s.h5")
    old = extract(str(tree), store, base="pixels", size=8, progress=False)["feature_set"]
    write_tree(tmp_path / "images", splits={"train": 5}, classes=CLASSES)  # one more image per class
    new = extract(str(tree), store, base="pixels", size=6, progress=False)["feature_set"]
    with pytest.raises(FeatcacheError, match=(f"^{old} and {new} do not cover the same images: 0 of {old}'s images are "
                                              f"not in {new} and 2 of {new}'s are not in {old} "
                                              r"\(e\.g\. train/cats/cats\.004\.jpg\); a fused head needs")):
        train(store, head="logreg", feature_sets=[old, new])
    # One class in the training split: refused as for a single head.
    one = write_tree(tmp_path / "one", splits={"train": 3, "validation": 1}, classes=("cats",))
    store = str(tmp_path / "one.h5")
    sets = [extract(str(one), store, base="pixels", size=s, progress=False)["feature_set"] for s in (4, 6)]
    with pytest.raises(FeatcacheError, match="the training split has only one class"):
        train(store, head="logreg", feature_sets=sets)
