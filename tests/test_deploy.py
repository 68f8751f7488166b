"""Deployment exports: TensorFlow Lite (float, float16, int8), SavedModel, model cards, and
`featcache predict` on exported models, on real photos from ../shared (skipped without it).

Two module fixtures keep the suite short: mobilenet_0.25 with the bundled ImageNet weights at
128 px on a small cats-vs-dogs subset (every format and check but int8 accuracy), and
MobileNetV2@160 with the shared ImageNet weights for int8 (calibrated on 120 training images,
measured on the first 100 + 100 test images of cats_vs_dogs_small_max256: the whole 1,000
image test split is in benchmarks/deploy.py). mobilenet_0.25 itself quantizes poorly to int8
(about 96.6% top-1 agreement on the full test split, measured), so it is not the int8 model.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import CATS_DOGS, MOBILENET_V2, SHARED_DATA, shared_file, write_tree
from featcache.classify.train.harness import train
from featcache.classify.deploy.predict import predict
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract.images.decode import decode_image, read_bytes
from featcache.extract.pipeline import ExtractConfig, extract

CLASSES = ["cats", "dogs"]
PHOTOS = SHARED_DATA / "photos"


def _subset(dst, counts: dict):
    """The first N images per class of each split of cats_vs_dogs_small_max256, copied."""
    root = shared_file(CATS_DOGS)
    for split, n in counts.items():
        for name in CLASSES:
            folder = dst / split / name
            folder.mkdir(parents=True)
            for file in sorted(os.listdir(root / split / name))[:n]:
                shutil.copy(root / split / name / file, folder / file)
    return dst


def _photos():
    folder = shared_file(PHOTOS)
    return sorted(str(folder / n) for n in os.listdir(folder) if n.endswith((".jpg", ".bmp")))


def _proba(result) -> np.ndarray:
    """(N, K) probabilities from predict's output, in class order."""
    names = result["class_names"]
    return np.array([[{t["class"]: t["probability"] for t in p["top"]}[c] for c in names] for p in result["predictions"]])


def _export(run, out, **options):
    from featcache.classify.deploy.export import export

    return export(str(run), str(out), **options)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """mobilenet_0.25 (bundled weights) at 128 px: a logreg and a dense run. (Fine-tuned runs'
    exports are tested in test_finetune.py, on its runs.)"""
    root = tmp_path_factory.mktemp("deploy")
    tree = _subset(root / "images", {"train": 30, "validation": 5, "test": 20})
    store = str(root / "s.h5")
    fs = extract(str(tree), store, ExtractConfig(base="mobilenet_0.25", weights="bundled", size=128,
                                                 precision="fp32", progress=False))["feature_set"]
    runs = {"logreg": str(root / "logreg"), "dense": str(root / "dense")}
    # The runs' own report.html pages are not what this file checks (report=False: no thumbnail pass).
    train(store, fs, head="logreg", pool="avg", out=runs["logreg"], report=False)
    train(store, fs, head="dense", pool="avg", epochs=8, lr=1e-3, units=32, out=runs["dense"], report=False)
    test_images = sorted(str(p) for p in (tree / "test").rglob("*.jpg"))
    return {"root": root, "tree": tree, "store": store, "runs": runs, "images": _photos() + test_images}


@pytest.fixture(scope="module")
def exports(small):
    """Each format once, shared by the tests below: {name: (path, export result)}."""
    out = small["root"] / "exports"
    out.mkdir()
    runs = small["runs"]
    plan = {
        "float": (runs["dense"], out / "dense.tflite", {}),
        "float16": (runs["dense"], out / "dense16.tflite", {"quantize": "float16"}),
        "savedmodel": (runs["logreg"], out / "logreg_sm", {}),
    }
    return {name: (path, _export(run, path, **options)) for name, (run, path, options) in plan.items()}


def _tflite_proba(path, images: np.ndarray) -> np.ndarray:
    from featcache.classify.deploy.run_exported import TFLiteModel

    return TFLiteModel(str(path)).predict_proba(images)


def _decoded(paths, size=128):
    return np.stack([decode_image(read_bytes(p), size) for p in paths])


