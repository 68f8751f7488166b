"""featcache search: artifacts, resume after kill -9, two processes on one study, pruning,
the test split kept out of the search, seeding, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from click.testing import CliRunner

from conftest import REPO, class_image, pixel_store, write_tree
from featcache.classify.train import harness
from featcache.classify.search import leaderboard
from featcache.classify.search.search import search
from featcache.cli import cli
from featcache.errors import FeatcacheError
from featcache.extract.pipeline import ExtractConfig, extract

CLASSES = ("cats", "dogs")


@pytest.fixture(scope="module")
def pixels(tmp_path_factory):
    """Two pixel feature sets of the same 2 x (8 train, 4 validation, 4 test) images."""
    return pixel_store(tmp_path_factory.mktemp("search"), CLASSES, {"train": 8, "validation": 4, "test": 4}, (6, 8))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def states(out, name="search"):
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{out}/study.db")
    return [t.state.name for t in study.get_trials(deepcopy=False)], study


def test_search_writes_every_artifact_and_best_is_an_ordinary_run(pixels, tmp_path, monkeypatch):
    from featcache.classify.heads import dense as dense_head

    # Keras costs ~2 CPU s per fit plus ~0.1 s per epoch on these few rows: fewer epochs, same code.
    monkeypatch.setattr(dense_head, "DENSE_EPOCHS", (2, 4, 2))
    out = tmp_path / "search"
    result = run("search", pixels["store"], "--out", out, "--trials", 4, "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["trials"]["finished"] == 4 and summary["trials"]["ran_here"] == 4 and not summary["resumed"]
    assert summary["sampler"]["kind"] == "tpe" and summary["sampler"]["seed"] == 0 and summary["pruner"] == "median"
    for name in ("study.db", "leaderboard.csv", "leaderboard.json", "search.json", "optimization_history.png",
                 "best/config.json", "best/metrics.json", "best/history.csv", "best/report.html", "leaderboard.html"):
        assert (out / name).is_file(), name
    page = (out / "leaderboard.html").read_text()
    assert page.count('href="best/report.html"') == 1 and "http" not in page.replace("http-equiv", "")
    for key, name in (("history_plot", "optimization_history.png"), ("intermediate_plot", "intermediate_values.png"),
                      ("importance_plot", "param_importances.png")):
        assert summary["files"][key] == str(out / name) and (out / name).stat().st_size > 10_000, name
    assert summary["notes"] == []
    # The progress lines: one per trial.
    assert sum(line.startswith("trial ") for line in result.stderr.splitlines()) == 4

    board = json.loads((out / "leaderboard.json").read_text())["trials"]
    assert sorted(r["trial"] for r in board) == [0, 1, 2, 3]
    complete = [r for r in board if r["state"] == "COMPLETE"]
    assert [r["rank"] for r in complete] == list(range(1, len(complete) + 1))
    assert [r["loss"] for r in complete] == sorted(r["loss"] for r in complete)
    # Only the top 3 complete trials carry test scores.
    assert [r["test"] is not None for r in complete] == [i < 3 for i in range(len(complete))]
    assert all(r["test"] is None for r in board if r["state"] != "COMPLETE")
    assert {r["feature_set"] for r in board} <= set(pixels["sets"]) and {r["head"] for r in board} <= {"dense", "logreg"}
    csv_lines = (out / "leaderboard.csv").read_text().splitlines()
    assert csv_lines[0].startswith("rank,trial,state,head,feature_set,validation_loss,validation_accuracy,")
    assert len(csv_lines) == 5

    best = summary["best"]
    assert best["trial"] == complete[0]["trial"] and best["run_dir"] == str(out / "best")
    # Retrained with the trial's settings and seed: the same validation loss as in the search.
    assert best["retrained"]["validation"]["loss"] == pytest.approx(best["loss"], rel=1e-5, abs=1e-7)
    config = json.loads((out / "best" / "config.json").read_text())
    assert config["head"] == best["head"] and config["feature_set"]["name"] == best["feature_set"]
    assert all(config["settings"][k] == v for k, v in best["params"].items())
    metrics = json.loads((out / "best" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] == best["test"]["accuracy"]

    # predict and export accept best/ like any run directory.
    predicted = run("predict", out / "best", pixels["tree"] / "test", "--json")
    assert predicted.exit_code == 0, predicted.stderr
    assert len(json.loads(predicted.stdout)["predictions"]) == 8
    exported = run("export", out / "best", tmp_path / "best.keras")
    assert exported.exit_code == 0 and (tmp_path / "best.keras").is_file()

    # Running the finished study again trains nothing (tests and best/ are reused) and prints the board.
    best_mtime = (out / "best" / "config.json").stat().st_mtime_ns
    again = run("search", pixels["store"], "--out", out, "--trials", 4)
    assert again.exit_code == 0, again.stderr
    lines = again.stdout.splitlines()
    assert lines[0].startswith(f"study 'search' in {out}/study.db: 4 of 4 trials finished (")
    assert "), 0 failed; 0 run now in " in lines[0]
    assert lines[1].split()[:4] == ["#", "trial", "head", "feature"]
    assert lines[2].split()[:2] == ["1", str(best["trial"])]
    assert f"run directory {out}/best" in again.stdout and "testing trial" not in again.stderr
    assert (out / "best" / "config.json").stat().st_mtime_ns == best_mtime

    # Other settings on the same study are refused: the trials would not be comparable.
    other = run("search", pixels["store"], "--out", out, "--heads", "logreg")
    assert other.exit_code == 1
    assert other.stderr == (f"error: {out}/study.db: study 'search' was started with other settings "
                            "(heads: study dense,logreg, now logreg); resume with the same options, or choose a new --out\n")


def _slow_search_script(store, out, trials, barrier=None):
    """A featcache search in a subprocess whose trials take at least 0.4 s (a sleep before
    each), so that a kill lands inside a trial; with ``barrier``, the first trial waits until
    two processes have started one."""
    return f"""
