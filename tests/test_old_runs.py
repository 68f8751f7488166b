"""A store and run directories written before the restructure into packages (commit 472b177,
tests/fixtures/old_main) still load, predict, export and report the same. The logistic
regression's model.joblib is a pickle: it loads only when trusted (trust_pickle=True, as a user
who made it would pass), and `upgrade` rewrites it in the safe format."""
import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO
from featcache.cli import cli

FIXTURE = REPO / "tests" / "fixtures" / "old_main"


@pytest.fixture(scope="module")
def old_main(tmp_path_factory):
    """The fixture copied, its recorded absolute paths pointed at the copy."""
    root = tmp_path_factory.mktemp("old") / "old_main"
    shutil.copytree(FIXTURE, root)
    for config_path in root.glob("runs/*/config.json"):
        config = json.loads(config_path.read_text())
        config["feature_set"].update(store=str(root / "features.h5"), image_root=str(root / "images"))
        config_path.write_text(json.dumps(config, indent=2))
    return root


def test_the_old_store_opens_and_verifies(old_main):
    import featcache

    (entry,) = featcache.info(old_main / "features.h5")["feature_sets"]
    assert entry["feature_set"] == "pixels-8-output-none-float32-fcbb1cdbb259"  # the key is unchanged
    assert entry["rows_active"] == 30 and entry["class_names"] == ["cats", "dogs"]
    result = CliRunner().invoke(cli, ["verify", str(old_main / "features.h5")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("head", ["logreg", "dense"])
def test_old_runs_score_their_test_split_as_recorded(old_main, head):
    from featcache.classify.runs.cached import split_probabilities

    from featcache.classify.heads.safe_arrays import trusting_pickles

    run_dir = old_main / "runs" / head
    recorded = json.loads((run_dir / "metrics.json").read_text())["test"]
    with trusting_pickles(head == "logreg"):
        _, labels, proba = split_probabilities(str(run_dir), "test")
    assert len(labels) == recorded["n"]
    assert np.mean(proba.argmax(1) == labels) == pytest.approx(recorded["accuracy"])


@pytest.mark.parametrize("head", ["logreg", "dense"])
def test_old_runs_predict_and_export(old_main, head, tmp_path):
    import featcache
    from featcache.classify.heads.safe_arrays import trusting_pickles
    from featcache.classify.runs.cached import split_probabilities

    run_dir = old_main / "runs" / head
    trust = head == "logreg"
    with trusting_pickles(trust):
        paths, _, cached = split_probabilities(str(run_dir), "test")
    predicted = featcache.predict(run_dir, [str(old_main / "images" / p) for p in paths], top_k=2,
                                  trust_pickle=trust)["predictions"]
    got = np.array([[t["probability"] for t in sorted(p["top"], key=lambda t: t["class"])] for p in predicted])
    np.testing.assert_allclose(got, cached, atol=1e-5)  # predict on the files = the cached features' scores
    exported = featcache.export(run_dir, tmp_path / "model.keras", trust_pickle=trust)
    assert exported["exported_test"]["accuracy"] == pytest.approx(exported["run_test_accuracy"])


def test_an_old_run_gets_a_report(old_main, tmp_path):
    result = CliRunner().invoke(cli, ["report", str(old_main / "runs" / "dense"), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert "<html" in (tmp_path / "r.html").read_text().lower()


def test_the_old_pickled_head_is_refused_untrusted_and_upgraded_with_the_same_predictions(old_main, tmp_path):
    import featcache
    from featcache.classify.heads.safe_arrays import trusting_pickles
    from featcache.classify.runs.cached import split_probabilities

    run_dir = tmp_path / "logreg"
    shutil.copytree(old_main / "runs" / "logreg", run_dir)
    with pytest.raises(featcache.FeatcacheError, match=r"model.joblib: a pickled model .* --trust-pickle .* "
                                                       r"`featcache upgrade "):
        featcache.predict(run_dir, [str(old_main / "images")])
    with trusting_pickles(True):
        before = split_probabilities(str(run_dir), "test").proba
    result = CliRunner().invoke(cli, ["upgrade", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["upgraded"] and summary["from"] == "model.joblib" and summary["to"] == "model.npz"
    assert summary["checked_on"].startswith("the test split") and summary["max_abs_difference"] == 0.0
    assert sorted(p.name for p in run_dir.iterdir() if p.name.startswith("model")) == ["model.npz"]
    np.testing.assert_array_equal(split_probabilities(str(run_dir), "test").proba, before)  # no trust needed now
    again = CliRunner().invoke(cli, ["upgrade", str(run_dir)])
    assert again.exit_code == 0 and "nothing to upgrade" in again.output