def test_tflite_float_equals_featcache_predict_on_real_photos(small, exports):
    path, result = exports["float"]
    expected = _proba(predict(small["runs"]["dense"], small["images"], top_k=2))
    got = _tflite_proba(path, _decoded(small["images"]))
    assert got.shape == (len(small["images"]), 2) and expected.std() > 0.05
    assert np.abs(got - expected).max() < 1e-4
    assert result["input_dtype"] == "float32" and result["quantize"] == "none"


def test_tflite_float16_is_the_float_model_with_half_precision_weights(small, exports):
    """float16 stores weights as halves and computes in float32: equal to the Keras model with
    its weights rounded to float16 (1e-4), and within 1e-2 of predict on the real photos. (Over
    the 1,000 test images the largest difference is 0.012-0.020 for MobileNetV2@160, mean 2.5e-4:
    the table in docs/deploy.md; a few borderline images move more than 1e-2.)"""
    from featcache.classify.graph.build import build

    path, result = exports["float16"]
    images = _decoded(small["images"])
    got = _tflite_proba(path, images)
    _, model, _ = build(small["runs"]["dense"], precision="fp32")
    for variable in model.weights:
        variable.assign(np.asarray(variable).astype(np.float16).astype(np.float32))
    rounded = np.asarray(model.predict_on_batch(images.astype(np.float32)), np.float64)
    assert np.abs(got - rounded).max() < 1e-4
    photos = _photos()
    expected = _proba(predict(small["runs"]["dense"], photos, top_k=2))
    assert np.abs(got[: len(photos)] - expected).max() < 1e-2
    assert result["bytes"] < 0.6 * exports["float"][1]["bytes"]  # half the weight bytes


def test_savedmodel_signatures_after_tf_saved_model_load(small, exports):
    import tensorflow as tf

    path, result = exports["savedmodel"]
    loaded = tf.saved_model.load(str(path))
    assert set(loaded.signatures) == {"serving_default", "serving_bytes"} == set(result["signatures"])
    expected = _proba(predict(small["runs"]["logreg"], small["images"], top_k=2))
    decoded = loaded.signatures["serving_default"](images=tf.constant(_decoded(small["images"]), tf.float32))
    np.testing.assert_allclose(decoded["probabilities"].numpy(), expected, atol=1e-4)
    top = [CLASSES[i] for i in expected.argmax(1)]
    assert [c.decode() for c in decoded["classes"].numpy()] == top
    # Encoded files (JPEG and the BMP photo), decoded and resized inside the graph.
    encoded = loaded.signatures["serving_bytes"](image_bytes=tf.constant([read_bytes(p) for p in small["images"]]))
    diff = np.abs(encoded["probabilities"].numpy() - expected)
    assert diff.max() < 0.05 and diff.mean() < 5e-3  # measured: 0.025 / 0.0024 (docs/deploy.md)
    assert np.mean(encoded["probabilities"].numpy().argmax(1) == expected.argmax(1)) >= 0.95


def test_in_graph_decoding_is_pillow_within_one_level_on_real_photos(small):
    """serving_bytes' decoder against extract's Pillow decoder, pixel by pixel (bilinear)."""
    import tensorflow as tf

    from featcache.classify.deploy.savedmodel import decode_in_graph

    for path in small["images"][:20]:
        data = read_bytes(path)
        for resize in ("bilinear", "bilinear+jpeg-draft", "nearest"):
            got = decode_in_graph(tf.constant(data), 128, resize).numpy().astype(int)
            assert np.abs(got - decode_image(data, 128, resize).astype(int)).max() <= 1, (path, resize)


