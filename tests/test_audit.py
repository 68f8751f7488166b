"""featcache audit and similar (issue 22): label issues by confident learning, exact and near
duplicates, leaks across splits, outliers and "images like this one", from cached features,
on a planted fixture whose answer is known; --exclude leaving the flagged rows out of training."""
import json
import os
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from featcache.auditing.labels import audit_labels, confident_joint, find_label_issues, neighbour_votes, out_of_fold
from featcache.cli import cli
from featcache.errors import FeatcacheError

CLASSES = ("birds", "cats", "dogs")
TINTS = {"birds": (220, 60, 40), "cats": (40, 200, 70), "dogs": (50, 70, 230)}
SPLITS = {"train": 16, "validation": 5, "test": 5}


def picture(name: str, seed: int) -> Image.Image:
    """Random 8x8 blocks blended with the class's tint: classes told apart by colour, images
    within a class far apart (cosine of their pixels well under the near-duplicate threshold)."""
    rng = np.random.default_rng(seed)
    blocks = rng.uniform(0, 255, (8, 8, 3))
    img = 0.5 * blocks + 0.5 * np.array(TINTS[name])
    return Image.fromarray(img.astype(np.uint8), "RGB").resize((64, 64), Image.NEAREST)


def near_copy(src, dst):
    """JPEG quality 70, resized and cropped by a pixel: what a re-export or a thumbnail does."""
    img = Image.open(src).convert("RGB")
    img = img.resize((66, 66), Image.BILINEAR).crop((1, 1, 65, 65))
    img.save(dst, quality=70)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A split-folder tree with known problems, and its pixels store:
    - 4 training images moved to another class's folder (label errors),
    - 2 training images copied, re-encoded, under new names in train (near duplicates),
    - 2 test images copied, re-encoded, into train (leaks), 1 validation image byte for byte (exact leak),
    - 1 byte-for-byte copy inside train (an exact duplicate),
    - 1 image unlike every other (an outlier)."""
    import featcache

    root = tmp_path_factory.mktemp("audit")
    images = root / "images"
    seed = 0
    for split, n in SPLITS.items():
        for name in CLASSES:
            (images / split / name).mkdir(parents=True)
            for i in range(n):
                seed += 1
                picture(name, seed).save(images / split / name / f"{name}{i:02d}.jpg", quality=95)
    moved = []
    for (src, dst) in [("birds", "cats"), ("cats", "dogs"), ("dogs", "birds"), ("cats", "birds")]:
        name = sorted(os.listdir(images / "train" / src))[len(moved)]
        shutil.move(images / "train" / src / name, images / "train" / dst / f"moved_{name}")
        moved.append(f"train/{dst}/moved_{name}")
    near = [("train/cats/cats10.jpg", "train/cats/cats10_copy.jpg"), ("train/dogs/dogs11.jpg", "train/dogs/dogs11_copy.jpg")]
    leaks = [("test/birds/birds00.jpg", "train/birds/from_test_birds00.jpg"),
             ("test/dogs/dogs02.jpg", "train/dogs/from_test_dogs02.jpg")]
    for src, dst in near + leaks:
        near_copy(images / src, images / dst)
    shutil.copy(images / "validation/cats/cats03.jpg", images / "train/cats/exact_from_validation.jpg")
    shutil.copy(images / "train/birds/birds12.jpg", images / "train/birds/birds12_twin.jpg")
    outlier = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)), "RGB")
    outlier.save(images / "train/dogs/odd_one.jpg", quality=95)
    store = root / "store.h5"
    featcache.extract_features(images, store, base="pixels", size=8, weights="none", progress=False)
    return {"root": root, "images": images, "store": str(store), "moved": moved, "near": near, "leaks": leaks}


def test_confident_learning_on_a_worked_example():
    """Worked by hand: t0 = (0.9 + 0.8 + 0.2) / 3, t1 = (0.9 + 0.7 + 0.8) / 3 = 0.8; row 2
    (labelled 0, p1 = 0.8 >= t1) is the one confident off-diagonal entry; row 4 (p1 = 0.7 <
    t1) is counted nowhere; calibration scales class 1's row from 2 to its 3 rows."""
    labels = np.array([0, 0, 0, 1, 1, 1])
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [0.2, 0.8]])
    joint, t = confident_joint(labels, proba)
    np.testing.assert_allclose(t, [1.9 / 3, 0.8])
    np.testing.assert_allclose(joint, [[2, 1], [0, 3]])
    found = find_label_issues(labels, proba)
    assert found.rows.tolist() == [2] and found.suggested.tolist() == [1]
    assert found.quality[2] == pytest.approx(0.2)