import os, sys, time
import featcache.classify.train.harness as h
original = h.score_head
def slow(*args, **kwargs):
    barrier = {str(barrier) if barrier else None!r}
    if barrier:
        open(os.path.join(barrier, str(os.getpid())), "w").close()
        deadline = time.time() + 120
        while len(os.listdir(barrier)) < 2 and time.time() < deadline:
            time.sleep(0.05)
    time.sleep(0.4)
    return original(*args, **kwargs)
h.score_head = slow
from featcache.cli import main
sys.argv = ["featcache", "search", {store!r}, "--out", {str(out)!r}, "--trials", "{trials}", "--heads", "logreg"]
main()
"""


def _python(code):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _peek_states(out) -> list[str]:
    """Trial states read with plain sqlite3, read-only: Optuna would create missing tables."""
    import contextlib
    import sqlite3

    if not (out / "study.db").exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"file:{out / 'study.db'}?mode=ro", uri=True)) as db:
            return [row[0] for row in db.execute("SELECT state FROM trials ORDER BY number")]
    except sqlite3.OperationalError:  # being created
        return []


def test_resume_after_kill_9_finishes_exactly_n_trials(pixels, tmp_path):
    out = tmp_path / "killed"
    proc = _python(_slow_search_script(pixels["store"], out, 6))
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            found = _peek_states(out)
            if found.count("COMPLETE") >= 2 and found[-1] == "RUNNING":
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the search did not get going: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before, _ = states(out)
    assert before[-1] == "RUNNING"  # the trial the kill interrupted
    killed = len(before) - 1

    result = run("search", pixels["store"], "--out", out, "--trials", 6, "--heads", "logreg", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    after, study = states(out)
    assert after.count("COMPLETE") == 6 and after.count("RUNNING") == 0
    assert after[killed] == "FAIL" and summary["trials"]["marked_failed"] == [killed]
    assert study.trials[killed].user_attrs["error"] == "its process ended while it ran (killed?)"
    assert summary["resumed"] and summary["trials"]["ran_here"] == 6 - before.count("COMPLETE")
    failed_row = next(r for r in summary["leaderboard"] if r["trial"] == killed)
    assert failed_row["state"] == "FAIL" and failed_row["rank"] is None and "killed" in failed_row["note"]


def test_a_running_trial_of_a_dead_process_does_not_block_or_count(pixels, tmp_path):
    """Deterministic variant: a RUNNING trial stamped with a pid that has exited."""
    out = tmp_path / "stale"
    search(pixels["store"], str(out), trials=2, heads="logreg")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _, study = states(out)
    trial = study.ask()
    trial.set_user_attr("worker", {"host": os.uname().nodename, "pid": gone.pid, "start": "1"})
    result = search(pixels["store"], str(out), trials=4, heads="logreg")
    after, _ = states(out)
    assert after == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert result["trials"]["marked_failed"] == [2] and result["trials"]["ran_here"] == 2


def test_two_processes_share_one_study(pixels, tmp_path):
    out, barrier = tmp_path / "shared", tmp_path / "barrier"
    barrier.mkdir()
    procs = [_python(_slow_search_script(pixels["store"], out, 8, barrier)) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    found, study = states(out)
    assert found == ["COMPLETE"] * 8  # exactly --trials, none failed, none twice
    workers = {t.user_attrs["worker"]["pid"] for t in study.trials}
    assert workers == {p.pid for p in procs}  # both did some of the work
    # Per-trial seeds: the processes did not replay each other's proposals.
    assert len({t.params["C"] for t in study.trials}) == 8


def test_pruned_trials_are_recorded(pixels, tmp_path):
    """A pruner that prunes every dense trial at its first epoch."""
    out = tmp_path / "pruned"
    result = search(pixels["store"], str(out), trials=2, heads="dense", pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    found, study = states(out)
    assert found == ["PRUNED", "PRUNED"]
    assert all(list(t.intermediate_values) == [0] for t in study.trials)  # stopped after epoch 1
    assert result["trials"]["pruned"] == 2 and result["trials"]["finished"] == 2 and result["best"] is None
    row = result["leaderboard"][0]
    assert row["state"] == "PRUNED" and row["note"].startswith("pruned at epoch 1 (validation loss ")
    assert row["loss"] == pytest.approx(study.trials[row["trial"]].intermediate_values[0]) and row["epochs_run"] == 1
    assert "no complete trial yet: no best run, nothing tested" in result["notes"]
    assert not (out / "best").exists() and (out / "intermediate_values.png").is_file()
    assert any(n.startswith("parameter importances: need at least 2 complete trials") for n in result["notes"])


def test_the_test_split_is_read_only_for_the_top_trials(pixels, tmp_path, monkeypatch):
    from featcache.cache.store import FeatureSet, open_store

    with open_store(pixels["store"]) as s:
        test_rows = {name: set(s[name].rows("test").tolist()) for name in pixels["sets"]}
    reads, retrained = [], []
    original_read, original_train = FeatureSet.read, harness.train

    def read(self, rows):
        reads.append((self.name, bool(retrained and retrained[-1] == "in"), set(np.asarray(rows).tolist())))
        return original_read(self, rows)

    def train(*args, **kwargs):
        retrained.append("in")
        try:
            return original_train(*args, **kwargs)
        finally:
            retrained.append("out")

    monkeypatch.setattr(FeatureSet, "read", read)
    monkeypatch.setattr(harness, "train", train)
    out = tmp_path / "split"
    result = search(pixels["store"], str(out), trials=5, heads="logreg", sampler="random")
    outside = [r for r in reads if not r[1]]
    assert outside and not any(rows & test_rows[name] for name, _, rows in outside)
    assert retrained.count("in") == 3  # the top 3 only
    tested = [r for r in result["leaderboard"] if r["test"]]
    assert [r["rank"] for r in tested] == [1, 2, 3]
    assert any(rows & test_rows[name] for name, inside, rows in reads if inside)
    retrained.clear()
    search(pixels["store"], str(out), trials=5, heads="logreg", sampler="random")
    assert retrained == []  # scores kept in the study: nothing retrained


def test_cross_validation_objective(pixels, tmp_path):
    result = search(pixels["store"], str(tmp_path / "cv"), trials=2, heads="logreg", feature_sets=pixels["sets"][0], cv=2)
    assert result["objective"].startswith("cv2 loss")
    for row in result["leaderboard"]:
        assert row["cv"]["k"] == 2 and len(row["cv"]["folds"]) == 2
        assert row["loss"] == pytest.approx(row["cv"]["loss_mean"]) and row["accuracy"] == row["cv"]["accuracy_mean"]
    csv_head = (tmp_path / "cv" / "leaderboard.csv").read_text().splitlines()[0]
    assert csv_head.startswith("rank,trial,state,head,feature_set,cv2_loss,cv2_accuracy,")
    assert result["best"]["test"]["n"] == 8


def test_the_sampler_is_seeded(pixels, tmp_path):
    def proposals(name, seed, sampler="tpe"):
        search(pixels["store"], str(tmp_path / name), trials=2, heads="logreg", sampler=sampler, seed=seed)
        return [t.params for t in states(tmp_path / name)[1].trials]

    first = proposals("a", 0)
    assert proposals("b", 0) == first and proposals("c", 1) != first
    assert proposals("r1", 5, "random") == proposals("r2", 5, "random")


def test_ctrl_c_marks_the_trial_failed_and_the_same_command_resumes(pixels, tmp_path, monkeypatch):
    calls = []
    original = harness.score_head

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(harness, "score_head", interrupt_second)
    out = tmp_path / "ctrl-c"
    args = ("search", pixels["store"], "--out", out, "--trials", 3, "--heads", "logreg")
    result = run(*args)
    assert result.exit_code == 130
    assert result.stderr.splitlines()[-1] == (f"interrupted: 1 of 3 trials finished in {out}/study.db; "
                                              "run the same command again to resume")
    assert states(out)[0] == ["COMPLETE", "FAIL"]
    result = run(*args)
    assert result.exit_code == 0, result.stderr
    assert states(out)[0] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]


def _tree(root, layout):
    for split, classes in layout.items():
        for name, n in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                class_image(CLASSES.index(name), i).save(folder / f"{name}{i}.png")
    return root


def test_bad_input_gets_one_line(pixels, tmp_path):
    store = pixels["store"]

    def error(*args):
        result = run("search", *args)
        assert result.exit_code == 1 and result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
        return result.stderr.removeprefix("error: ").rstrip("\n")

    assert error(store, "--out", tmp_path / "a", "--trials", 0) == "--trials 0: must be at least 1"
    assert error(store, "--out", tmp_path / "a", "--heads", "dense,svm") == "--heads: unknown head 'svm'; choose from dense, logreg, knn"
    assert error(store, "--out", tmp_path / "a", "--feature-sets", "nope") == (
        f"{store}: no feature set 'nope' (feature sets: {', '.join(sorted(pixels['sets']))})")

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "study.db").write_bytes(b"\x00not a database" * 64)
    assert error(store, "--out", garbage) == (f"{garbage}/study.db: not an Optuna study database (not an SQLite file); "
                                              "move it away or choose another --out")
    assert (garbage / "study.db").read_bytes() == b"\x00not a database" * 64  # untouched
    other_sqlite = tmp_path / "sqlite"
    other_sqlite.mkdir()
    import sqlite3

    with sqlite3.connect(other_sqlite / "study.db") as db:
        db.execute("CREATE TABLE notes (text)")
    assert error(store, "--out", other_sqlite).endswith("study.db: not an Optuna study database (an SQLite file "
                                                        "without Optuna's tables); move it away or choose another --out")

    named = tmp_path / "named"
    assert run("search", store, "--out", named, "--trials", 1, "--heads", "logreg", "--study", "first").exit_code == 0
    assert error(store, "--out", named, "--heads", "logreg", "--study", "second") == (
        f"{named}/study.db: no study named 'second' (it holds: first); resume it with that --study, "
        "or choose a new --out for a new study")
    crowded = tmp_path / "crowded"
    crowded.mkdir()
    (crowded / "notes.txt").write_text("mine")
    assert error(store, "--out", crowded) == (f"{crowded}: exists and holds no search (study.db missing, other files: "
                                              "notes.txt); choose a new --out")

    one = _tree(tmp_path / "one", {"train": {"cats": 4}, "validation": {"cats": 2, "dogs": 2}})
    one_store = tmp_path / "one.h5"
    fs = extract(str(one), str(one_store), ExtractConfig(base="pixels", size=6, progress=False))["feature_set"]
    assert error(one_store, "--out", tmp_path / "b") == (
        f"{one_store}: {fs}: the training split has only one class (cats); a classifier needs at least two")
    empty = write_tree(tmp_path / "empty", per_class=3)
    empty_store = tmp_path / "empty.h5"
    fs = extract(str(empty), str(empty_store), ExtractConfig(base="pixels", size=6, progress=False,
                                                             split_fractions=(0.0, 0.5, 0.5)))["feature_set"]
    assert error(empty_store, "--out", tmp_path / "c") == (
        f"{empty_store}: {fs}: the training split is empty (no active rows with split 'train')")
    no_val = _tree(tmp_path / "noval", {"train": {"cats": 3, "dogs": 3}, "test": {"cats": 2, "dogs": 2}})
    no_val_store = tmp_path / "noval.h5"
    fs = extract(str(no_val), str(no_val_store), ExtractConfig(base="pixels", size=6, progress=False))["feature_set"]
    assert error(no_val_store, "--out", tmp_path / "d") == (
        f"{no_val_store}: {fs} has no validation rows; search ranks trials on the validation split: "
        "extract with one, or use --cv K")
    assert not (tmp_path / "b").exists() or not (tmp_path / "b" / "study.db").exists()


def test_search_options_are_checked_in_python_too(pixels, tmp_path):
    with pytest.raises(FeatcacheError, match=r"--timeout 0: must be more than 0 seconds"):
        search(pixels["store"], str(tmp_path / "x"), timeout=0)
    with pytest.raises(FeatcacheError, match=r"--sampler 'grid': choose from tpe, random"):
        search(pixels["store"], str(tmp_path / "x"), sampler="grid")
    with pytest.raises(FeatcacheError, match=r"--cv 13: class 'cats' has only 12 train\+validation rows"):
        search(pixels["store"], str(tmp_path / "x"), cv=13)


def test_unlabeled_sets_are_refused_when_named_and_left_out_otherwise(pixels, tmp_path):
    import featcache

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        class_image(i % 2, i).save(folder / f"photo_{i}.jpg")
    flat = tmp_path / "flat.h5"
    name = featcache.extract_features(folder, flat, base="pixels", size=6, progress=False)["feature_set"]
    expected = (f"error: {flat}: feature set {name} is unlabeled (its images had no class folders); "
                "training needs a labelled folder: one subfolder of images per class\n")
    for extra in ((), ("--feature-sets", name)):
        result = run("search", flat, "--out", tmp_path / "s", "--heads", "logreg", *extra)
        assert result.exit_code == 1 and result.stderr == expected
    assert not (tmp_path / "s").exists()
    # A store with both: the labelled set is searched, the unlabeled one left out.
    mixed = tmp_path / "mixed.h5"
    labelled = featcache.extract_features(pixels["tree"], mixed, base="pixels", size=6, progress=False)["feature_set"]
    featcache.extract_features(folder, mixed, base="pixels", size=8, progress=False)
    result = featcache.search(mixed, out=tmp_path / "m", trials=1, heads="logreg")
    assert [r["feature_set"] for r in result["leaderboard"]] == [labelled]