def test_in_graph_decoding_composites_alpha_on_white_like_extract(tmp_path):
    import tensorflow as tf
    from PIL import Image

    from featcache.classify.deploy.savedmodel import decode_in_graph

    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :20, 3] = 255  # left half opaque red, right half transparent
    rgba[:, 20:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    got = decode_in_graph(tf.constant(data), 20, "bilinear").numpy().astype(int)
    assert np.abs(got - decode_image(data, 20).astype(int)).max() <= 1
    assert tuple(got[10, 15]) == (255, 255, 255)


def test_model_cards_are_complete(small, exports):
    for name, (path, result) in exports.items():
        card_path = result["card"]
        assert card_path == (os.path.join(path, "model_card.json") if name == "savedmodel" else f"{path}.card.json")
        card = json.loads(open(card_path).read())
        run = small["runs"]["logreg" if name == "savedmodel" else "dense"]
        config = json.loads(open(os.path.join(run, "config.json")).read())
        metrics = json.loads(open(os.path.join(run, "metrics.json")).read())
        assert card["class_names"] == CLASSES
        assert open(result["labels"]).read() == "cats\ndogs\n"
        assert card["input"]["shape"] == [None, 128, 128, 3] and card["input"]["channels"] == "RGB"
        assert card["input"]["dtype"] == "float32" and card["input"]["range"] == [0, 255]
        assert card["input"]["resize"] == "bilinear" and "EXIF" in card["input"]["decoding"]
        assert "127.5" in card["preprocessing"]["inside_the_model"]
        assert card["feature_sets"][0]["key"] == config["feature_set"]["key"]
        assert card["feature_sets"][0]["digest"] == config["feature_set"]["digest"]
        assert card["weights"] == [{"identity": config["feature_set"]["key"]["weights"], "argument": "bundled"}]
        assert card["run_test_metrics"] == metrics["test"]
        assert card["run"]["head"] == config["head"] and card["model"]["bytes"] == result["bytes"] > 0
        assert card["model"]["format"] == ("savedmodel" if name == "savedmodel" else "tflite")
        assert len(card["model"]["sha256"]) == 64
        measured = card["exported_test"]
        # The exported file itself, run over the run's 40 test images: recomputed here.
        assert measured["measured"] and measured["n"] == measured["images"] == 40 and measured["unreadable"] == 0
        test = sorted(str(p) for p in (small["tree"] / "test").rglob("*.jpg"))
        labels = np.array([0 if "/cats/" in p else 1 for p in test])
        if name == "savedmodel":
            import tensorflow as tf

            p = tf.saved_model.load(str(path)).signatures["serving_default"](
                images=tf.constant(_decoded(test), tf.float32))["probabilities"].numpy()
        else:
            p = _tflite_proba(path, _decoded(test))
        assert measured["accuracy"] == pytest.approx(np.mean(p.argmax(1) == labels))
        if name in ("float", "savedmodel"):  # same probabilities as the run: same accuracy
            assert measured["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert "serving_bytes" in json.loads(open(exports["savedmodel"][1]["card"]).read())["signatures"]


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_predict_accepts_exported_models(small, exports):
    photos = _photos()
    reference = run_cli("predict", small["runs"]["logreg"], *photos, "--top-k", "2", "--json")
    expected = json.loads(reference.stdout)
    for target in (exports["savedmodel"][0], exports["float"][0]):
        result = run_cli("predict", target, *photos, "--top-k", "2", "--json")
        assert result.exit_code == 0, result.stderr
        got = json.loads(result.stdout)
        assert got["class_names"] == CLASSES and [p["path"] for p in got["predictions"]] == photos
        assert got["feature_set"] == expected["feature_set"]
    got = json.loads(run_cli("predict", exports["savedmodel"][0], *photos, "--top-k", "2", "--json").stdout)
    assert got["head"] == "logreg" and got["model"] == {"format": "savedmodel", "quantization": "none"}
    np.testing.assert_allclose(_proba(got), _proba(expected), atol=1e-4)
    text = run_cli("predict", exports["float"][0], photos[0], "--top-k", "2")
    assert text.exit_code == 0 and text.stdout.startswith(f"{photos[0]}: ") and text.stdout.count(" 0.") + \
        text.stdout.count(" 1.") == 2
    # Without its card a file says what is missing, and --weights has nothing to do there.
    lonely = small["root"] / "lonely.tflite"
    shutil.copy(exports["float"][0], lonely)
    missing = run_cli("predict", lonely, photos[0])
    assert missing.exit_code == 1
    assert missing.stderr == (f"error: {lonely}: its model card {lonely}.card.json is missing (it holds the class "
                              "names and how images are decoded; export again, or copy it along with the model)\n")
    weights = run_cli("predict", exports["float"][0], photos[0], "--weights", "x.h5")
    assert weights.exit_code == 1 and "is an exported model; its base is inside it" in weights.stderr


def test_export_command_text_and_refusals(small, exports, tmp_path):
    run = small["runs"]["logreg"]
    target = tmp_path / "m.keras"
    result = run_cli("export", run, target, "--no-evaluate")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"exported {run} -> {target}: input 128x128x3 (RGB float 0..255")
    assert lines[1] == (f"  keras, {os.path.getsize(target) / 2**20:.2f} MiB; labels {target}.labels.txt; "
                        f"model card {target}.card.json")
    assert result.stderr == ""  # --no-evaluate asked for it: no warning
    assert json.loads(open(f"{target}.card.json").read())["exported_test"] == {"measured": False,
                                                                               "reason": "export --no-evaluate"}
    cases = [
        (["--format", "tflite"], tmp_path / "x.keras", f"{tmp_path / 'x.keras'}: the exported file name must end in .tflite"),
        ([], tmp_path / "x.h5", f"{tmp_path / 'x.h5'}: cannot tell the format from the name; end it in .keras, "
                                ".tflite or .onnx, or give --format savedmodel (a SavedModel is a folder)"),
        (["--format", "savedmodel"], tmp_path / "x.tflite",
         f"{tmp_path / 'x.tflite'}: a SavedModel is a folder; name it without the .tflite extension"),
        (["--quantize", "int8"], tmp_path / "x.keras", "--quantize int8: only for TensorFlow Lite exports (.tflite)"),
    ]
    for options, out, message in cases:
        bad = run_cli("export", run, out, *options)
        assert (bad.exit_code, bad.stderr) == (1, f"error: {message}\n")
        assert not out.exists()
    # A card already there: refused before anything is written, nothing overwritten.
    (tmp_path / "y.tflite.card.json").write_text("{}")
    again = run_cli("export", run, tmp_path / "y.tflite")
    assert again.exit_code == 1
    assert again.stderr == f"error: {tmp_path / 'y.tflite.card.json'}: exists; choose another file name (exports are never overwritten)\n"
    assert not (tmp_path / "y.tflite").exists() and (tmp_path / "y.tflite.card.json").read_text() == "{}"


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """MobileNetV2@160 (shared ImageNet weights), logreg; int8 export calibrated on 120 images."""
    from featcache.classify.deploy.export import export

    weights = str(shared_file(MOBILENET_V2))
    root = tmp_path_factory.mktemp("int8")
    tree = _subset(root / "images", {"train": 60, "validation": 10, "test": 100})
    store = str(root / "s.h5")
    fs = extract(str(tree), store, ExtractConfig(base="mobilenet_v2", weights=weights, size=160, pooling="avg",
                                                 precision="fp32", progress=False))["feature_set"]
    run = str(root / "logreg")
    train(store, fs, head="logreg", out=run, report=False)
    out = root / "m8.tflite"
    result = export(run, str(out), quantize="int8", calibration_images_count=120)
    return {"tree": tree, "store": store, "fs": fs, "run": run, "out": out, "result": result}


def test_int8_agrees_with_the_float_model_and_keeps_its_accuracy(quantized):
    from featcache import open_store
    from featcache.classify.runs import run_dir as rundir
    from featcache.classify.deploy.run_exported import TFLiteModel

    result, out = quantized["result"], quantized["out"]
    measured = result["exported_test"]
    assert result["input_dtype"] == "uint8" and measured["n"] == 200
    assert measured["float_model"]["top1_agreement"] >= 0.98  # measured 0.995
    assert measured["accuracy"] >= measured["float_model"]["accuracy"] - 0.01  # measured 0.955 vs 0.960
    assert not result["warnings"]
    assert result["calibration"] == {"split": "train", "requested": 120, "images": 120, "unreadable": 0, "seed": 0,
                                     "decoded_like_extract": True, "input_range_pinned": [0, 255]}
    card = json.loads(open(result["card"]).read())
    assert card["exported_test"]["float_model"] == measured["float_model"] and card["input"]["dtype"] == "uint8"
    assert card["conversion"]["calibration"] == result["calibration"]
    # Checked here independently: the uint8 input is the pixel itself (scale 1, zero point 0),
    # and the float reference is the head on the cached test features (what predict computes).
    model = TFLiteModel(str(out))
    assert model.input_dtype == np.uint8 and model.input_quantization == (1.0, 0)
    with open_store(quantized["store"]) as s:
        fs = s[quantized["fs"]]
        rows = fs.rows("test")
        paths = [os.path.join(str(quantized["tree"]), p) for p in fs.column("paths")[rows]]
        features, labels = fs.read(rows), fs.column("labels")[rows]
    _, head = rundir.load_head(quantized["run"])
    float_top = head.predict_proba(features).argmax(1)
    int8 = np.concatenate([model.predict_proba(_decoded(paths[i : i + 50], 160)) for i in range(0, len(paths), 50)])
    assert np.mean(int8.argmax(1) == float_top) == pytest.approx(measured["float_model"]["top1_agreement"])
    assert np.mean(int8.argmax(1) == labels) == pytest.approx(measured["accuracy"])


def test_unconvertible_base_gets_one_line_naming_op_and_layer():
    """A real converter failure: a bfloat16 base has no TensorFlow Lite builtin kernels."""
    import keras

    from featcache.classify.deploy.tflite import convert
    from featcache.extract.bases.backbones import get_backbone
    from featcache.extract.bases.feature_model import build_frozen_base
    from featcache.extract.bases.weights import resolve_weights

    backbone = get_backbone("mobilenet_0.25")
    base = build_frozen_base(backbone, 32, resolve_weights(backbone, "none", 0), None, "bf16", 0)
    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, base(inputs))
    with pytest.raises(FeatcacheError) as caught:
        convert(model, what="runs/x")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("runs/x: cannot be converted to TensorFlow Lite: op Conv2D in layer "
                              "mobilenet_0.25_32/conv1 is not a TensorFlow Lite builtin op for bfloat16 tensors "
                              "(all ops without a kernel: Conv2D, BiasAdd, Relu6, ")


