import io

import numpy as np
import pytest
from PIL import Image

from conftest import class_image, write_tree
from featcache.errors import FeatcacheError
from featcache.extract.images import decode as decode_module
from featcache.extract.images.decode import DecodeError, decode_image, file_digest, read_bytes
from featcache.extract.images.discover import discover, hash_split


def test_discover_sorted_with_class_map_and_hash_split(image_tree):
    (image_tree / "cats" / ".hidden.jpg").write_bytes(b"x")
    (image_tree / "dogs" / "notes.txt").write_text("not an image")
    class_image(0, 99).save(image_tree / "cats" / "UPPER.JPEG")
    listing = discover(str(image_tree))
    assert listing.class_names == ["cats", "dogs"]
    assert listing.split_source == "hash"
    paths = [e.relpath for e in listing.entries]
    assert paths == sorted(paths)
    assert "cats/UPPER.JPEG" in paths and "cats/.hidden.jpg" not in paths
    assert ("dogs/notes.txt", "not an image file name (.txt)") in listing.skipped
    assert {e.label for e in listing.entries if e.relpath.startswith("dogs/")} == {1}
    assert all(e.split == hash_split(e.relpath) for e in listing.entries)


@pytest.mark.parametrize("unlabeled", [False, True])
def test_stats_taken_by_the_walk_follow_the_sorted_entries(tmp_path, unlabeled):
    # The walk lists a folder's files before its subfolders ("a/z.jpg" before "a/b/x.jpg"),
    # the listing is sorted by path: each entry must keep its own file's stat.
    import os

    root = tmp_path / "i"
    for rel in ("cats/z.jpg", "cats/b/x.jpg", "cats/b/c/y.jpg", "cats/a.jpg", "dogs/m/n.jpg", "dogs/k.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        class_image(len(rel), len(rel)).save(root / rel)
    listing = discover(str(root), unlabeled=unlabeled, stat_files=True)
    assert [e.relpath for e in listing.entries] == sorted(e.relpath for e in listing.entries)
    assert len(listing.file_stats) == len(listing.entries) == 6
    for entry, st in zip(listing.entries, listing.file_stats):
        assert st.st_ino == os.stat(listing.path(entry)).st_ino, entry.relpath
    assert discover(str(root), unlabeled=unlabeled).file_stats is None  # only when asked for


def _split_as_first_written(relpath, fractions, seed):
    """hash_split as stores were written with it from the start (one path at a time)."""
    import hashlib

    u = int.from_bytes(hashlib.sha256(f"{seed}:{relpath}".encode("utf-8", "surrogateescape")).digest()[:8], "big") / 2**64
    return "train" if u < fractions[0] else "validation" if u < fractions[0] + fractions[1] else "test"


def test_hash_splits_keep_the_splits_stores_were_written_with():
    from featcache.extract.images.discover import hash_splits

    paths = [f"c{i % 3}/img{i}.jpg" for i in range(2000)] + ["caf\u00e9/\udcff.jpg"]
    for fractions, seed in (((0.7, 0.15, 0.15), 0), ((0.5, 0.5, 0.0), 3), ((1.0, 0.0, 0.0), 1)):
        assert hash_splits(paths, fractions, seed) == [_split_as_first_written(p, fractions, seed) for p in paths]
    assert set(hash_splits(paths, (0.7, 0.15, 0.15))) == {"train", "validation", "test"}


def test_hash_split_is_stable_when_images_are_added(tmp_path):
    root = write_tree(tmp_path / "a", per_class=30)
    before = {e.relpath: e.split for e in discover(str(root)).entries}
    write_tree(tmp_path / "a", per_class=60)
    after = {e.relpath: e.split for e in discover(str(root)).entries}
    assert all(after[p] == s for p, s in before.items())
    counts = {s: list(after.values()).count(s) for s in ("train", "validation", "test")}
    assert counts["train"] > counts["validation"] > 0 and counts["test"] > 0


def test_split_folders_are_the_splits(tmp_path):
    root = write_tree(tmp_path / "i", splits={"train": 3, "val": 1, "test": 2})
    listing = discover(str(root))
    assert listing.split_source == "folders"
    splits = [e.split for e in listing.entries]
    assert splits.count("train") == 6 and splits.count("validation") == 2 and splits.count("test") == 4
    assert listing.class_names == ["cats", "dogs"]


def test_discover_errors(tmp_path):
    with pytest.raises(FeatcacheError, match="does not exist"):
        discover(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeatcacheError, match="no class folders"):
        discover(str(tmp_path / "empty"))


def test_decode_resizes_like_pil_bilinear(tmp_path):
    img = class_image(1, 3, size=(97, 61))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out = decode_image(buf.getvalue(), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(img.resize((32, 32), Image.Resampling.BILINEAR)))


def test_decode_applies_exif_orientation():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 20, 20))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out = decode_image(buf.getvalue(), 20, resize="nearest")
    # displayed upright the image is 20 wide and 40 tall with the white half on top
    assert out[2, 10].mean() > 200 and out[-2, 10].mean() < 50


@pytest.mark.parametrize(
    "data, reason",
    [(b"", "empty file"), (b"\x00garbage" * 10, "not an image"), (b"hello world", "not an image")],
)
def test_decode_errors_have_reasons(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data, 16)


def test_truncated_jpeg_is_reported():
    buf = io.BytesIO()
    class_image(0, 1, size=(200, 200)).save(buf, "JPEG")
    with pytest.raises(DecodeError, match="truncated|corrupt"):
        decode_image(buf.getvalue()[: len(buf.getvalue()) // 2], 16)


def test_file_digest_is_content_hash(tmp_path):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    a.write_bytes(b"same bytes")
    b.write_bytes(b"same bytes")
    assert file_digest(str(a)) == file_digest(str(b))
    assert len(file_digest(str(a))) == 64


def test_read_bytes_reads_to_the_end_whatever_fstat_said(tmp_path, monkeypatch):
    data = np.random.default_rng(0).integers(0, 256, (3 << 20) + 17, dtype=np.uint8).tobytes()
    (tmp_path / "big.jpg").write_bytes(data)
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert read_bytes(str(tmp_path / "big.jpg")) == data and read_bytes(str(tmp_path / "empty.jpg")) == b""
    real_fstat = decode_module.os.fstat

    class Shrunk:  # the size at open, before the file grew
        def __init__(self, info):
            self.st_mode, self.st_size = info.st_mode, 100

    monkeypatch.setattr(decode_module.os, "fstat", lambda fd: Shrunk(real_fstat(fd)))
    assert read_bytes(str(tmp_path / "big.jpg")) == data
    with pytest.raises(DecodeError, match="not a regular file"):
        read_bytes(str(tmp_path))