def test_neighbour_votes_count_the_labels_of_the_found_neighbours():
    labels = np.array([0, 1, 1, 2])
    neighbours = np.array([[1, 2, 3], [2, -1, -1], [-1, -1, -1], [0, 0, 1]])
    np.testing.assert_allclose(neighbour_votes(labels, neighbours, 3), [
        [0, 2 / 3, 1 / 3], [0, 1, 0], [1 / 3, 1 / 3, 1 / 3], [2 / 3, 1 / 3, 0]])


class RecordingModel:
    """A classifier that remembers the rows it was fitted on (by their first feature) and
    answers the class shares it saw."""

    fitted: list = []

    def fit(self, x, y):
        RecordingModel.fitted.append(set(x[:, 0].astype(int).tolist()))
        self.classes_ = np.unique(y)
        self.share = np.bincount(y)[self.classes_] / len(y)
        return self

    def predict_proba(self, x):
        return np.tile(self.share, (len(x), 1))


def test_the_second_round_trains_without_the_first_rounds_suspects():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 20)
    x = np.column_stack([np.arange(40), rng.normal(size=40)])
    left_out = np.zeros(40, bool)
    left_out[[3, 25]] = True
    RecordingModel.fitted = []
    proba = out_of_fold(x, labels, 5, 0, RecordingModel, left_out=left_out)
    assert len(RecordingModel.fitted) == 5 and all(not ({3, 25} & rows) for rows in RecordingModel.fitted)
    assert np.all(proba.sum(axis=1) > 0)  # the left-out rows are scored all the same
    # a fold that would be left one class to learn keeps its suspects (logistic regression needs two)
    everything_of_class_1 = labels == 1
    proba = out_of_fold(x, labels, 5, 0, left_out=everything_of_class_1)
    assert proba.shape == (40, 2) and np.allclose(proba.sum(axis=1), 1)
    # audit_labels: rows whose 10 neighbours all carry the other label are the first round's suspects
    neighbours = np.array([np.flatnonzero(labels != labels[i])[:10] if i in (7, 31) else
                           np.flatnonzero((labels == labels[i]) & (np.arange(40) != i))[:10] for i in range(40)])
    RecordingModel.fitted = []
    audit_labels(x, labels, neighbours, 5, 0, RecordingModel)
    first, second = RecordingModel.fitted[:5], RecordingModel.fitted[5:]
    assert len(second) == 5 and set().union(*first) == set(range(40))
    assert set(range(40)) - set().union(*second) == {7, 31}


