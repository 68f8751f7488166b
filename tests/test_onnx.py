"""ONNX exports of every run kind that has one image input, and head-only exports (issue 25).

Parity is measured on real photos (../shared/data, skipped cleanly without it): the .onnx file
run in ONNX Runtime gives the run's own probabilities within 1e-4. Head-only exports (.keras
and .onnx) fed the store's rows give the run's own cached test predictions."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CATS_DOGS, shared_file, pixel_store
from featcache.cli import cli
from featcache.errors import FeatcacheError

pytest.importorskip("onnxruntime")
CLASSES = ["cats", "dogs"]


def _probabilities(predictions) -> np.ndarray:
    return np.array([[t["probability"] for t in sorted(p["top"], key=lambda t: CLASSES.index(t["class"]))]
                     for p in predictions])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real cats and dogs (8/3/4 per class), the bundled MobileNet at 64 px and raw pixels at 8."""
    import featcache

    source = shared_file(CATS_DOGS)
    root = tmp_path_factory.mktemp("onnx")
    for split, n in {"train": 8, "validation": 3, "test": 4}.items():
        for name in CLASSES:
            (root / "images" / split / name).mkdir(parents=True)
            for file in sorted(os.listdir(source / split / name))[:n]:
                shutil.copy(source / split / name / file, root / "images" / split / name / file)
    store = str(root / "f.h5")
    mobile = featcache.extract_features(root / "images", store, base="mobilenet_0.25", size=64, weights="bundled",
                                        progress=False)["feature_set"]
    pixels = featcache.extract_features(root / "images", store, base="pixels", size=8, weights="none",
                                        progress=False)["feature_set"]
    runs = {}
    for head in ("logreg", "dense"):
        runs[head] = featcache.train(store, out=root / head, feature_set=mobile, head=head, pool="avg",
                                     no_report=True, **({"epochs": 3} if head == "dense" else {}))["run_dir"]
    runs["fused"] = featcache.train(store, out=root / "fused", feature_sets=[mobile, pixels], head="logreg",
                                    pool="avg", no_report=True)["run_dir"]
    runs["finetune"] = featcache.finetune(runs["dense"], out=root / "finetune", epochs=1, no_report=True)["run_dir"]
    runs["ensemble"] = featcache.ensemble([runs["logreg"], runs["dense"]], out=root / "ensemble",
                                          no_report=True)["run_dir"]
    test_images = sorted(str(p) for p in (root / "images" / "test").rglob("*.jpg"))
    return {"root": root, "store": store, "runs": runs, "test_images": test_images}


@pytest.mark.parametrize("kind", ["logreg", "dense", "finetune", "ensemble"])
def test_onnx_export_gives_the_runs_probabilities_on_real_photos(photos, kind, tmp_path):
    import featcache

    run_dir = photos["runs"][kind]
    out = tmp_path / f"{kind}.onnx"
    result = featcache.export(run_dir, out)
    assert result["format"] == "onnx" and out.is_file()
    assert os.path.isfile(result["card"]) and open(result["labels"]).read().split() == CLASSES
    card = json.load(open(result["card"]))
    assert card["model"]["format"] == "onnx" and card["model"]["sha256"] == result["sha256"]
    # the card's accuracy was measured by running the .onnx file over the run's test images
    assert result["exported_test"]["measured"] and result["exported_test"]["n"] == 8
    assert result["exported_test"]["accuracy"] == pytest.approx(result["run_test_accuracy"])
    ours = _probabilities(featcache.predict(run_dir, photos["test_images"], top_k=2)["predictions"])
    exported = _probabilities(featcache.predict(out, photos["test_images"], top_k=2)["predictions"])
    assert ours.shape == (8, 2)
    np.testing.assert_allclose(exported, ours, atol=1e-4)


def test_a_run_with_two_image_sizes_is_refused_as_onnx(photos, tmp_path):
    result = CliRunner().invoke(cli, ["export", photos["runs"]["fused"], str(tmp_path / "f.onnx")])
    assert result.exit_code == 1
    assert "reads images at 2 sizes" in result.output and "export it as .keras" in result.output
    assert not (tmp_path / "f.onnx").exists()


def test_without_the_extra_one_line_says_what_to_install(photos, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    result = CliRunner().invoke(cli, ["export", photos["runs"]["logreg"], str(tmp_path / "m.onnx")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == \
        'error: an ONNX export needs tf2onnx: pip install "featcache[onnx]"  (onnx, onnxruntime and tf2onnx)'
    assert not any(tmp_path.iterdir())  # no half export


@pytest.mark.parametrize("fmt", ["keras", "onnx"])
@pytest.mark.parametrize("kind", ["logreg", "dense", "fused"])
def test_head_only_exports_fed_stored_rows_give_the_runs_test_predictions(photos, kind, fmt, tmp_path):
    from featcache.classify.runs.cached import split_probabilities

    run_dir = photos["runs"][kind]
    out = tmp_path / f"head.{fmt}"
    exported = CliRunner().invoke(cli, ["export", run_dir, str(out), "--head-only", "--json"])
    assert exported.exit_code == 0, exported.output
    result = json.loads(exported.output)
    card = json.load(open(result["card"]))
    config = json.load(open(os.path.join(run_dir, "config.json")))
    records = config.get("feature_sets") or [config["feature_set"]]
    assert card["head_only"] and [i["feature_set"] for i in card["inputs"]] == [r["name"] for r in records]
    assert [i["key"] for i in card["inputs"]] == [r["key"] for r in records]  # the key the input must come from
    assert result["exported_test"]["accuracy"] == pytest.approx(result["run_test_accuracy"])
    predicted = CliRunner().invoke(cli, ["predict", str(out), "--features", photos["store"], "--top-k", "2", "--json"])
    assert predicted.exit_code == 0, predicted.output
    rows = json.loads(predicted.output)["predictions"]
    assert len(rows) == 30  # every stored image
    test = {p["path"]: p for p in rows if p["split"] == "test"}
    paths, _, proba = split_probabilities(run_dir, "test")
    np.testing.assert_allclose(_probabilities([test[p] for p in paths]), proba, atol=1e-5)


@pytest.mark.parametrize("kind", ["finetune", "ensemble"])
def test_head_only_is_refused_for_runs_that_read_images(photos, kind, tmp_path):
    result = CliRunner().invoke(cli, ["export", photos["runs"][kind], str(tmp_path / "h.keras"), "--head-only"])
    assert result.exit_code == 1 and "--head-only:" in result.output and "export it whole" in result.output


def test_a_head_only_export_is_not_fed_images_nor_a_store_without_its_feature_set(photos, tmp_path):
    import featcache

    out = tmp_path / "h.keras"
    featcache.export(photos["runs"]["logreg"], out, head_only=True)
    with pytest.raises(FeatcacheError, match="takes cached features, not images"):
        featcache.predict(out, photos["test_images"])
    other = pixel_store(tmp_path / "other", CLASSES, {"train": 2, "validation": 1, "test": 1}, (8,))
    with pytest.raises(FeatcacheError, match="no feature set mobilenet_0.25-64"):
        featcache.predict(out, features=other["store"])


def test_int8_is_refused_for_onnx_with_the_measured_reason(photos, tmp_path):
    result = CliRunner().invoke(cli, ["export", photos["runs"]["logreg"], str(tmp_path / "q.onnx"), "--quantize", "int8"])
    assert result.exit_code == 1 and "not offered for ONNX exports" in result.output
    assert not any(tmp_path.iterdir())
