"""`featcache demo` at a reduced size, the bundled weights and their checksum refusal."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import MOBILENET_025, REPO, shared_file, write_tree
from featcache import demo_job as demo
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract.bases import bundled
from featcache.extract.bases.backbones import get_backbone
from featcache.extract.pipeline import ExtractConfig, key_spec
from featcache.extract.bases.weights import resolve_weights


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_demo_reduced_json_and_rerun_reuses_cache(tmp_path):
    workdir = tmp_path / "demo"
    result = invoke("demo", "--workdir", workdir, "--per-class", 20, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert "demo: train: mobilenet_0.25+dense" in result.stderr  # progress goes to stderr only

    rows = {r["name"]: r for r in out["leaderboard"]}
    assert set(rows) == {"pixels+logreg", "mobilenet_0.25+logreg", "mobilenet_0.25+dense"}
    for row in out["leaderboard"]:
        assert {"name", "feature_set", "head", "test_accuracy", "seconds"} <= set(row)
        assert row["name"] == f"{row['feature_set'].split('-')[0]}+{row['head']}"
        assert 0 <= row["test_accuracy"] <= 1 and row["seconds"] >= 0
    # 4 classes, 16 test images: conv features far above chance, pixels near it.
    pixels = rows["pixels+logreg"]["test_accuracy"]
    for name in ("mobilenet_0.25+logreg", "mobilenet_0.25+dense"):
        assert rows[name]["test_accuracy"] >= 0.75, out["leaderboard"]
        assert rows[name]["test_accuracy"] >= pixels + 0.4, out["leaderboard"]
    assert pixels <= 0.5
    assert [r["rank"] for r in out["leaderboard"]] == [1, 2, 3]
    assert out["best"] == out["leaderboard"][0]["name"] and out["best"].startswith("mobilenet_0.25+")

    # The images: split folders, class folders, 12/4/4 per class.
    assert out["images"]["per_split"] == {"train": 12, "validation": 4, "test": 4}
    for split, n in out["images"]["per_split"].items():
        for name in demo.CLASSES:
            assert len(os.listdir(workdir / "images" / split / name)) == n
    # The bundled weights are what the key records (sha256 of the file, like any local path).
    mobilenet = next(e for e in out["extract"] if e["name"] == "mobilenet_0.25")
    assert mobilenet["shape"] == [80, 256] and mobilenet["extracted"] == 80

    # Files: plots and run of the best head, the exported model, the store, the samples sheet.
    assert "confusion_matrix.png" in out["plots"]
    assert ("curves.png" in out["plots"]) == out["best"].endswith("+dense")  # logreg has no epochs to plot
    # The best run's HTML report, named in the output.
    report = out["report"]
    assert report["path"] == os.path.join(rows[out["best"]]["run_dir"], "report.html")
    assert report["split"] == "test" and report["images"] == 16
    assert report["mistakes"] == round((1 - rows[out["best"]]["test_accuracy"]) * 16)
    for path in [*out["plots"].values(), out["model"], out["store"], out["samples"], report["path"]]:
        assert os.path.isfile(path) and os.path.getsize(path) > 0, path
    best = rows[out["best"]]
    with open(os.path.join(best["run_dir"], "config.json")) as f:  # reusable after featcache is reinstalled
        assert json.load(f)["feature_set"]["weights_arg"] == "bundled"

    # The exported model works on its own: decode the test images as extraction does.
    import keras

    from featcache.extract.images.decode import decode_image

    model = keras.models.load_model(out["model"])
    images, labels = [], []
    for label, name in enumerate(demo.CLASSES):
        for file in sorted(os.listdir(workdir / "images" / "test" / name)):
            images.append(decode_image((workdir / "images" / "test" / name / file).read_bytes(), demo.IMAGE_SIZE))
            labels.append(label)
    proba = model.predict(np.stack(images).astype("float32"), verbose=0)
    assert proba.shape == (16, 4)
    assert np.mean(proba.argmax(axis=1) == np.array(labels)) == pytest.approx(best["test_accuracy"])

    # The second run (text this time) draws nothing and extracts nothing: all from the cache.
    again = invoke("demo", "--workdir", workdir, "--per-class", 20)
    assert again.exit_code == 0, again.output
    text = again.stdout
    assert "per class 12/4/4), reused\n" in text
    assert text.count("extracted 0, reused 80 in") == 2
    for row in out["leaderboard"]:  # same images, same cache, same seeds: the same numbers
        assert f"{row['rank']:<5}{row['name']:<24}{row['test_accuracy']:>9.3f}" in text
    assert f"model     {out['model']}" in text and "done in" in text


def test_demo_text_output(tmp_path, monkeypatch):
    """The printed report names every leaderboard row and where the plots and model are."""
    result = {
        "workdir": str(tmp_path / "d"), "classes": list(demo.CLASSES),
        "images": {"root": str(tmp_path / "d" / "images"), "per_split": {"train": 60, "validation": 20, "test": 20},
                   "total": 400, "generated": True, "seconds": 4.2, "seed": 0},
        "samples": str(tmp_path / "d" / "samples.jpg"), "store": str(tmp_path / "d" / "features.h5"),
        "extract": [{"name": "pixels", "feature_set": "pixels-32-x", "shape": [400, 32, 32, 3], "extracted": 400,
                     "reused": 0, "seconds": 0.4}],
        "leaderboard": [
            {"rank": 1, "name": "mobilenet_0.25+dense", "test_accuracy": 1.0, "validation_accuracy": 0.9875,
             "seconds": 3.5, "run_dir": str(tmp_path / "d" / "runs" / "mobilenet_0.25+dense")},
            {"rank": 2, "name": "pixels+logreg", "test_accuracy": 0.225, "validation_accuracy": 0.3,
             "seconds": 0.3, "run_dir": str(tmp_path / "d" / "runs" / "pixels+logreg")}],
        "model": str(tmp_path / "d" / "model.keras"), "model_input": {"shape": [128, 128, 3], "values": ""},
        "plots": {"curves.png": str(tmp_path / "d" / "runs" / "mobilenet_0.25+dense" / "curves.png")},
        "report": {"path": str(tmp_path / "d" / "runs" / "mobilenet_0.25+dense" / "report.html"), "split": "test",
                   "images": 80, "mistakes": 0},
        "seconds": 31.0,
    }
    monkeypatch.chdir(tmp_path)
    text = demo.format_report(result)
    assert "featcache demo in d\n" in text
    assert "  1    mobilenet_0.25+dense        1.000    0.988      3.5" in text
    assert "  2    pixels+logreg               0.225    0.300      0.3" in text
    assert "plot      d/runs/mobilenet_0.25+dense/curves.png" in text
    assert "model     d/model.keras" in text and "test = 80 held-out images" in text
    assert "report    d/runs/mobilenet_0.25+dense/report.html  (open in a browser: 0 mistakes of 80 test images" in text


def test_demo_help_via_python_m():
    proc = subprocess.run([sys.executable, "-m", "featcache", "demo", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for option in ("--workdir", "--per-class", "--seed", "--json"):
        assert option in proc.stdout
    assert "featcache-demo" in proc.stdout  # the default work folder is shown


def test_cli_defaults_match_the_module():
    options = {p.name: p.default for p in cli.commands["demo"].params}
    assert options["workdir"] == demo.DEFAULT_WORKDIR
    assert options["per_class"] == demo.DEFAULT_PER_CLASS and options["seed"] == demo.DEFAULT_SEED


def test_demo_refuses_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = invoke("demo", "--workdir", tmp_path, "--per-class", 5)
    assert result.exit_code == 1
    assert result.stderr == f"error: {tmp_path}: exists, is not empty and was not made by featcache demo; choose another --workdir\n"
    assert (tmp_path / "mine.txt").read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["mine.txt"]


def test_per_class_minimum():
    with pytest.raises(FeatcacheError, match="--per-class 4: needs at least 5"):
        demo.split_counts(4)
    assert demo.split_counts(5) == {"train": 3, "validation": 1, "test": 1}
    assert demo.split_counts(100) == {"train": 60, "validation": 20, "test": 20}
    assert invoke("demo", "--per-class", 4).exit_code == 2  # click's range check


def test_generator_is_deterministic_and_colour_free(tmp_path):
    a = np.asarray(demo.render("dots", np.random.default_rng([3, 1, 4])))
    b = np.asarray(demo.render("dots", np.random.default_rng([3, 1, 4])))
    assert a.shape == (demo.IMAGE_SIZE, demo.IMAGE_SIZE, 3) and np.array_equal(a, b)
    # Mean colour carries no class signal: the per-class averages of 40 images are close
    # (their spread is that of random colours, far from the 0..255 range a cue would need).
    means = np.array([[np.asarray(demo.render(name, np.random.default_rng([7, c, i]))).mean(axis=(0, 1))
                       for i in range(40)] for c, name in enumerate(demo.CLASSES)])
    class_means = means.mean(axis=1)
    assert np.ptp(class_means, axis=0).max() < 25, class_means
    with pytest.raises(ValueError):
        demo.render("triangles", np.random.default_rng(0))


# --- the bundled weights --------------------------------------------------------------------


def test_bundled_file_is_the_official_keras_file():
    path, digest = bundled.bundled_weights_path()
    assert os.path.basename(path) == bundled.BUNDLED_FILE and digest == bundled.BUNDLED_SHA256
    shared = shared_file(MOBILENET_025)
    assert hashlib.sha256(shared.read_bytes()).hexdigest() == bundled.BUNDLED_SHA256


def test_bundled_identity_is_the_file_hash_like_a_local_path():
    backbone = get_backbone("mobilenet_0.25")
    source = resolve_weights(backbone, "bundled")
    assert source.identity == f"sha256:{bundled.BUNDLED_SHA256}"
    assert source.keras_arg == bundled.bundled_weights_file()
    assert source.arg == "bundled"  # recorded as weights_arg: valid wherever featcache is installed
    local = resolve_weights(backbone, bundled.bundled_weights_file())
    assert local.identity == source.identity
    # Same bytes, same cache key: features from --weights bundled and --weights PATH are shared.
    config = dict(base="mobilenet_0.25", size=64, pooling="avg")
    assert key_spec(ExtractConfig(weights="bundled", **config)) == key_spec(
        ExtractConfig(weights=bundled.bundled_weights_file(), **config))


def test_bundled_checksum_refusal(tmp_path):
    altered = tmp_path / bundled.BUNDLED_FILE
    shutil.copyfile(bundled.bundled_weights_file(), altered)
    assert bundled.bundled_weights_path(path=str(altered))[1] == bundled.BUNDLED_SHA256
    data = bytearray(altered.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of the weights
    altered.write_bytes(bytes(data))
    with pytest.raises(FeatcacheError, match=r"the bundled weights file was altered \(sha256 [0-9a-f]{16}\.\.\., "
                                             r"expected dbdb03ee2a22fd89\.\.\.\); reinstall featcache"):
        bundled.bundled_weights_path(path=str(altered))
    with pytest.raises(FeatcacheError, match="the bundled weights file is missing"):
        bundled.bundled_weights_path(path=str(tmp_path / "gone.h5"))


def test_bundled_refusals_through_the_cli(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "images", per_class=2)
    wrong_base = invoke("extract", tree, tmp_path / "a.h5", "--base", "vgg16", "--weights", "bundled", "--no-progress")
    assert wrong_base.exit_code == 1
    assert wrong_base.stderr.startswith("error: --weights bundled: the bundled weights are for base 'mobilenet_0.25', "
                                        "not 'vgg16'")
    altered = tmp_path / "altered.h5"
    altered.write_bytes(b"\0" + open(bundled.bundled_weights_file(), "rb").read()[1:])
    monkeypatch.setattr(bundled, "bundled_weights_file", lambda: str(altered))
    tampered = invoke("extract", tree, tmp_path / "b.h5", "--base", "mobilenet_0.25", "--weights", "bundled",
                      "--no-progress")
    assert tampered.exit_code == 1 and f"error: {altered}: the bundled weights file was altered" in tampered.stderr
    assert not (tmp_path / "b.h5").exists()  # refused before anything was written


def test_bundled_weights_load_and_share_the_cache_with_the_same_file(tmp_path):
    """The bundled file loads into the base (ImageNet features, not random ones), and the same
    file given by path is the same feature set: nothing is extracted twice."""
    shared = shared_file(MOBILENET_025)
    tree = write_tree(tmp_path / "images", per_class=2)
    from featcache.cache.store import open_store
    from featcache.extract.pipeline import extract

    store = str(tmp_path / "s.h5")
    cli_run = invoke("extract", tree, store, "--base", "mobilenet_0.25", "--weights", "bundled", "--size", 64,
                     "--pooling", "avg", "--no-progress", "--json")
    assert cli_run.exit_code == 0, cli_run.output
    first = json.loads(cli_run.stdout)
    assert first["extracted"] == 4 and first["shape"] == [4, 256]
    options = dict(base="mobilenet_0.25", size=64, pooling="avg", progress=False)
    by_path = extract(str(tree), store, weights=str(shared), **options)
    assert by_path["feature_set"] == first["feature_set"] and by_path["extracted"] == 0 and by_path["reused"] == 4
    random = extract(str(tree), store, weights="none", **options)
    with open_store(store) as s:
        assert s[first["feature_set"]].spec.weights == f"sha256:{bundled.BUNDLED_SHA256}"
        imagenet, _ = s[first["feature_set"]].load()
        untrained, _ = s[random["feature_set"]].load()
    assert np.all(np.isfinite(imagenet)) and not np.allclose(imagenet, untrained, atol=1e-3)
