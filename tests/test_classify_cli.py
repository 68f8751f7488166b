"""The stage-two commands in-process: train, compare, predict, export (exit codes, JSON, errors)."""
import json
import os

import pytest
from click.testing import CliRunner

from conftest import write_tree
from featcache.cli import cli
from featcache.extract.pipeline import ExtractConfig, extract

CLASSES = ("cats", "dogs")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tree = write_tree(root / "images", splits={"train": 8, "validation": 3, "test": 3}, classes=CLASSES)
    path = root / "store.h5"
    names = [extract(str(tree), str(path), ExtractConfig(base="pixels", size=s, progress=False))["feature_set"]
             for s in (8, 12)]
    return {"root": root, "tree": tree, "path": str(path), "fs": names[0], "fs12": names[1]}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def logreg_run(store):
    out = store["root"] / "run-logreg"
    result = run("train", store["path"], "--feature-set", store["fs"], "--head", "logreg", "--out", out, "--json")
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout)


def test_train_json(store, logreg_run):
    out, summary = logreg_run
    assert set(summary) >= {"head", "feature_set", "untrained", "train", "validation", "test", "seconds", "run_dir"}
    assert summary["head"] == "logreg" and summary["feature_set"] == store["fs"] and summary["run_dir"] == str(out)
    for part in ("untrained", "train", "validation", "test"):
        assert {"accuracy", "loss"} <= set(summary[part])
    assert summary["test"] == {"n": 6, "accuracy": 1.0, "loss": pytest.approx(summary["test"]["loss"])}
    assert summary["untrained"]["loss"] == pytest.approx(0.6931, abs=1e-4)
    assert (out / "model.npz").exists() and (out / "config.json").exists()


def test_train_text_and_dense_options(store):
    out = store["root"] / "run-dense"
    result = run("train", store["path"], "--feature-set", store["fs"], "--head", "dense", "--epochs", 3, "--lr", "1e-3",
                 "--units", 8, "--pool", "avg", "--out", out, "--no-report")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"dense on {store['fs']}"
    assert lines[1].startswith("  untrained   (validation) accuracy ")
    assert [line.split()[0] for line in lines[2:5]] == ["train", "validation", "test"]
    assert lines[5].endswith(f"run directory {out}")
    config = json.loads((out / "config.json").read_text())
    assert (config["settings"]["units"], config["settings"]["pool"], config["settings"]["epochs"]) == (8, "avg", 3)


def test_train_errors_exit_1_with_one_line(store, tmp_path):
    result = run("train", store["path"], "--feature-set", store["fs"], "--head", "logreg", "--units", 8, "--out", tmp_path / "r")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: --units: not an option of the logreg head")
    result = run("train", store["path"], "--base", "pixels", "--head", "logreg", "--out", tmp_path / "r2")
    assert result.exit_code == 1 and "2 feature sets with base 'pixels'" in result.stderr
    result = run("train", tmp_path / "missing.h5", "--head", "logreg", "--out", tmp_path / "r3")
    assert result.exit_code == 1 and result.stderr.startswith("error: ")
    result = run("train", store["path"], "--feature-set", store["fs"], "--head", "logreg")
    assert result.exit_code == 2 and "Missing option '--out'" in result.stderr


def test_compare_json_text_and_cv(store):
    result = run("compare", store["path"], "--heads", "logreg", "--json")
    assert result.exit_code == 0, result.stderr
    board = json.loads(result.stdout)["leaderboard"]
    assert sorted(e["feature_set"] for e in board) == sorted([store["fs"], store["fs12"]])
    assert all(e["test"]["accuracy"] == 1.0 for e in board)

    result = run("compare", store["path"], "--heads", "logreg", "--feature-sets", store["fs"])
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0] == f"{store['path']}: train 16, validation 6, test 6 images"
    assert lines[1].split() == ["#", "head", "feature", "set", "val", "acc", "val", "loss", "test", "acc", "test", "loss", "seconds"]
    assert lines[2].split()[:3] == ["1", "logreg", store["fs"]]

    result = run("compare", store["path"], "--heads", "logreg", "--cv", 2, "--json")
    assert result.exit_code == 0
    entry = json.loads(result.stdout)["leaderboard"][0]
    assert entry["cv"]["k"] == 2 and 0 <= entry["cv"]["accuracy_std"] <= 1
    result = run("compare", store["path"], "--heads", "logreg,svm")
    assert result.exit_code == 1 and "unknown head 'svm'" in result.stderr


def test_predict_json_and_text(store, logreg_run):
    out, _ = logreg_run
    result = run("predict", out, store["tree"] / "test", "--top-k", 2, "--json")
    assert result.exit_code == 0, result.stderr
    predictions = json.loads(result.stdout)["predictions"]
    assert len(predictions) == 6
    for p in predictions:
        assert p["predicted"] == os.path.basename(os.path.dirname(p["path"]))  # separable classes
        assert [t["class"] for t in p["top"]][0] == p["predicted"] and len(p["top"]) == 2
        assert sum(t["probability"] for t in p["top"]) == pytest.approx(1.0)

    image = sorted((store["tree"] / "test" / "dogs").iterdir())[0]
    result = run("predict", out, image)
    assert result.exit_code == 0
    path, rest = result.stdout.strip().split(": ")
    assert path == str(image) and rest.split()[0] == "dogs"


def test_predict_refuses_a_tampered_model(store, logreg_run, tmp_path):
    import shutil

    out, _ = logreg_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    with open(copy / "model.npz", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    result = run("predict", copy, store["tree"] / "test")
    assert result.exit_code == 1
    assert "sha256" in result.stderr and "refusing to load" in result.stderr and result.stdout == ""


def test_export_command(store, logreg_run, tmp_path):
    out, _ = logreg_run
    target = tmp_path / "model.keras"
    result = run("export", out, target)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(f"exported {out} -> {target}: input 8x8x3") and target.exists()
    again = run("export", out, target)
    assert again.exit_code == 1 and "exists; choose another file name" in again.stderr
    wrong = run("export", out, tmp_path / "model.h5")
    assert wrong.exit_code == 1 and "cannot tell the format from the name; end it in .keras, .tflite or .onnx" in wrong.stderr
