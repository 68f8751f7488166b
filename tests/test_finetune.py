"""Stage three: fine-tuning the top block with the stage-two head, from images or from cached
boundary activations (mobilenet_0.25 with the bundled ImageNet weights, 64 px, few images)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_tree
from featcache.classify.graph.finetune_model import build_models
from featcache.classify.train.finetune import load_stage_two
from featcache.classify.train.harness import train
from featcache.classify.deploy.predict import predict
from featcache.cli import cli
from featcache.extract.bases.backbones import get_backbone
from featcache.extract.images.decode import decode_file
from featcache.extract.pipeline import extract

OPTS = dict(base="mobilenet_0.25", size=64, weights="bundled", precision="fp32", progress=False)
BOUNDARY = get_backbone("mobilenet_0.25").boundary_layer  # conv_pw_12_relu


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    tree = write_tree(root / "images", splits={"train": 6, "validation": 3, "test": 3})
    store = str(root / "s.h5")
    plain = extract(str(tree), store, pooling="avg", **OPTS)
    boundary = extract(str(tree), store, layer=BOUNDARY, **OPTS)
    run = str(root / "run")
    # The stage-two runs' report.html pages are not read here (report=False: no plots, no map).
    train(store, plain["feature_set"], head="dense", out=run, epochs=5, lr=1e-3, units=16, report=False)
    train(store, plain["feature_set"], head="logreg", out=str(root / "logreg"), report=False)
    paths = sorted(p for p in tree.rglob("*.jpg"))
    images = np.stack([decode_file(str(p), 64)[0] for p in paths])
    return {"root": root, "tree": tree, "store": store, "run": run, "paths": paths, "images": images,
            "boundary_set": boundary["feature_set"]}


def _bn(model):
    import keras

    return [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_starts_from_the_stage_two_model_and_cache_path_is_the_same_function(setup):
    config, head, recipe = load_stage_two(setup["run"])
    models = build_models(recipe, head)
    full = np.asarray(models.full.predict(setup["images"], verbose=0)).reshape(-1)
    # Stage two end to end (folded base, cached-feature head) on the same files.
    stage_two = predict(setup["run"], [str(p) for p in setup["paths"]], top_k=2)["predictions"]
    p_dog = np.array([next(t["probability"] for t in p["top"] if t["class"] == "dogs") for p in stage_two])
    assert full.std() > 1e-3  # a head that says something, not a constant
    np.testing.assert_allclose(full, p_dog, atol=1e-4)
    # From the boundary: top block + head on the boundary activation == the full model.
    boundary = np.asarray(models.boundary.predict(setup["images"], verbose=0))
    assert boundary.shape[1:] == (2, 2, 256)
    # ...and the cached boundary activations (folded base) are that activation.
    from featcache.cache.store import open_store

    with open_store(setup["store"]) as s:
        fs = s[setup["boundary_set"]]
        by_path = dict(zip(fs.column("paths"), fs.rows()))
        rows = [by_path[str(p.relative_to(setup["tree"]))] for p in setup["paths"]]
        cached = np.stack([fs.read(np.array([r]))[0] for r in rows])
    np.testing.assert_allclose(cached, boundary, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(models.top.predict(boundary, verbose=0)).reshape(-1), full, atol=1e-5)


def test_only_top_block_and_head_train_batchnorm_frozen(setup):
    _, head, recipe = load_stage_two(setup["run"])
    models = build_models(recipe, head)
    assert models.trainable == ["conv_dw_13", "conv_pw_13"]  # registry top block, BN excluded
    names = sorted(w.path for w in models.full.trainable_weights)
    # depthwise kernel + pointwise kernel (no biases in MobileNet), head: 2 Dense x (kernel, bias)
    assert len(names) == 2 + 4, names
    assert all(not layer.trainable for layer in _bn(models.base))
    assert len(models.top.trainable_weights) == 6
    with pytest.raises(Exception, match="--blocks 2"):
        build_models(recipe, head, blocks=2)
    wider = build_models(recipe, head, unfreeze="from:conv_dw_12")
    assert wider.trainable == ["conv_dw_12", "conv_pw_12", "conv_dw_13", "conv_pw_13"]
    assert wider.top is None  # below the boundary: not trainable from the cache


@pytest.fixture(scope="module")
def finetuned(setup):
    """The fine-tuned runs the command-line tests share (each finetune is a Keras fit with its
    tracing): from the images (2 epochs, --json, --no-report), from the cache (2 epochs, --json,
    with its report), and from the images with augmentation (1 epoch, text output, --no-report)."""
    root = setup["root"]
    runner = CliRunner()
    results = {}
    for name, args in (
        ("ft", [str(setup["tree"]), setup["run"], "--epochs", "2", "--lr", "1e-4", "--json", "--no-report"]),
        ("ftc", [setup["run"], "--epochs", "2", "--lr", "1e-4", "--from-cache", setup["store"], "--json"]),
        ("fta", [setup["run"], "--epochs", "1", "--augment", "flip,rotation,zoom,translation,contrast",
                 "--aug-seed", "3", "--no-report"]),
    ):
        results[name] = runner.invoke(cli, ["finetune", *args, "--out", str(root / name)])
    return results


def test_finetune_from_images_and_from_cache(setup, finetuned):
    import keras

    root = setup["root"]
    r = finetuned["ft"]
    assert r.exit_code == 0, r.output
    images_run = json.loads(r.stdout)
    r = finetuned["ftc"]
    assert r.exit_code == 0, r.output
    cache_run = json.loads(r.stdout)
    assert images_run["source"] == "images" and cache_run["source"] == "cache"
    assert cache_run["boundary_feature_set"] == setup["boundary_set"]
    stage_two = json.loads((setup["root"] / "run" / "metrics.json").read_text())
    for run in (images_run, cache_run):
        # Before any step: the stage-two model's numbers.
        assert run["before"]["validation"]["accuracy"] == stage_two["validation"]["accuracy"]
        assert run["before"]["validation"]["loss"] == pytest.approx(stage_two["validation"]["loss"], abs=1e-4)
        assert run["trainable_layers"] == ["conv_dw_13", "conv_pw_13"] and len(run["epoch_seconds"]) == 2
    fresh = load_stage_two(setup["run"])
    reference = build_models(fresh[2], fresh[1]).base
    for name in ("ft", "ftc"):
        model = keras.saving.load_model(str(root / name / "model.keras"))  # safe mode
        base = next(layer for layer in model.layers if layer.name == reference.name)
        for bn in _bn(reference):  # moving statistics untouched
            np.testing.assert_array_equal(base.get_layer(bn.name).moving_mean, bn.moving_mean)
        assert not np.allclose(base.get_layer("conv_pw_13").kernel, reference.get_layer("conv_pw_13").kernel)
        np.testing.assert_array_equal(base.get_layer("conv_pw_12").kernel, reference.get_layer("conv_pw_12").kernel)
        p = model.predict(setup["images"][:4].astype(np.float32), verbose=0)
        assert p.shape == (4, 2) and np.allclose(p.sum(axis=1), 1, atol=1e-5)
        config = json.loads((root / name / "config.json").read_text())
        assert config["head"] == "finetune" and (root / name / "history.csv").exists()
        if name == "ftc":
            _check_predict_and_tflite_export(setup, str(root / name), model)


def _check_predict_and_tflite_export(setup, run, model):
    """predict runs a fine-tuned run's end-to-end model, and its .tflite export equals it."""
    from featcache.classify.deploy.run_exported import TFLiteModel
    from featcache.classify.deploy.export import export

    paths = [str(p) for p in setup["paths"]]
    result = predict(run, paths, top_k=2)
    assert result["head"] == "finetune" and len(result["predictions"]) == len(paths)
    p_dogs = np.array([next(t["probability"] for t in p["top"] if t["class"] == "dogs") for p in result["predictions"]])
    expected = np.asarray(model.predict(setup["images"].astype(np.float32), verbose=0))
    np.testing.assert_allclose(p_dogs, expected[:, 1], atol=1e-5)
    out = setup["root"] / "ftc.tflite"
    info = export(run, str(out))
    assert info["exported_test"]["measured"] and info["exported_test"]["n"] == 6
    got = TFLiteModel(str(out)).predict_proba(setup["images"])
    assert np.abs(got - expected).max() < 1e-4


