"""Run directories are safe to share: no file featcache loads can run code (issue 26).

A crafted model.joblib whose unpickling would create a marker file, with its sha256 written
into config.json as an attacker would, is refused by predict, export, report, ensemble and
the API unless --trust-pickle / trust_pickle=True is given; new logistic-regression runs hold
no pickle and predict exactly as the scikit-learn pipeline they were fitted as."""
import json
import os
import pickle
import pickletools
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import pixel_store
from featcache.classify.runs import run_dir as rundir
from featcache.cli import cli

CLASSES = ("cats", "dogs")


class _Marker:
    """Unpickling this calls open(path, "w"): the marker file appears iff the pickle ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import featcache

    made = pixel_store(tmp_path_factory.mktemp("trust"), CLASSES, {"train": 8, "validation": 3, "test": 3}, (8,))
    root = made["root"]
    logreg = featcache.train(made["store"], out=root / "logreg", head="logreg", no_report=True)
    dense = featcache.train(made["store"], out=root / "dense", head="dense", epochs=2, no_report=True)
    return {**made, "logreg": logreg["run_dir"], "dense": dense["run_dir"]}


def _crafted(runs, tmp_path):
    """A copy of the logreg run whose model.joblib would create ``marker`` when unpickled,
    its sha256 recorded in config.json (what someone who edits both files can do)."""
    run_dir = tmp_path / "crafted"
    shutil.copytree(runs["logreg"], run_dir)
    marker = tmp_path / "marker"
    with open(run_dir / "model.joblib", "wb") as f:
        pickle.dump(_Marker(str(marker)), f)
    os.remove(run_dir / "model.npz")
    config = json.loads((run_dir / "config.json").read_text())
    config["model"] = {"file": "model.joblib", "sha256": rundir.sha256_file(str(run_dir / "model.joblib"))}
    (run_dir / "config.json").write_text(json.dumps(config))
    return run_dir, marker


@pytest.mark.parametrize("command", ["predict", "export", "report", "ensemble"])
def test_a_crafted_pickle_is_refused_by_every_command_and_never_runs(runs, tmp_path, command):
    run_dir, marker = _crafted(runs, tmp_path)
    args = {"predict": ["predict", run_dir, runs["tree"] / "test"],
            "export": ["export", run_dir, tmp_path / "m.keras", "--no-evaluate"],
            "report": ["report", run_dir],
            "ensemble": ["ensemble", run_dir, runs["dense"], "--out", tmp_path / "ens", "--no-report"]}[command]
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert not marker.exists(), f"{command} unpickled the crafted file"
    if command == "report":  # the page is still written from what the run directory holds, and says why
        assert result.exit_code == 0, result.output
        assert "--trust-pickle" in (run_dir / "report.html").read_text()
    else:
        assert result.exit_code == 1, result.output
        assert "model.joblib: a pickled model" in result.output and "--trust-pickle" in result.output
        assert "featcache upgrade" in result.output


def test_the_api_refuses_it_and_the_flag_loads_it(runs, tmp_path):
    import featcache

    run_dir, marker = _crafted(runs, tmp_path)
    with pytest.raises(featcache.FeatcacheError, match="--trust-pickle"):
        featcache.predict(run_dir, [str(runs["tree"] / "test")])
    assert not marker.exists()
    # Trusted, it is unpickled (which is exactly what makes it dangerous): the marker appears.
    with pytest.raises(Exception):
        featcache.predict(run_dir, [str(runs["tree"] / "test")], trust_pickle=True)
    assert marker.exists()


def _pickle_opcodes(data: bytes) -> bool:
    """True when ``data`` starts like a pickle (protocol 2+ PROTO opcode) that pickletools parses."""
    if len(data) < 2 or data[0] != 0x80 or data[1] > 5:
        return False
    try:
        for _ in pickletools.genops(data):
            pass
        return True
    except Exception:  # noqa: BLE001  (not a pickle after all)
        return False


def test_a_new_logreg_run_holds_no_pickle_and_predicts_as_the_pipeline(runs):
    import zipfile

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from featcache import open_store

    run_dir = runs["logreg"]
    for name in os.listdir(run_dir):
        data = open(os.path.join(run_dir, name), "rb").read()
        assert not _pickle_opcodes(data), name
        if name.endswith(".npz"):
            with zipfile.ZipFile(os.path.join(run_dir, name)) as z:
                for member in z.namelist():  # each member a .npy of plain dtype (numpy refuses object arrays)
                    assert not _pickle_opcodes(z.read(member)), member
    with np.load(os.path.join(run_dir, "model.npz"), allow_pickle=False) as f:
        assert "classifier.coef_" in f.files
    config, head = rundir.load_head(run_dir)
    with open_store(runs["store"]) as s:
        fs = s[runs["sets"][0]]
        x_train, y_train = fs.load("train")
        x_test, _ = fs.load("test")
    reference = Pipeline([("scale", StandardScaler()),
                          ("logreg", LogisticRegression(C=1.0, max_iter=1000, solver="lbfgs", random_state=0))])
    reference.fit(x_train.reshape(len(x_train), -1), y_train)
    np.testing.assert_array_equal(head.predict_proba(x_test), reference.predict_proba(x_test.reshape(len(x_test), -1)))


def test_a_file_that_is_not_a_head_is_refused_in_one_line(tmp_path):
    from featcache.classify.heads.safe_arrays import load_pipeline
    from featcache.errors import FeatcacheError

    path = tmp_path / "model.npz"
    np.savez(path, meta=np.array([object()], dtype=object))  # an object array: numpy refuses it unpickled
    with pytest.raises(FeatcacheError, match="not a featcache head file"):
        load_pipeline(str(path))
