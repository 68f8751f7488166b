"""`featcache report`: one self-contained HTML page per run, with its mistakes and a map of the
features; the automatic report of train, compare --out's leaderboard, and what a report says
when the store or the images moved.

The runs are built so that the mistakes are known: a few test images are moved into another
class's folder. The pixel features see colour, which the generated images take from their
real class, so the head predicts the real class and exactly the moved files are wrong."""
from __future__ import annotations

import io
import json
import os
import shutil
from html.parser import HTMLParser

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import write_tree
from featcache.classify.report.leaderboard_page import render_leaderboard
from featcache.cli import cli
from featcache.extract.pipeline import extract

CLASSES = ("cats", "dogs", "birds")
# (file, from class folder, to class folder): moved test images, the known mistakes
MOVED = [("cats.200.jpg", "cats", "dogs"), ("cats.201.jpg", "cats", "dogs"), ("dogs.202.jpg", "dogs", "birds")]
VOID = {"meta", "img", "br", "hr", "link", "input", "source", "wbr", "area", "base", "col", "embed", "track"}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


class Page(HTMLParser):
    """Parses a report: checks nesting, collects what tests look at."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.stack, self.errors, self.tags = [], [], []
        self.doctype = None
        self.feed(text)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {self.stack}")

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()

    def all(self, tag, **where):
        return [a for t, a in self.tags if t == tag and all(a.get(k) == v for k, v in where.items())]

    def cards(self, kind):
        return [a for a in self.all("figure") if a.get("class") == f"card {kind}"]


def check_self_contained(text: str) -> Page:
    page = Page(text)
    assert page.doctype and page.doctype.lower() == "doctype html"
    assert page.errors == []
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    for tag, attrs in page.tags:
        for name in ("src", "href", "action", "srcset", "poster"):
            value = attrs.get(name)
            if value is None:
                continue
            assert not value.lower().startswith(("http:", "https:", "//", "ftp:", "javascript:")), (tag, value)
            if name == "src":
                assert value.startswith("data:image/"), (tag, value[:40])
    assert "url(" not in text  # no CSS fetches either
    return page


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    tree = write_tree(root / "images", splits={"train": 8, "validation": 3, "test": 6}, classes=CLASSES)
    for name, src, dst in MOVED:
        os.replace(tree / "test" / src / name, tree / "test" / dst / name)
    store = root / "store.h5"
    fs = extract(str(tree), str(store), base="pixels", size=8, progress=False)["feature_set"]
    result = run("train", store, "--feature-set", fs, "--head", "logreg", "--out", root / "run", "--json")
    assert result.exit_code == 0, result.output
    return {"root": root, "tree": tree, "store": store, "fs": fs, "run": root / "run", "train": json.loads(result.stdout)}


def expected_mistakes():
    return {(f"test/{dst}/{name}", dst, src) for name, src, dst in MOVED}


def test_train_writes_a_self_contained_report_with_the_known_mistakes(setup):
    report = setup["run"] / "report.html"
    assert setup["train"]["report"] == str(report)
    page = check_self_contained(report.read_text(encoding="utf-8"))
    wrong = page.cards("wrong")
    assert {(c["data-path"], c["data-true"], c["data-predicted"]) for c in wrong} == expected_mistakes()
    # sorted by the probability of the wrong class, one thumbnail per card
    probabilities = [float(c["data-probability"]) for c in wrong]
    assert probabilities == sorted(probabilities, reverse=True) and min(probabilities) > 1 / len(CLASSES)
    thumbs = page.all("img", **{"class": "thumb"})
    assert len(thumbs) == len(wrong) + len(page.cards("right"))
    assert all(t["src"].startswith("data:image/jpeg;base64,") for t in thumbs)
    # right answers: the most confident per class, each labelled with its own class
    right = page.cards("right")
    assert {c["data-true"] for c in right} == set(CLASSES)
    assert all(c["data-true"] == c["data-predicted"] for c in right)
    # the map: one point per test image (18), as a picture
    (picture,) = page.all("img", **{"class": "plot", "alt": "map of the features"})
    assert picture["data-points"] == str(6 * len(CLASSES))
    text = report.read_text(encoding="utf-8")
    assert "Mistakes: 3 of 18 test images" in text and "Content-Security-Policy" in text


def test_report_command_json_limits_thumbnails_and_agrees_with_predict(setup, tmp_path):
    out = tmp_path / "small.html"
    result = run("report", setup["run"], "--out", out, "--max-images", 1, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["report"] == str(out) and summary["split"] == "test" and summary["per_image"]
    assert (summary["images"], summary["mistakes"], summary["mistake_thumbnails"], summary["map_points"]) == (18, 3, 1, 18)
    assert summary["notes"] == []
    page = check_self_contained(out.read_text(encoding="utf-8"))
    (card,) = page.cards("wrong")
    assert (card["data-path"], card["data-true"], card["data-predicted"]) in expected_mistakes()
    # the other two mistakes are listed by path, below the gallery
    listed = out.read_text(encoding="utf-8").split("2 more mistakes")[1]
    others = expected_mistakes() - {(card["data-path"], card["data-true"], card["data-predicted"])}
    assert all(path in listed for path, _, _ in others)
    assert summary["right_thumbnails"] == 0  # 1 // 3 classes: no room for right answers

    # The run's own end-to-end predictions on the image files give the same classes and probabilities.
    full = check_self_contained((setup["run"] / "report.html").read_text(encoding="utf-8"))
    files = [str(setup["tree"] / c["data-path"]) for c in full.cards("wrong")]
    predicted = json.loads(run("predict", setup["run"], *files, "--json").stdout)["predictions"]
    for card, p in zip(full.cards("wrong"), predicted):
        assert p["predicted"] == card["data-predicted"]
        assert p["probability"] == pytest.approx(float(card["data-probability"]), abs=1e-5)


def test_validation_split_and_text_output(setup, tmp_path):
    result = run("report", setup["run"], "--split", "validation", "--out", tmp_path / "v.html")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"report {tmp_path / 'v.html'}: 0 mistakes of 9 validation images")
    page = check_self_contained((tmp_path / "v.html").read_text(encoding="utf-8"))
    assert page.cards("wrong") == [] and page.all("img", alt="map of the features")[0]["data-points"] == "9"


def test_images_moved_lists_paths_and_store_moved_keeps_the_metrics(setup, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(setup["run"], root / "run")
    out = tmp_path / "images-gone.html"
    moved_tree = setup["root"] / "images-moved"
    os.replace(setup["tree"], moved_tree)
    try:
        result = run("report", root / "run", "--out", out, "--json")
    finally:
        os.replace(moved_tree, setup["tree"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["mistakes"] == 3 and summary["mistake_thumbnails"] == 0 and summary["map_points"] == 18
    assert any("is gone: images are listed by path" in n for n in summary["notes"])
    text = out.read_text(encoding="utf-8")
    page = check_self_contained(text)
    assert page.cards("wrong") == [] and not page.all("img", **{"class": "thumb"})
    assert all(path in text for path, _, _ in expected_mistakes())

    moved_store = setup["root"] / "store-moved.h5"
    os.replace(setup["store"], moved_store)
    try:
        result = run("report", root / "run", "--out", tmp_path / "store-gone.html", "--json")
    finally:
        os.replace(moved_store, setup["store"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["per_image"] is False and summary["mistakes"] is None and summary["map_points"] is None
    assert any(f"the run's store {setup['store']} is missing" in n for n in summary["notes"])
    text = (tmp_path / "store-gone.html").read_text(encoding="utf-8")
    page = check_self_contained(text)
    assert "is missing (moved or deleted)" in text
    assert page.all("img", alt="confusion matrix")  # the recorded metrics are still shown
    assert "weighted avg" in text

    result = run("report", tmp_path / "nothing")
    assert result.exit_code == 1 and result.stderr == f"error: {tmp_path / 'nothing'}: no such run directory\n"


def test_no_report_and_class_names_are_escaped(tmp_path):
    classes = ('a<b>&"x', "plain")
    tree = write_tree(tmp_path / "images", splits={"train": 6, "validation": 2, "test": 3}, classes=classes)
    store = tmp_path / "s.h5"
    fs = extract(str(tree), str(store), base="pixels", size=8, progress=False)["feature_set"]
    result = run("train", store, "--feature-set", fs, "--head", "logreg", "--out", tmp_path / "quiet", "--no-report")
    assert result.exit_code == 0 and not (tmp_path / "quiet" / "report.html").exists()
    assert not any(line.startswith("  report ") for line in result.stdout.splitlines())
    result = run("train", store, "--feature-set", fs, "--head", "dense", "--epochs", 2, "--units", 4,
                 "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert f"  report {tmp_path / 'run' / 'report.html'}" in result.stdout.splitlines()
    text = (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    page = check_self_contained(text)
    assert "a&lt;b&gt;&amp;&quot;x" in text and "<b>&" not in text
    assert {c["data-true"] for c in page.cards("right")} == set(classes)  # attributes decode back
    assert page.all("img", alt="loss and accuracy per epoch")  # the dense head's curves


def test_compare_out_keeps_runs_and_links_their_reports(setup, tmp_path):
    out = tmp_path / "board"
    result = run("compare", setup["store"], "--heads", "logreg,dense", "--epochs", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1] == f"leaderboard {out / 'leaderboard.html'}"
    board = json.loads((out / "leaderboard.json").read_text())
    assert [e["rank"] for e in board["leaderboard"]] == [1, 2]
    page = check_self_contained((out / "leaderboard.html").read_text(encoding="utf-8"))
    links = [a["href"] for a in page.all("a")]
    assert links == [os.path.relpath(e["report"], out) for e in board["leaderboard"]]
    for entry, link in zip(board["leaderboard"], links):
        assert entry["run_dir"] == str(out / f"{entry['head']}-{setup['fs']}")
        assert os.path.isfile(out / link) and os.path.isfile(os.path.join(entry["run_dir"], "config.json"))
    # each kept run is an ordinary run directory: predict works on it
    logreg = next(e for e in board["leaderboard"] if e["head"] == "logreg")
    assert run("predict", logreg["run_dir"], setup["tree"] / "test" / "birds").exit_code == 0

    result = run("compare", setup["store"], "--heads", "logreg", "--cv", 2, "--out", tmp_path / "cv")
    assert result.exit_code == 0, result.output
    page = check_self_contained((tmp_path / "cv" / "leaderboard.html").read_text(encoding="utf-8"))
    assert not page.all("a") and sorted(os.listdir(tmp_path / "cv")) == ["leaderboard.html", "leaderboard.json"]
    result = run("compare", setup["store"], "--heads", "logreg", "--no-report")
    assert result.exit_code == 1 and result.stderr.startswith("error: --no-report: only with --out")
    result = run("compare", setup["store"], "--heads", "logreg", "--out", out)
    assert result.exit_code == 1 and "exists and is not an empty folder" in result.stderr


def test_leaderboard_renderer_escapes_and_quotes_links():
    text = render_leaderboard("runs <1>", [("name", "name"), ("acc", "accuracy")],
                              [{"name": "a&b", "acc": 0.5}, {"name": "<i>", "acc": None}],
                              ["trial 1/report.html", None])
    page = check_self_contained(text)
    assert [a["href"] for a in page.all("a")] == ["trial%201/report.html"]
    assert "a&amp;b" in text and "&lt;i&gt;" in text and "runs &lt;1&gt;" in text and "0.5000" in text
    with pytest.raises(ValueError):
        render_leaderboard("x", [("a", "a")], [{"a": 1}], [])


def test_map_sample_is_seeded_and_marks_rows(setup, monkeypatch):
    from featcache.classify.report import run_data as report_data
    from featcache.classify.runs.run_dir import read_config

    config = read_config(str(setup["run"]))
    pred = report_data.split_predictions(str(setup["run"]), "test")
    features, index, note = report_data.map_features(config, pred)
    assert features.shape == (18, 8 * 8 * 3) and list(index) == list(range(18)) and note == ""
    monkeypatch.setattr(report_data, "MAP_MAX_POINTS", 10)
    features, index, note = report_data.map_features(config, pred, seed=1)
    again = report_data.map_features(config, pred, seed=1)[1]
    assert len(features) == 10 and np.array_equal(index, again) and note.startswith("a seeded sample of 10")


def test_thumbnails_apply_exif_orientation_and_report_unreadable_files(tmp_path):
    from PIL import Image

    from featcache.classify.report.figures import thumbnail_jpeg

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    Image.new("RGB", (400, 200), (200, 30, 30)).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    data, reason = thumbnail_jpeg(str(tmp_path), "rotated.jpg", 128)
    with Image.open(io.BytesIO(data)) as thumb:
        assert thumb.size == (64, 128) and reason == ""
    (tmp_path / "notes.jpg").write_text("not an image at all\n")
    assert thumbnail_jpeg(str(tmp_path), "notes.jpg", 128) == (None, "not an image (a text file)")
    assert thumbnail_jpeg(str(tmp_path), "gone.jpg", 128)[1] == "file vanished (or a dangling symlink)"
