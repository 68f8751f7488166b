"""featcache ensemble: members' probabilities from the cache, equal or fitted weights, the run
directory, predict and a single exported Keras model (pixels@8 and bundled MobileNet 0.25 at 32 px,
plus a fused and a fine-tuned member)."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_tree
from featcache.classify import evaluation as reports
from featcache.classify.train.ensemble import ensemble, fit_weights
from featcache.classify.train.harness import train
from featcache.classify.runs.cached import split_probabilities
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract.images.decode import decode_image, read_bytes
from featcache.extract.pipeline import extract

CLASSES = ("cats", "dogs")
MOBILE = dict(base="mobilenet_0.25", weights="bundled", size=32, precision="fp32", progress=False)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Runs on the same images in two stores: logreg on pixels@8 (store A), a poor dense head and
    a logreg on MobileNet 0.25 avg-pooled (store B), a fused head and a fine-tuned model."""
    from featcache.classify.train.finetune import finetune

    root = tmp_path_factory.mktemp("ensemble")
    tree = write_tree(root / "images", splits={"train": 8, "validation": 4, "test": 3}, classes=CLASSES)
    store_a, store_b = str(root / "a.h5"), str(root / "b.h5")
    pixels = extract(str(tree), store_a, base="pixels", size=8, progress=False)["feature_set"]
    mobile = extract(str(tree), store_b, pooling="avg", **MOBILE)["feature_set"]
    pixels_b = extract(str(tree), store_b, base="pixels", size=8, progress=False)["feature_set"]
    runs = {name: str(root / name) for name in ("good", "poor", "mobile", "dense", "fused", "tuned")}
    # Members' own report.html files are not used here (report=False): each costs a plot pass.
    quiet = dict(report=False)
    train(store_a, pixels, head="logreg", out=runs["good"], **quiet)
    train(store_b, mobile, head="dense", out=runs["poor"], epochs=1, lr=1e-7, units=4, **quiet)  # near chance
    train(store_b, mobile, head="logreg", out=runs["mobile"], **quiet)
    train(store_b, mobile, head="dense", out=runs["dense"], epochs=3, lr=1e-3, units=8, **quiet)
    train(store_b, head="logreg", out=runs["fused"], feature_sets=[pixels_b, mobile], **quiet)
    finetune(None, runs["dense"], runs["tuned"], epochs=1, lr=1e-4, **quiet)
    return {"root": root, "tree": tree, "runs": runs, "stores": (store_a, store_b)}


def _by_class(prediction) -> list[float]:
    return [{t["class"]: t["probability"] for t in prediction["top"]}[c] for c in CLASSES]


def test_equal_weights_average_the_members_cached_probabilities(members, tmp_path):
    runs = members["runs"]
    result = ensemble([runs["good"], runs["mobile"]], str(tmp_path / "ens"))
    assert result["weights"] == [0.5, 0.5] and result["fit"] is None and result["warnings"] == []
    for split in ("train", "validation", "test"):
        paths, y, p_good = split_probabilities(runs["good"], split)
        paths_m, y_m, p_mobile = split_probabilities(runs["mobile"], split)
        assert list(paths) == list(paths_m) and list(y) == list(y_m)
        expected = reports.score(y, 0.5 * p_good + 0.5 * p_mobile, 2)
        assert result[split]["loss"] == pytest.approx(expected["loss"], rel=1e-9)
        assert result[split]["accuracy"] == expected["accuracy"]
        # each member's numbers are its own run's metrics.json
        own = json.loads((members["root"] / "good" / "metrics.json").read_text())[split]
        assert result["members"][0][split]["loss"] == pytest.approx(own["loss"], rel=1e-9)
    # the run directory: ordinary layout, the members' model files pinned by sha256
    out = tmp_path / "ens"
    assert {p.name for p in out.iterdir()} == {"config.json", "metrics.json", "history.csv", "confusion_matrix.png",
                                               "members.png", "report.html"}
    assert result["report"] == str(out / "report.html")
    config = json.loads((out / "config.json").read_text())
    assert config["kind"] == "ensemble" and config["weights"] == [0.5, 0.5] and config["class_names"] == list(CLASSES)
    good = json.loads((members["root"] / "good" / "config.json").read_text())
    assert config["members"][0]["run_dir"] == os.path.abspath(runs["good"])
    assert config["members"][0]["model_sha256"] == good["model"]["sha256"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["confusion_matrix"] == [[3, 0], [0, 3]] and "per_class" in metrics["test"]
    # ...and split_probabilities of the ensemble itself is the weighted average
    _, _, p = split_probabilities(str(out), "test")
    np.testing.assert_allclose(p, 0.5 * split_probabilities(runs["good"], "test")[2]
                               + 0.5 * split_probabilities(runs["mobile"], "test")[2], atol=1e-12)


def test_fitted_weights_favour_the_better_member(members, tmp_path):
    runs = members["runs"]
    first = ensemble([runs["poor"], runs["good"]], str(tmp_path / "fit1"), weights="fit", report=False)
    again = ensemble([runs["poor"], runs["good"]], str(tmp_path / "fit2"), weights="fit", report=False)
    w = np.array(first["weights"])
    assert first["weights"] == again["weights"]  # deterministic
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0, abs=1e-12)
    assert w[1] > 0.9  # the good member (validation loss ~0.00x vs ~ln 2) gets nearly all of it
    fit = first["fit"]
    assert fit["validation_loss_fitted"] < fit["validation_loss_equal"]
    assert first["validation"]["loss"] == pytest.approx(fit["validation_loss_fitted"], rel=1e-6)
    config = json.loads((tmp_path / "fit1" / "config.json").read_text())
    assert config["settings"]["weights"] == "fit" and config["weights"] == first["weights"]


