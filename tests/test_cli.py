"""The CLI in-process through click's CliRunner: exit codes, JSON, one-line errors."""
import json
import subprocess
import sys

from click.testing import CliRunner

from conftest import REPO
from featcache import __version__
from featcache.cli import cli


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_extract_json_and_info(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    result = invoke("extract", image_tree, store, "--base", "pixels", "--size", "8", "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    for field in ("feature_set", "shape", "extracted", "reused", "failed", "seconds", "images_per_second"):
        assert field in out
    assert out["shape"] == [12, 8, 8, 3] and out["extracted"] == 12

    info = invoke("info", store, "--json")
    assert info.exit_code == 0
    fs = json.loads(info.stdout)["feature_sets"][0]
    assert fs["feature_set"] == out["feature_set"] and fs["shape"] == [12, 8, 8, 3]
    assert sum(fs["counts"]["train"].values()) + sum(fs["counts"]["validation"].values()) + sum(fs["counts"]["test"].values()) == 12
    text = invoke("info", store)
    assert out["feature_set"] in text.stdout and "key: backbone=pixels" in text.stdout


def test_extract_exit_codes(image_tree, tmp_path):
    (image_tree / "cats" / "bad.jpg").write_bytes(b"nope")
    ok = invoke("extract", image_tree, tmp_path / "a.h5", "--base", "pixels", "--size", "8", "--no-progress")
    assert ok.exit_code == 0 and "failed: cats/bad.jpg: not an image" in ok.stderr
    strict = invoke("extract", image_tree, tmp_path / "b.h5", "--base", "pixels", "--size", "8", "--no-progress", "--strict")
    assert strict.exit_code == 1
    only_bad = tmp_path / "bad" / "x"
    only_bad.mkdir(parents=True)
    (only_bad / "a.jpg").write_bytes(b"")
    nothing = invoke("extract", tmp_path / "bad", tmp_path / "c.h5", "--base", "pixels", "--no-progress")
    assert nothing.exit_code == 1 and "empty file" in nothing.stderr


def test_user_mistakes_are_one_line(tmp_path):
    result = invoke("extract", tmp_path / "missing", tmp_path / "s.h5", "--base", "pixels")
    assert result.exit_code == 1
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
    assert "Traceback" not in result.output
    unknown = invoke("extract", tmp_path, tmp_path / "s.h5", "--base", "vgg61")
    assert unknown.exit_code == 1 and "did you mean 'vgg16'" in unknown.stderr
    info = invoke("info", tmp_path / "missing.h5")
    assert info.exit_code == 1 and "no such store" in info.stderr


def test_bases_lists_the_registry():
    from featcache.extract.bases.backbones import REGISTRY

    result = invoke("bases", "--json")
    assert result.exit_code == 0
    names = [b["name"] for b in json.loads(result.stdout)]
    assert names == list(REGISTRY) and "vgg16" in names and "pixels" in names
    assert "vgg16" in invoke("bases").stdout


def test_version_and_help():
    assert __version__ in invoke("--version").stdout
    assert "extract" in invoke("--help").stdout


def test_help_and_info_do_not_import_tensorflow():
    code = (
        "import sys; from click.testing import CliRunner; from featcache.cli import cli; "
        "r = CliRunner().invoke(cli, ['--help']); r2 = CliRunner().invoke(cli, ['bases']); "
        "assert r.exit_code == 0 and r2.exit_code == 0; "
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'TF imported'; "
        "assert 'optuna' not in sys.modules and 'sklearn' not in sys.modules, 'optuna or sklearn imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""})


def test_python_dash_m_works():
    out = subprocess.run([sys.executable, "-m", "featcache", "--version"], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": ""})
    assert out.returncode == 0 and __version__ in out.stdout


def test_ctrl_c_before_extraction_starts_exits_130_in_one_line(image_tree, tmp_path, monkeypatch):
    """Ctrl-C while TensorFlow loads or the model builds (before extraction's own handlers)."""
    from featcache.extract import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "extract", interrupted)
    result = invoke("extract", image_tree, tmp_path / "s.h5", "--base", "pixels", "--no-progress")
    assert result.exit_code == 130 and result.stderr == "interrupted\n"