def test_describe_failure_on_quantizer_and_unknown_messages():
    from featcache.classify.deploy.tflite import describe_failure

    assert describe_failure("Quantization not yet supported for op: 'tfl.custom_op'") == \
        "op custom_op has no int8 kernel in TensorFlow Lite"
    assert describe_failure("\nsomething else went wrong\nmore") == "something else went wrong"


def test_bf16_run_exports_a_float32_tflite_and_unreadable_test_images_are_recorded(tmp_path):
    """A run extracted in bf16 converts (the base is rebuilt in fp32, and the card says so);
    when its images are gone the card records why the accuracy could not be measured."""
    tree = write_tree(tmp_path / "images", splits={"train": 4, "validation": 2, "test": 2}, classes=CLASSES)
    store = str(tmp_path / "s.h5")
    fs = extract(str(tree), store, ExtractConfig(base="mobilenet_0.25", weights="none", size=32, pooling="avg",
                                                 precision="bf16", progress=False))["feature_set"]
    run = str(tmp_path / "run")
    train(store, fs, head="logreg", out=run, report=False)
    shutil.rmtree(tree / "test")
    result = _export(run, tmp_path / "m.tflite")
    card = json.loads(open(result["card"]).read())
    assert card["precision"] == {"features_extracted": "bf16", "exported_base": "fp32"}
    reason = card["exported_test"]["reason"]
    assert card["exported_test"]["measured"] is False
    assert reason.startswith("none of the 4 test images could be read (first: ") and "file vanished" in reason
    assert result["warnings"] == [f"the exported file's test accuracy was not measured: {reason}"]
    shutil.rmtree(tree)
    with pytest.raises(FeatcacheError, match=r"^--quantize int8: none of the 8 calibration images could be read"):
        _export(run, tmp_path / "m8.tflite", quantize="int8")
    assert not os.path.exists(tmp_path / "m8.tflite") and not os.path.exists(tmp_path / "m8.tflite.card.json")