def test_fit_weights_finds_the_simplex_optimum():
    """Against a brute-force scan of the 2-member simplex (the objective is convex)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    a = rng.dirichlet([1, 1, 1], 200)
    b = rng.dirichlet([1, 1, 1], 200)
    b[np.arange(200), labels] += 1.0
    b /= b.sum(axis=1, keepdims=True)
    w, info = fit_weights([a, b], labels)
    grid = np.linspace(0, 1, 10001)
    losses = [-np.mean(np.log(t * a[np.arange(200), labels] + (1 - t) * b[np.arange(200), labels])) for t in grid]
    assert w[0] == pytest.approx(grid[int(np.argmin(losses))], abs=2e-3)
    assert info["validation_loss_fitted"] == pytest.approx(min(losses), abs=1e-7)
    assert (w >= 0).all() and w.sum() == pytest.approx(1.0)


def test_ensemble_export_equals_predict(members, tmp_path):
    """Heads on two stores, a fused head and a fine-tuned model: one Keras model, two image
    inputs (8 and 32 px), every base once, outputs equal to predict."""
    import keras

    from featcache.classify.deploy.export import export
    from featcache.classify.deploy.predict import predict

    runs = members["runs"]
    out = str(tmp_path / "ens")
    result = ensemble([runs["good"], runs["dense"], runs["fused"], runs["tuned"]], out, weights="fit", report=False)
    assert sum(result["weights"]) == pytest.approx(1.0) and min(result["weights"]) >= 0
    predicted = predict(out, [str(members["tree"] / "test")], top_k=2)
    assert predicted["kind"] == "ensemble" and len(predicted["predictions"]) == 6
    got = np.array([_by_class(p) for p in predicted["predictions"]])
    # predict == the cached probabilities, which the ensemble's metrics come from
    metrics = json.loads(open(os.path.join(out, "metrics.json")).read())
    labels = [CLASSES.index(os.path.basename(os.path.dirname(p["path"]))) for p in predicted["predictions"]]
    assert reports.score(np.array(labels), got, 2)["loss"] == pytest.approx(metrics["test"]["loss"], abs=1e-5)
    info = export(out, str(tmp_path / "ens.keras"))
    assert [i["name"] for i in info["inputs"]] == ["image_8", "image_32"]
    model = keras.models.load_model(str(tmp_path / "ens.keras"))  # default safe mode: no Lambda layers
    names = [layer.name for layer in model.layers]
    # every distinct base once: pixels@8, and MobileNet 0.25@32 shared by the dense and fused members
    assert sorted(n for n in names if n.startswith("base_")) == ["base_mobilenet_0_25_32", "base_pixels_8"]
    assert sorted(n for n in names if n.startswith("member_")) == [
        "member_0_head", "member_1_head", "member_2_fused", "member_3_finetune"]
    weights = [float(model.get_layer(f"weight_{i}").scale) for i in range(4)]
    np.testing.assert_allclose(weights, result["weights"], rtol=1e-6)
    feeds = [np.stack([decode_image(read_bytes(p["path"]), s) for p in predicted["predictions"]]).astype("float32")
             for s in (8, 32)]
    assert np.abs(np.asarray(model.predict_on_batch(feeds)) - got).max() < 1e-4
    # The exported file was measured on the test split through both inputs, as its card says.
    assert info["exported_test"]["measured"] and info["exported_test"]["accuracy"] == metrics["test"]["accuracy"]
    card = json.loads((tmp_path / "ens.keras.card.json").read_text())
    assert [(i["name"], i["size"]) for i in card["inputs"]] == [("image_8", 8), ("image_32", 32)]
    # predict runs the exported two-input file as deployed, each input decoded at its size
    deployed = predict(str(tmp_path / "ens.keras"), [str(members["tree"] / "test")], top_k=2)
    assert np.abs(np.array([_by_class(p) for p in deployed["predictions"]]) - got).max() < 1e-4
    # one image input only in TensorFlow Lite: refused in one line, nothing written
    with pytest.raises(FeatcacheError, match=r"reads images at 2 sizes \(8x8 \(bilinear\), 32x32 \(bilinear\)\); "
                                             r"tflite exports take one image input, so export it as \.keras"):
        export(out, str(tmp_path / "ens.tflite"))
    assert not list(tmp_path.glob("ens.tflite*"))


def test_predict_and_export_of_a_fine_tuned_run(members, tmp_path):
    import keras

    from featcache.classify.deploy.export import export
    from featcache.classify.deploy.predict import predict

    run = members["runs"]["tuned"]
    predicted = predict(run, [str(members["tree"] / "test")], top_k=2)
    assert predicted["kind"] == "finetune"
    images = np.stack([decode_image(read_bytes(p["path"]), 32) for p in predicted["predictions"]]).astype("float32")
    own = keras.saving.load_model(os.path.join(run, "model.keras"))
    np.testing.assert_allclose(np.array([_by_class(p) for p in predicted["predictions"]]),
                               np.asarray(own.predict_on_batch(images)), atol=1e-6)
    export(run, str(tmp_path / "ft.keras"))
    exported = keras.models.load_model(str(tmp_path / "ft.keras"))
    np.testing.assert_allclose(exported.predict_on_batch(images), own.predict_on_batch(images), atol=1e-6)
    metrics = json.loads(open(os.path.join(run, "metrics.json")).read())
    _, y, p = split_probabilities(run, "test")
    assert reports.score(y, p, 2)["loss"] == pytest.approx(metrics["test"]["loss"], abs=1e-5)


def test_ensemble_on_the_command_line(members, tmp_path):
    runs = members["runs"]
    r = CliRunner().invoke(cli, ["ensemble", runs["good"], runs["mobile"], "--out", str(tmp_path / "e"),
                                 "--weights", "fit"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("ensemble of 2 runs, weights fit on validation (log loss ")
    assert lines[1].split() == ["weight", "val", "acc", "val", "loss", "test", "acc", "test", "loss", "run"]
    assert lines[2].split()[5] == runs["good"] and lines[3].split()[5] == runs["mobile"]
    assert lines[2].endswith(f"(logreg on {json.loads((members['root'] / 'good' / 'config.json').read_text())['feature_set']['name']})")
    assert [line.split()[0] for line in lines[4:7]] == ["train", "validation", "test"]
    assert lines[7] == f"  run directory {tmp_path / 'e'}" and lines[8] == f"  report {tmp_path / 'e' / 'report.html'}"
    r = CliRunner().invoke(cli, ["ensemble", runs["good"], runs["mobile"], "--out", str(tmp_path / "j"), "--json",
                                 "--no-report"])
    assert r.exit_code == 0 and json.loads(r.stdout)["weights_method"] == "equal"
    assert json.loads(r.stdout)["report"] is None and not (tmp_path / "j" / "report.html").exists()


def _logreg_pair(tree, tmp_path, prefix: str) -> None:
    """Logreg runs PREFIX0 and PREFIX1 on pixels@6 and pixels@8 of ``tree`` (one store)."""
    store = str(tmp_path / f"{prefix}.h5")
    for i, size in enumerate((6, 8)):
        name = extract(str(tree), store, base="pixels", size=size, progress=False)["feature_set"]
        train(store, name, head="logreg", out=str(tmp_path / f"{prefix}{i}"), report=False)


def test_ensemble_refuses_bad_input_in_one_line(members, tmp_path):
    runs = members["runs"]

    def refused(args, message):
        r = CliRunner().invoke(cli, ["ensemble", *args, "--out", str(tmp_path / "x")])
        assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.output
        assert r.stderr.startswith("error: " + message), r.stderr

    refused([runs["good"]], "ensemble: needs at least two runs (got 1)")
    refused([runs["good"], runs["good"] + "/"], f"ensemble: {runs['good']}/ is listed twice (as {runs['good']})")
    refused([runs["good"], str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such run directory")
    refused([runs["good"], str(tmp_path)], f"{tmp_path}: not a run directory")
    ensemble([runs["good"], runs["mobile"]], str(tmp_path / "inner"), report=False)
    refused([runs["good"], str(tmp_path / "inner")],
            f"{tmp_path / 'inner'}: an ensemble cannot be a member of an ensemble; list its members instead")

    # other classes; other images; the same images split differently
    three = write_tree(tmp_path / "three", splits={"train": 4, "validation": 2}, classes=("cats", "dogs", "owls"))
    extract(str(three), str(tmp_path / "three.h5"), base="pixels", size=8, progress=False)
    train(str(tmp_path / "three.h5"), head="logreg", out=str(tmp_path / "r3"), report=False)
    refused([runs["good"], str(tmp_path / "r3")],
            f"{runs['good']} and {tmp_path / 'r3'} have different classes (cats, dogs vs cats, dogs, owls); "
            "an ensemble needs runs of the same classes")
    other = write_tree(tmp_path / "other", splits={"train": 8, "validation": 4, "test": 2}, classes=CLASSES)
    extract(str(other), str(tmp_path / "other.h5"), base="pixels", size=8, progress=False)
    train(str(tmp_path / "other.h5"), head="logreg", out=str(tmp_path / "ro"), report=False)
    refused([runs["good"], str(tmp_path / "ro")], f"{runs['good']} (")
    r = CliRunner().invoke(cli, ["ensemble", runs["good"], str(tmp_path / "ro"), "--out", str(tmp_path / "x")])
    assert "do not cover the same images: 2 of" in r.stderr and "an ensemble needs runs trained on the same images" in r.stderr
    flat = write_tree(tmp_path / "flat", per_class=10, classes=CLASSES)
    for seed in (0, 1):
        extract(str(flat), str(tmp_path / f"flat{seed}.h5"), base="pixels", size=8, split_seed=seed, progress=False)
        train(str(tmp_path / f"flat{seed}.h5"), head="logreg", out=str(tmp_path / f"rf{seed}"), report=False)
    r = CliRunner().invoke(cli, ["ensemble", str(tmp_path / "rf0"), str(tmp_path / "rf1"), "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "images a different split or label (extracted with different --split/--split-seed?)" in r.stderr

    # fitting on an empty or one-class validation split
    nova = write_tree(tmp_path / "nova", splits={"train": 4, "test": 2}, classes=CLASSES)
    _logreg_pair(nova, tmp_path, "nv")
    with pytest.raises(FeatcacheError, match=r"^--weights fit: the validation split is empty"):
        ensemble([str(tmp_path / "nv0"), str(tmp_path / "nv1")], str(tmp_path / "y"), weights="fit")
    assert ensemble([str(tmp_path / "nv0"), str(tmp_path / "nv1")], None)["validation"]["n"] == 0  # equal: fine
    half = write_tree(tmp_path / "half", splits={"train": 4, "validation": 2}, classes=CLASSES)
    shutil.rmtree(half / "validation" / "dogs")
    _logreg_pair(half, tmp_path, "hf")
    with pytest.raises(FeatcacheError, match=r"^--weights fit: the validation split has only one class \(cats\)"):
        ensemble([str(tmp_path / "hf0"), str(tmp_path / "hf1")], str(tmp_path / "z"), weights="fit")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()  # refused before any folder is made


def test_a_store_changed_since_training_is_reported(tmp_path):
    tree = write_tree(tmp_path / "images", splits={"train": 4, "validation": 2}, classes=CLASSES)
    store = str(tmp_path / "s.h5")
    sets = [extract(str(tree), store, base="pixels", size=s, progress=False)["feature_set"] for s in (6, 8)]
    for i, name in enumerate(sets):
        train(store, name, head="logreg", out=str(tmp_path / f"r{i}"), report=False)
    write_tree(tmp_path / "images", splits={"train": 5}, classes=CLASSES)  # one more image per class
    for s in (6, 8):
        extract(str(tree), store, base="pixels", size=s, progress=False)
    result = ensemble([str(tmp_path / "r0"), str(tmp_path / "r1")], None)
    assert result["train"]["n"] == 10  # the images now in the store
    assert result["warnings"] == [f"feature set {name} in {store} changed since {tmp_path / f'r{i}'} was trained on it "
                                  "(images added, removed or relabelled)" for i, name in enumerate(sets)]


def test_a_changed_member_is_refused(members, tmp_path):
    runs = members["runs"]
    copy = tmp_path / "good"
    shutil.copytree(runs["good"], copy)
    ens = str(tmp_path / "ens")
    ensemble([str(copy), runs["mobile"]], ens, report=False)
    # Another (consistent) run in the member's folder: the ensemble pinned the old model's sha256.
    train(members["stores"][0], head="logreg", C=0.01, out=str(tmp_path / "other"), report=False)
    shutil.rmtree(copy)
    shutil.copytree(tmp_path / "other", copy)
    with pytest.raises(FeatcacheError, match=f"^{copy}: this member's model is not the one the ensemble {ens} was made with"):
        split_probabilities(ens, "test")
    # A tampered model file is refused by the member's own check.
    with open(copy / "model.npz", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(FeatcacheError, match="does not match .* recorded in config.json; refusing to load"):
        split_probabilities(ens, "test")


def test_weights_override_applies_to_the_bases_it_made(members, tmp_path):
    """predict/export --weights PATH on a run with several network bases: the moved file
    replaces the recorded one for the bases whose features it made, checked by hash."""
    from featcache.classify.graph.base_recipe import recipes_for
    from featcache.extract.bases.bundled import bundled_weights_path

    record = json.loads((members["root"] / "mobile" / "config.json").read_text())["feature_set"]
    other = {**record, "name": "other", "key": {**record["key"], "input_size": 48}}
    moved = tmp_path / "moved.h5"
    shutil.copyfile(bundled_weights_path("mobilenet_0.25")[0], moved)
    recipes = recipes_for([record, other], "RUN", str(moved))
    assert {r.weights.keras_arg for r in recipes.values()} == {str(moved)}
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not weights")
    with pytest.raises(FeatcacheError, match=f"^{junk}: not the weights file of any base of RUN"):
        recipes_for([record, other], "RUN", str(junk))


def test_the_report_of_an_ensemble_and_of_a_fine_tuned_member(members, tmp_path):
    """featcache report on an ensemble (its members' cached probabilities, weighted; no feature
    map, said why) and on a fine-tuned run trained from images (decoded, digests checked)."""
    from featcache.classify.report.run_page import write_report

    runs = members["runs"]
    out = str(tmp_path / "ens")
    made = ensemble([runs["good"], runs["tuned"]], out, weights="fit")
    page = (tmp_path / "ens" / "report.html").read_text()
    assert made["report"] == os.path.join(out, "report.html") and "ensemble of 2 runs (fit weights)" in page
    again = write_report(out, out=str(tmp_path / "again.html"))
    assert again["per_image"] and again["images"] == 6 and again["kind"] == "ensemble"
    assert again["mistakes"] == round((1 - made["test"]["accuracy"]) * 6)
    assert again["notes"] == ["no map of the features: an ensemble's members read different features; "
                              "each member's own report maps its own"]
    tuned = write_report(runs["tuned"], out=str(tmp_path / "tuned.html"))
    assert tuned["per_image"] and tuned["images"] == 6 and tuned["map_points"] == 6