def _card_probabilities(path):
    from test_report import check_self_contained

    page = check_self_contained(path.read_text(encoding="utf-8"))
    return {c["data-path"]: (c["data-predicted"], float(c["data-probability"]))
            for c in page.cards("wrong") + page.cards("right")}


def test_finetune_report_from_cache_and_from_images(setup, finetuned, tmp_path):
    """The report at the end of finetune uses the probabilities training computed; `featcache
    report` recomputes them from the saved end-to-end model: its top part on the cached boundary
    activations (--from-cache runs) or the whole model on the decoded images."""
    runner = CliRunner()
    ftc = setup["root"] / "ftc"  # --from-cache, report written at the end
    r = finetuned["ftc"]
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["report"] == str(ftc / "report.html")
    at_training = _card_probabilities(ftc / "report.html")
    assert len(at_training) == 6  # 3 test images per class, all shown (mistakes or right answers)
    r = runner.invoke(cli, ["report", str(ftc), "--out", str(tmp_path / "again.html"), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["per_image"] and summary["notes"] == [] and summary["map_points"] == 6
    again = _card_probabilities(tmp_path / "again.html")
    assert again.keys() == at_training.keys()
    for path, (predicted, probability) in again.items():
        assert predicted == at_training[path][0] and probability == pytest.approx(at_training[path][1], abs=1e-4)

    fti = setup["root"] / "fta"  # from the images, --no-report, text output
    r = finetuned["fta"]
    assert r.exit_code == 0, r.output
    assert not (fti / "report.html").exists()
    assert not any(line.startswith("  report ") for line in r.stdout.splitlines())
    r = runner.invoke(cli, ["report", str(fti), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    metrics = json.loads((fti / "metrics.json").read_text())
    assert (summary["images"], summary["map_points"], summary["notes"]) == (6, 6, [])
    assert summary["mistakes"] == round((1 - metrics["test"]["accuracy"]) * 6)
    assert "on the images of" in (fti / "report.html").read_text(encoding="utf-8")


def test_finetune_with_augmentation(setup, finetuned):
    r = finetuned["fta"]
    assert r.exit_code == 0, r.output
    config = json.loads((setup["root"] / "fta" / "config.json").read_text())
    assert config["settings"]["augment"]["rotation"] == 0.05 and config["settings"]["aug_seed"] == 3


def test_errors(setup, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["finetune", str(setup["root"] / "logreg"), "--out", str(tmp_path / "a")])
    assert r.exit_code == 1 and "a logreg run; fine-tuning needs a dense head run" in r.stderr
    r = runner.invoke(cli, ["finetune", str(tmp_path / "nope"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 1 and "no such run directory" in r.stderr
    empty = str(tmp_path / "empty.h5")
    extract(str(setup["tree"]), empty, base="pixels", size=32, weights="none", progress=False)
    r = runner.invoke(cli, ["finetune", setup["run"], "--out", str(tmp_path / "c"), "--from-cache", empty])
    assert r.exit_code == 1
    weights = json.loads((setup["root"] / "run" / "config.json").read_text())["feature_set"]["weights_arg"]
    assert (f"create them with: featcache extract {setup['tree']} {empty} --base mobilenet_0.25 --size 64 "
            f"--weights {weights} --layer {BOUNDARY} --precision fp32") in r.stderr
    r = runner.invoke(cli, ["finetune", setup["run"], "--out", str(tmp_path / "d"), "--from-cache", setup["store"],
                            "--augment", "flip"])
    assert r.exit_code == 1 and "cannot run from cached boundary activations" in r.stderr


# -- the transfer strategies (--unfreeze none|top|from:LAYER|all) ---------------------------------


def _kernels(model) -> dict:
    """{layer name: its weights as numpy}, for every layer of the base that has weights."""
    return {layer.name: [np.array(w) for w in layer.weights] for layer in model.layers if layer.weights}


def _one_step(models, images, labels):
    import keras

    models.full.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="binary_crossentropy")
    models.full.train_on_batch(images.astype(np.float32), labels.astype(np.float32))


def _changed(before: dict, after: dict) -> set:
    return {name for name in before if any(not np.array_equal(a, b) for a, b in zip(before[name], after[name]))}


@pytest.mark.parametrize("unfreeze, base_layers, base_weights, from_cache", [
    ("none", [], 0, True),
    ("top", ["conv_dw_13", "conv_pw_13"], 2, True),
    ("from:conv_pw_12", ["conv_pw_12", "conv_dw_13", "conv_pw_13"], 3, False),  # below the boundary conv_pw_12_relu
    ("all", None, 27, False),  # conv1 + 13 depthwise + 13 pointwise kernels; MobileNet convs have no bias
])
def test_each_strategy_trains_only_what_it_should(setup, unfreeze, base_layers, base_weights, from_cache):
    import keras

    _, head, recipe = load_stage_two(setup["run"])
    models = build_models(recipe, head, unfreeze=unfreeze)
    if base_layers is not None:
        assert models.trainable == base_layers
    # The head's two Dense layers (kernel, bias) always train; BatchNormalization never does here.
    assert len(models.full.trainable_weights) == base_weights + 4
    assert all(not layer.trainable for layer in _bn(models.base)) and not models.train_bn
    before_base, before_head = _kernels(models.base), _kernels(models.head)
    labels = np.array([0, 1, 0, 1])
    _one_step(models, setup["images"][[0, -1, 1, -2]], labels)
    changed = _changed(before_base, _kernels(models.base))
    trained = {layer.name for layer in models.base.layers
               if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)}
    expected = set(models.trainable) if unfreeze != "all" else trained
    assert changed == expected  # exactly the unfrozen layers moved (BN statistics included: untouched)
    assert _changed(before_head, _kernels(models.head)) == {"hidden", "output"}
    assert (models.top is not None) == from_cache  # training below the boundary: no path from the cache


def test_all_on_a_random_base_trains_batchnorm_too(tmp_path):
    """--unfreeze all from a --weights none run is training from scratch: BN layers train
    (batch statistics, moving averages updated) since their statistics were never estimated."""
    tree = write_tree(tmp_path / "images", splits={"train": 4, "validation": 2})
    store = str(tmp_path / "s.h5")
    fs = extract(str(tree), store, base="mobilenet_0.25", size=32, weights="none", pooling="avg",
                 precision="fp32", progress=False)["feature_set"]
    train(store, fs, head="dense", out=str(tmp_path / "run"), epochs=1, units=8, report=False)
    _, head, recipe = load_stage_two(str(tmp_path / "run"))
    models = build_models(recipe, head, unfreeze="all")
    assert models.train_bn and all(layer.trainable for layer in _bn(models.base))
    # 27 conv kernels + 27 BN x (gamma, beta) + the head's 4
    assert len(models.full.trainable_weights) == 27 + 54 + 4
    bn = _bn(models.base)[0]
    mean_before = np.array(bn.moving_mean)
    images = np.stack([decode_file(str(p), 32)[0] for p in sorted(tree.rglob("*.jpg"))[:4]])
    _one_step(models, images, np.array([0, 0, 1, 1]))
    assert not np.array_equal(mean_before, np.array(bn.moving_mean))


def test_unfreeze_options_on_the_command_line(setup, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli, ["finetune", setup["run"], "--out", str(tmp_path / "none"), "--unfreeze", "none",
                            "--epochs", "1", "--from-cache", setup["store"], "--json", "--no-report"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["unfreeze"] == "none" and result["trainable_layers"] == [] and result["trainable_parameters"] == 16 * 256 + 16 + 17
    assert json.loads((tmp_path / "none" / "config.json").read_text())["settings"]["unfreeze"] == "none"
    r = runner.invoke(cli, ["finetune", setup["run"], "--out", str(tmp_path / "alias"), "--unfreeze-from", "conv_pw_13",
                            "--epochs", "1", "--from-cache", setup["store"], "--json", "--no-report"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["unfreeze"] == "from:conv_pw_13" and json.loads(r.stdout)["trainable_layers"] == ["conv_pw_13"]
    for args, message in (
        (["--unfreeze", "all", "--from-cache", setup["store"]],
         "error: --unfreeze all: trains layers at or below the boundary conv_pw_12_relu; the cache holds activations above it"),
        (["--unfreeze", "some"], "error: --unfreeze 'some': choose none (base frozen, head only), top"),
        (["--unfreeze", "from:"], "error: --unfreeze 'from:': choose none"),
        (["--unfreeze", "all", "--unfreeze-from", "conv_pw_13"], "error: --unfreeze-from conv_pw_13: conflicts with --unfreeze all"),
        (["--unfreeze", "from:conv_pw_99"], "error: layer 'conv_pw_99' is not in"),
    ):
        r = runner.invoke(cli, ["finetune", setup["run"], "--out", str(tmp_path / "x"), "--epochs", "1", *args])
        assert r.exit_code == 1 and r.stderr.startswith(message), (args, r.stderr)


def test_from_cache_refuses_a_damaged_boundary_row(setup, tmp_path):
    import shutil

    import h5py

    damaged = tmp_path / "damaged.h5"
    shutil.copyfile(setup["store"], damaged)
    with h5py.File(damaged, "r") as f:
        ds = f["feature_sets"][setup["boundary_set"]]["features"]
        offset = ds.id.get_chunk_info(0).byte_offset + 1000  # inside row 0 (2x2x256 float32 = 4 KiB a row)
    with open(damaged, "r+b") as fh:
        fh.seek(offset)
        byte = fh.read(1)[0]
        fh.seek(offset)
        fh.write(bytes([byte ^ 1]))
    r = CliRunner().invoke(cli, ["finetune", setup["run"], "--out", str(tmp_path / "e"), "--from-cache", str(damaged)])
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"error: {damaged}: feature set {setup['boundary_set']}: damaged features, row 0 "
                               "(checksum mismatch)")