def test_the_audit_finds_what_was_planted(planted, tmp_path):
    out = tmp_path / "audit"
    result = CliRunner().invoke(cli, ["audit", planted["store"], "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    audit = json.loads(result.output)
    assert audit["rows"] == 3 * sum(SPLITS.values()) + 7 and audit["feature_set"].startswith("pixels-8")
    # label issues: the moved images (confident learning's thresholds may leave a borderline one:
    # here 3 of 4 at least), each suggested back to its own class, and few others
    flagged = [i["path"] for i in audit["label_issues"]]
    found = set(planted["moved"]) & set(flagged)
    assert len(found) >= 3 and len(found) / len(flagged) >= 0.65, audit["label_issues"]
    for item in audit["label_issues"]:
        if item["path"] in planted["moved"]:
            assert item["given"] != item["suggested"] and item["suggested"] in item["path"].split("moved_")[1]
    scores = [i["score"] for i in audit["label_issues"]]
    assert scores == sorted(scores)  # worst first
    # duplicates: the near copies, the exact copies (the same bytes: exact), the leaks
    groups = [set(d["paths"]) for d in audit["duplicates"]]
    for a, b in planted["near"] + planted["leaks"]:
        assert {a, b} in groups
    assert {"train/birds/birds12.jpg", "train/birds/birds12_twin.jpg"} in groups
    exact = [d for d in audit["duplicates"] if d["exact"]]
    assert sorted(map(sorted, (d["paths"] for d in exact))) == [
        ["train/birds/birds12.jpg", "train/birds/birds12_twin.jpg"],
        ["train/cats/exact_from_validation.jpg", "validation/cats/cats03.jpg"]]
    assert len(audit["duplicates"]) == 6  # nothing else is that close
    # leaks: groups across train and validation/test, with their splits
    leak_groups = {frozenset(zip(leak["paths"], leak["splits"])) for leak in audit["leaks"]}
    assert leak_groups == {frozenset({(a, "test"), (b, "train")}) for a, b in planted["leaks"]} | {
        frozenset({("validation/cats/cats03.jpg", "validation"), ("train/cats/exact_from_validation.jpg", "train")})}
    assert audit["leak_share"] == {"held_out_images": 30, "with_a_twin_in_train": 3, "share": 0.1}
    # outliers: the odd one first
    assert audit["outliers"][0]["path"] == "train/dogs/odd_one.jpg"
    # per class and the files
    assert sum(c["rows"] for c in audit["per_class"]) == audit["rows"]
    assert {c["class"] for c in audit["per_class"]} == set(CLASSES)
    for name in ("audit.json", "label_issues.csv", "duplicates.csv", "leaks.csv", "outliers.csv", "exclude.txt", "audit.html"):
        assert (out / name).is_file(), name
    page = (out / "audit.html").read_text()
    assert "data:image/jpeg;base64" in page and "moved_" in page and "<script" not in page
    assert "near duplicates: cosine similarity &gt;= 0.995</p>" in page  # the pixels rule, in words
    excluded = [l for l in (out / "exclude.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert found <= set(excluded)
    assert "train/birds/birds12_twin.jpg" in excluded and "train/birds/birds12.jpg" not in excluded  # one kept
    assert json.loads((out / "audit.json").read_text())["label_issues"] == audit["label_issues"]


def test_fail_on_leaks_exits_1(planted):
    result = CliRunner().invoke(cli, ["audit", planted["store"], "--fail-on-leaks"])
    assert result.exit_code == 1 and "leaks             3 groups" in result.output


def test_exclude_leaves_the_flagged_rows_out_and_the_run_records_them(planted, tmp_path):
    import featcache

    out = tmp_path / "audit"
    featcache.audit(planted["store"], out=out)
    plain = featcache.train(planted["store"], out=tmp_path / "plain", head="logreg", no_report=True)
    cleaned = featcache.train(planted["store"], out=tmp_path / "cleaned", head="logreg", exclude=out / "exclude.txt",
                              no_report=True)
    config = json.loads((tmp_path / "cleaned" / "config.json").read_text())
    excluded = [l for l in (out / "exclude.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert config["excluded"]["paths"] == sorted(excluded) and config["excluded"]["count"] == len(excluded)
    in_train = [p for p in excluded if p.startswith("train/")]
    in_test = [p for p in excluded if p.startswith("test/")]
    assert cleaned["train"]["n"] == plain["train"]["n"] - len(in_train)
    assert cleaned["test"]["n"] == plain["test"]["n"] - len(in_test)
    # the run's report reads the same rows later (the recorded exclusion), with no "changed" note
    report = featcache.report(tmp_path / "cleaned", out=tmp_path / "r.html")
    assert report["images"] == cleaned["test"]["n"] and not any("changed" in n for n in report["notes"])
    board = featcache.compare(planted["store"], heads="logreg", exclude=out / "exclude.txt")
    assert board["leaderboard"][0]["validation"]["n"] == cleaned["validation"]["n"]


def test_similar_finds_the_copies_of_stored_paths_and_of_new_files(planted, tmp_path):
    import featcache

    result = featcache.similar(planted["store"], ["train/cats/cats10.jpg"], k=3)
    (first,) = result["results"]
    assert first["stored"] and first["neighbors"][0]["path"] == "train/cats/cats10_copy.jpg"
    assert all(n["path"] != "train/cats/cats10.jpg" for n in first["neighbors"])  # not itself
    query = tmp_path / "query.jpg"
    near_copy(planted["images"] / "test/dogs/dogs04.jpg", query)
    cli_result = CliRunner().invoke(cli, ["similar", planted["store"], str(query), "-k", "2", "--json"])
    assert cli_result.exit_code == 0, cli_result.output
    (hit,) = json.loads(cli_result.output)["results"]
    assert not hit["stored"] and hit["neighbors"][0]["path"] == "test/dogs/dogs04.jpg"
    assert hit["neighbors"][0]["label"] == "dogs" and hit["neighbors"][0]["similarity"] > 0.99
    with pytest.raises(FeatcacheError, match="neither a stored image"):
        featcache.similar(planted["store"], ["no/such.jpg"])


def test_an_unlabelled_store_gets_duplicates_and_outliers_and_says_why(planted, tmp_path):
    import featcache

    flat = tmp_path / "flat"
    flat.mkdir()
    for path in sorted((planted["images"] / "train" / "cats").iterdir())[:8]:
        shutil.copy(path, flat / path.name)
    shutil.copy(flat / sorted(os.listdir(flat))[0], flat / "zz_copy.jpg")
    store = tmp_path / "flat.h5"
    featcache.extract_features(flat, store, base="pixels", size=8, weights="none", progress=False)
    audit = featcache.audit(store)
    assert not audit["labelled"] and audit["label_issues"] == []
    assert any("unlabelled" in note for note in audit["notes"])
    assert [d["exact"] for d in audit["duplicates"]] == [True]


def test_fewer_rows_than_folds_and_a_damaged_store_are_one_line(planted, tmp_path):
    import featcache
    from conftest import pixel_store

    small = pixel_store(tmp_path / "small", ("a", "b"), {"train": 1, "validation": 1}, (8,))
    with pytest.raises(FeatcacheError, match="out-of-fold probabilities need at least 5 rows"):
        featcache.audit(small["store"])
    broken = tmp_path / "broken.h5"
    shutil.copy(planted["store"], broken)
    with open(broken, "r+b") as f:  # overwrite the middle of the file: features and checksums
        f.seek(os.path.getsize(broken) // 2)
        f.write(os.urandom(4096))
    result = CliRunner().invoke(cli, ["audit", str(broken)])
    assert result.exit_code == 1 and result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1


def pair_set(pairs) -> set[tuple[int, int]]:
    """The (a, b) of a scan's (a, b, similarity) arrays."""
    return set(zip(pairs[0].tolist(), pairs[1].tolist()))


def test_the_page_shows_a_few_members_of_a_large_group_and_counts_the_rest(tmp_path):
    from conftest import class_image
    from featcache.auditing import page

    root = tmp_path / "images"
    root.mkdir()
    paths = [f"img{i:03d}.png" for i in range(40)]
    for i, p in enumerate(paths):
        class_image(0, i).save(root / p)
    group = {"paths": paths, "splits": ["train"] * 40, "similarity": 0.999, "exact": False}
    result = {"feature_set": "fs", "store": "s.h5", "rows": 40, "labelled": True, "label_issues": [],
              "duplicates": [group], "leaks": [], "outliers": [], "per_class": [], "confused_pairs": [], "notes": [],
              "settings": {"near_duplicates": {"threshold": 0.95}},
              "leak_share": {"with_a_twin_in_train": 0, "held_out_images": 0}}
    page.write_page(str(tmp_path / "audit.html"), result, str(root))
    html = (tmp_path / "audit.html").read_text()
    assert html.count('<figure class="card') == page.MAX_SHOWN_PER_GROUP
    assert f"40 images ({40 - page.MAX_SHOWN_PER_GROUP} more in the CSV files)" in html


def test_look_alikes_make_one_group_without_a_pair_per_two_of_them():
    """3,000 nearly equal vectors: one group, pairs O(N) (each row's nearest), not N^2 / 2."""
    from featcache.auditing import neighbours

    v = neighbours.vectors(1 + 0.001 * np.random.default_rng(1).normal(size=(3000, 8)))
    pairs, _ = neighbours.scan(v, 0.99)
    assert len(pairs[0]) <= 3000 * neighbours.PAIR_NEIGHBOURS
    members, labels = neighbours.groups(3000, pairs[0], pairs[1])
    assert len(members) == 1 and sorted(members[0].tolist()) == list(range(3000)) and len(set(labels)) == 1


def test_scan_finds_the_pairs_and_scores_of_a_brute_force_pass():
    from featcache.auditing import neighbours

    v = neighbours.vectors(np.random.default_rng(0).normal(size=(300, 16)))
    pairs, (top_sims, top_idx) = neighbours.scan(v, 0.4)
    s = v @ v.T
    np.fill_diagonal(s, -np.inf)
    nearest = np.argsort(-s, axis=1)[:, : neighbours.PAIR_NEIGHBOURS]  # pairs are looked for among these
    expected = {(min(i, j), max(i, j)) for i in range(300) for j in nearest[i].tolist() if s[i, j] >= 0.4}
    every = {(i, j) for i in range(300) for j in range(i + 1, 300) if s[i, j] >= 0.4}
    assert 100 < len(expected) < len(every)  # the cap on pairs per row is in play
    assert pair_set(pairs) == expected
    assert np.allclose(pairs[2], [s[a, b] for a, b in zip(pairs[0], pairs[1])], atol=1e-5)
    np.testing.assert_allclose(top_sims, -np.sort(-s, axis=1)[:, :5], rtol=1e-5)
    assert (top_idx[:, 0] == s.argmax(axis=1)).all()


def test_a_copy_stands_out_among_its_originals_neighbours():
    """Mutual nearest neighbours, similar enough, and clear of the next best of either."""
    from featcache.auditing import neighbours

    top_sims = np.array([[0.90, 0.70], [0.90, 0.72], [0.80, 0.79], [0.80, 0.78]], np.float32)
    top_idx = np.array([[1, 2], [0, 3], [3, 0], [2, 1]])
    found = neighbours.standing_out(top_sims, top_idx, floor=0.75, gap=0.08)
    assert pair_set(found) == {(0, 1)}  # (2, 3) are mutual but do not stand out


def test_the_knn_head_stands_beside_dense_and_logreg(planted, tmp_path):
    import featcache

    board = featcache.compare(planted["store"], heads="dense,logreg,knn", epochs=2)
    heads = {e["head"] for e in board["leaderboard"]}
    assert heads == {"dense", "logreg", "knn"}
    run = featcache.train(planted["store"], out=tmp_path / "knn", head="knn", neighbors=3, no_report=True)
    assert run["test"]["accuracy"] >= 0.9  # the classes differ by colour: neighbours agree
    files = sorted(os.listdir(tmp_path / "knn"))
    assert "model.npz" in files and not any(f.endswith((".joblib", ".pkl")) for f in files)
    predicted = featcache.predict(tmp_path / "knn", [str(planted["images"] / "test" / "dogs")])["predictions"]
    assert sum(p["predicted"] == "dogs" for p in predicted) >= 4
    with pytest.raises(FeatcacheError, match="a knn head keeps its training rows"):
        featcache.export(tmp_path / "knn", tmp_path / "m.keras")


def test_search_and_ensemble_take_exclude_too(planted, tmp_path):
    import featcache

    out = tmp_path / "audit"
    featcache.audit(planted["store"], out=out)
    exclude = out / "exclude.txt"
    excluded = [l for l in exclude.read_text().splitlines() if l and not l.startswith("#")]
    found = featcache.search(planted["store"], out=tmp_path / "search", trials=2, heads="logreg", exclude=exclude)
    best = json.loads((tmp_path / "search" / "best" / "config.json").read_text())
    assert best["excluded"]["paths"] == sorted(excluded)
    assert found["rows"]["train"] == 3 * SPLITS["train"] + 7 - sum(p.startswith("train/") for p in excluded)
    a = featcache.train(planted["store"], out=tmp_path / "a", head="logreg", no_report=True)
    b = featcache.train(planted["store"], out=tmp_path / "b", head="logreg", C=0.1, no_report=True)
    ens = featcache.ensemble([a["run_dir"], b["run_dir"]], out=tmp_path / "ens", exclude=exclude, no_report=True)
    assert ens["test"]["n"] == a["test"]["n"] - sum(p.startswith("test/") for p in excluded)
    assert json.loads((tmp_path / "ens" / "config.json").read_text())["excluded"]["count"] == len(excluded)


def test_run_uses_any_refittable_head_kind_and_refuses_others_in_one_line(planted, tmp_path):
    """--run RUN_DIR: a dense run's head and settings (epochs, units, lr) refitted on each fold
    finds the moved labels too; a run that is not one head on cached features (an ensemble) is
    refused in one line before the store is read."""
    import featcache

    dense = featcache.train(planted["store"], out=tmp_path / "dense", head="dense", units=32, epochs=8, lr=1e-2, batch_size=64,
                            optimizer="adam", checkpoint=True, early_stopping=5, no_report=True)
    result = CliRunner().invoke(cli, ["audit", planted["store"], "--run", dense["run_dir"], "--folds", "3", "--json"])
    assert result.exit_code == 0, result.output
    audit = json.loads(result.output)
    assert audit["settings"]["model"].startswith(f"the dense head of {dense['run_dir']}") and "units=32" in audit["settings"]["model"]
    flagged = {i["path"] for i in audit["label_issues"]}
    assert len(set(planted["moved"]) & flagged) >= 3 and len(set(planted["moved"]) & flagged) / len(flagged) >= 0.5
    knn = featcache.train(planted["store"], out=tmp_path / "knn", head="knn", neighbors=3, no_report=True)
    assert "the knn head" in featcache.audit(planted["store"], run=knn["run_dir"])["settings"]["model"]
    logreg = featcache.train(planted["store"], out=tmp_path / "lr", head="logreg", C=0.5, no_report=True)
    ens = featcache.ensemble([logreg["run_dir"], knn["run_dir"]], out=tmp_path / "ens", no_report=True)
    result = CliRunner().invoke(cli, ["audit", planted["store"], "--run", ens["run_dir"]])
    assert result.exit_code != 0 and "ensemble run; the audit's folds refit one head" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_the_index_finds_what_the_exact_scan_finds(tmp_path, monkeypatch):
    """At 600 rows of 300 dimensions (the PCA stage on) in 30 clusters with 12 planted near twins,
    the index's pairs are the exact scan's, and each row's 5 nearest nearly all of them, with
    exact similarities (the candidates are re-ranked on the full vectors)."""
    from featcache.auditing import index, neighbours

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 300))
    x = np.maximum(centres[rng.integers(0, 30, 600)] + 0.7 * rng.normal(size=(600, 300)), 0).astype(np.float32)
    x[500:512] = x[:12] * rng.uniform(0.97, 1.03, (12, 300)).astype(np.float32)
    v = neighbours.vectors(x)
    digests = [f"{i:064x}" for i in range(len(v))]
    exact_pairs, (exact_sims, exact_idx) = neighbours.scan(v, 0.95)
    assert index.INDEX_MIN_ROWS > len(v)  # the default: exact at this size
    monkeypatch.setattr(index, "INDEX_MIN_ROWS", 100)
    (pairs, (sims, idx)), how = index.scan(str(tmp_path / "s.h5"), "fs", v, digests, 0.95)
    assert how["search"] == "index" and how["index_built"] and os.path.isfile(how["index"])
    assert index.factory(300).startswith("PCA128,")
    assert pair_set(pairs) == pair_set(exact_pairs) == {(i, 500 + i) for i in range(12)}
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(idx, exact_idx)]) >= 0.95
    same = idx == exact_idx
    assert same.mean() >= 0.9 and np.allclose(sims[same], exact_sims[same], atol=1e-5)


def exactly(call, *args, **kwargs):
    """``call`` with the exact search (the index threshold back at its default)."""
    from featcache.auditing import index

    with pytest.MonkeyPatch.context() as m:
        m.setattr(index, "INDEX_MIN_ROWS", 10**9)
        return call(*args, **kwargs)


def rounded(items: list[dict]) -> list[dict]:
    """Similarities and scores to 4 decimals (the index's come from L2 distances on unit vectors,
    the exact search's from dot products: they differ in the 6th)."""
    return [{k: round(v, 4) if k in ("similarity", "score") else v for k, v in item.items()} for item in items]


@pytest.fixture
def indexed(planted, tmp_path, monkeypatch):
    """A copy of the planted tree and store, with the index used from 10 rows on."""
    from featcache.auditing import index

    monkeypatch.setattr(index, "INDEX_MIN_ROWS", 10)
    images = tmp_path / "images"
    shutil.copytree(planted["images"], images)
    store = tmp_path / "store.h5"
    shutil.copy(planted["store"], store)
    return {"images": images, "store": str(store)}


def test_audit_and_similar_through_the_index_answer_as_the_exact_search(planted, indexed):
    import featcache

    exact = exactly(featcache.audit, planted["store"])
    assert exact["settings"]["search"] == "exact"
    first = featcache.audit(indexed["store"])
    assert first["settings"]["search"] == "index" and first["settings"]["index_built"]
    assert first["settings"]["index"].startswith(indexed["store"] + ".index" + os.sep)
    again = featcache.audit(indexed["store"])
    assert not again["settings"]["index_built"]  # kept beside the store, and fresh
    for result in (first, again):
        for key in ("duplicates", "leaks", "outliers"):
            assert rounded(result[key]) == rounded(exact[key]), key
        assert result["leak_share"] == exact["leak_share"] and result["label_issues"] == exact["label_issues"]
    queries = [b for _, b in planted["near"] + planted["leaks"]]
    want = exactly(featcache.similar, planted["store"], queries, k=3)
    got = featcache.similar(indexed["store"], queries, k=3)
    assert want["search"] == "exact" and got["search"] == "index"
    assert [[n["path"] for n in r["neighbors"]] for r in got["results"]] == \
        [[n["path"] for n in r["neighbors"]] for r in want["results"]]


def test_the_index_is_rebuilt_when_extract_adds_rows(planted, indexed):
    import featcache

    featcache.audit(indexed["store"])
    meta = [p for p in os.listdir(indexed["store"] + ".index") if p.endswith(".json")]
    before = json.loads(open(os.path.join(indexed["store"] + ".index", meta[0])).read())
    new = indexed["images"] / "train" / "cats" / "added_later.jpg"
    shutil.copy(indexed["images"] / "test" / "dogs" / "dogs03.jpg", new)
    Image.open(new).rotate(90).save(new, quality=90)  # new bytes
    featcache.extract_features(indexed["images"], indexed["store"], base="pixels", size=8, weights="none",
                               progress=False)
    found = featcache.similar(indexed["store"], ["train/cats/added_later.jpg"], k=2)
    assert found["search"] == "index" and found["results"][0]["stored"]  # the new row is in the index
    after = json.loads(open(os.path.join(indexed["store"] + ".index", meta[0])).read())
    assert after["rows"] == before["rows"] + 1 and after["fingerprint"] != before["fingerprint"]
    assert not featcache.audit(indexed["store"])["settings"]["index_built"]  # similar's rebuild is reused


def test_a_corrupt_or_stale_index_is_rebuilt_not_trusted(planted, indexed):
    import featcache

    built = featcache.audit(indexed["store"])["settings"]["index"]
    exact = exactly(featcache.audit, planted["store"])
    meta = built[: -len(".faiss")] + ".json"
    record = json.loads(open(meta).read())
    with open(meta, "w") as f:  # stale: made for other rows
        json.dump({**record, "fingerprint": f"{record['rows']}:{'0' * 32}"}, f)
    result = featcache.audit(indexed["store"])
    assert result["settings"]["index_built"] and rounded(result["duplicates"]) == rounded(exact["duplicates"])
    with open(built, "r+b") as f:  # damaged in the middle (the vectors), same size, a fresh record
        f.seek(os.path.getsize(built) // 2)
        f.write(b"\x7f" * 64)
    result = featcache.audit(indexed["store"])
    assert result["settings"]["index_built"] and rounded(result["outliers"]) == rounded(exact["outliers"])
    assert not featcache.audit(indexed["store"])["settings"]["index_built"]
