"""Every kind of bad input: each case gets an exact, readable outcome and the run goes on.

Most cases share one CLI run (pixels base, no TensorFlow) over a tree holding all the bad
files beside good ones; each case is its own test on that run's JSON and store. The pixels
base stores the resized image scaled to [0, 1], so decoding is checked on the stored values.
Cases that need their own process (permissions, a file size limit) run `python -m featcache`.
"""
from __future__ import annotations

import ctypes
import io
import json
import os
import pathlib
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import REPO, class_image, write_tree
from featcache import open_store
from featcache.cli import cli
from featcache.extract.images.decode import DecodeError, decode_image

SIZE = 16
PIXELS = ["--base", "pixels", "--size", str(SIZE), "--no-progress"]
NON_UTF8 = b"cats/\xff\xfeimage.jpg"  # not valid UTF-8: stored with its bytes escaped
NON_UTF8_STORED = "cats/\\xff\\xfeimage.jpg"


def invoke(*args):
    return CliRunner().invoke(cli, [os.fspath(a) if isinstance(a, pathlib.Path) else a for a in args])


def featcache_subprocess(*args, preexec_fn=None, timeout=120):
    """`python -m featcache ARGS` in a fresh process (for permissions and resource limits)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-m", "featcache", *map(os.fspath, args)], env=env, cwd=REPO,
                          capture_output=True, text=True, preexec_fn=preexec_fn, timeout=timeout)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a few bytes of pixel data: tiny on disk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def uniform(color, size=(24, 24), mode="RGB") -> Image.Image:
    return Image.new(mode, size, color)


def build_bad_tree(root: pathlib.Path) -> pathlib.Path:
    write_tree(root, per_class=3)
    cats, dogs = root / "cats", root / "dogs"
    (cats / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    class_image(0, 7, size=(120, 90)).save(jpeg, "JPEG", quality=90)
    (cats / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (cats / "random.jpg").write_bytes(b"\x01" + np.random.default_rng(0).bytes(4000))
    damaged = bytearray(png_bytes(class_image(1, 3, size=(60, 50))))
    damaged[len(damaged) // 2:len(damaged) // 2 + 40] = bytes(40)  # zeros over the middle of the pixel data
    (cats / "damaged.png").write_bytes(bytes(damaged))
    (cats / "notes.txt").write_text("a text file beside the images\n")
    (cats / "letter.jpg").write_text("Dear reader,\nthis is text, not a photo.\n")
    (cats / "really_png.jpg").write_bytes(png_bytes(uniform((10, 200, 30))))
    webp = io.BytesIO()
    uniform((30, 60, 220)).save(webp, "WEBP", lossless=True)
    (cats / "really_webp.jpg").write_bytes(webp.getvalue())
    frames = [uniform(c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    frames[0].save(dogs / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    palette = Image.new("P", (24, 24), 0)  # index 0 transparent, index 1 opaque green
    palette.putpalette([255, 0, 0, 0, 160, 0] + [0] * 762)
    palette.paste(1, (12, 0, 24, 24))
    palette.save(dogs / "palette.png", transparency=0)
    uniform(100, mode="L").save(dogs / "gray.png")
    uniform((0, 255, 255, 0), mode="CMYK").save(dogs / "cmyk.jpg", quality=95)
    sixteen = np.zeros((24, 24), dtype=np.uint16)  # quadrants 0, 256, 32768, 65535
    sixteen[:12, 12:], sixteen[12:, :12], sixteen[12:, 12:] = 256, 32768, 65535
    Image.fromarray(sixteen).save(dogs / "sixteen.png")
    rotated = Image.new("RGB", (40, 20), (0, 0, 0))
    rotated.paste((255, 255, 255), (0, 0, 20, 20))  # stored: left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: white on top
    rotated.save(dogs / "rotated.jpg", exif=exif, quality=95)
    uniform((200, 100, 50), size=(1, 1)).save(dogs / "tiny.png")
    (dogs / "enormous.png").write_bytes(png_header_only(100_000, 100_000))
    os.symlink("loop.jpg", cats / "loop.jpg")  # a symlink to itself
    (cats / "sub").mkdir()
    class_image(0, 40).save(cats / "sub" / "nested.jpg")
    os.symlink("..", cats / "sub" / "again")  # a folder loop: cats/sub/again -> cats
    with open(os.path.join(os.fsencode(root), NON_UTF8), "wb") as fh:
        fh.write(png_bytes(uniform((90, 90, 9))))
    os.mkfifo(cats / "pipe.jpg")
    (cats / "bad\nname\x1b[31m.jpg").write_bytes(b"\x00\x01 not an image")
    return root


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    root = build_bad_tree(tmp_path_factory.mktemp("bad") / "images")
    store = root.parent / "s.h5"
    result = invoke("extract", root, store, *PIXELS, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    with open_store(store) as s:
        fs = s[out["feature_set"]]
        rows = fs.rows()
        features = dict(zip(fs.column("paths")[rows], fs.read(rows)))
        stored_failures = dict(fs.failures())
    return {"root": root, "store": store, "out": out, "features": features, "stored_failures": stored_failures,
            "failures": {f["path"]: f["reason"] for f in out["failures"]},
            "skipped": {s["path"]: s["reason"] for s in out["skipped"]}}


FAILURES = [
    ("cats/empty.jpg", "empty file (0 bytes)"),
    ("cats/truncated.jpg", "truncated image data (JPEG file ends early)"),
    ("cats/random.jpg", "not an image (unknown format or corrupt header)"),
    ("cats/damaged.png", "corrupt PNG data (unrecognized data stream contents when reading image file)"),
    ("cats/letter.jpg", "not an image (a text file)"),
    ("cats/loop.jpg", "symlink loop"),
    ("cats/pipe.jpg", "not a regular file (a pipe, socket, device or folder)"),
    ("cats/bad\nname\x1b[31m.jpg", "not an image (unknown format or corrupt header)"),
    ("dogs/enormous.png", "image is 100000x100000 = 10,000,000,000 pixels, above the limit of 100,000,000 "
                          "(--max-pixels); refused before decoding"),
]


@pytest.mark.parametrize("path, reason", FAILURES, ids=[p for p, _ in FAILURES])
def test_bad_file_is_a_failure_with_its_reason(bad_run, path, reason):
    assert bad_run["failures"][path] == reason
    assert bad_run["stored_failures"][path] == reason  # recorded in the store too


def test_exactly_the_bad_files_failed_and_the_run_went_on(bad_run):
    assert sorted(bad_run["failures"]) == sorted(p for p, _ in FAILURES)
    good = {"cats/cats.000.jpg", "cats/cats.001.jpg", "cats/cats.002.jpg", "dogs/dogs.000.jpg",
            "dogs/dogs.001.jpg", "dogs/dogs.002.jpg", "cats/really_png.jpg", "cats/really_webp.jpg",
            "dogs/animated.gif", "dogs/palette.png", "dogs/gray.png", "dogs/cmyk.jpg", "dogs/sixteen.png",
            "dogs/rotated.jpg", "dogs/tiny.png", "cats/sub/nested.jpg", NON_UTF8_STORED}
    assert set(bad_run["features"]) == good
    assert bad_run["out"]["extracted"] == len(good) and bad_run["out"]["failed"] == len(FAILURES)


def test_skipped_files_have_reasons(bad_run):
    assert bad_run["skipped"] == {
        "cats/notes.txt": "not an image file name (.txt)",
        "cats/sub/again": "symlink loop (this folder is already listed)",
    }


def color_of(bad_run, path):
    return np.round(bad_run["features"][path] * 255).astype(int)


@pytest.mark.parametrize("path, rgb", [("cats/really_png.jpg", (10, 200, 30)), ("cats/really_webp.jpg", (30, 60, 220)),
                                       ("dogs/gray.png", (100, 100, 100)), ("dogs/tiny.png", (200, 100, 50))])
def test_misnamed_grayscale_and_1x1_images_decode(bad_run, path, rgb):
    assert (color_of(bad_run, path) == rgb).all()


def test_animated_gif_uses_the_first_frame(bad_run):
    assert (color_of(bad_run, "dogs/animated.gif") == (255, 0, 0)).all()


def test_palette_png_transparency_is_white(bad_run):
    pixels = color_of(bad_run, "dogs/palette.png")
    assert (pixels[:, :5] == 255).all()  # transparent left half: composited on white
    assert (pixels[:, 11:] == (0, 160, 0)).all()


def test_cmyk_jpeg_becomes_rgb(bad_run):
    assert np.abs(color_of(bad_run, "dogs/cmyk.jpg") - (255, 0, 0)).max() <= 3


def test_sixteen_bit_png_is_scaled_not_clipped(bad_run):
    pixels = color_of(bad_run, "dogs/sixteen.png")
    # 65535 -> 255, 32768 -> 128, 256 -> 1 (clipping would give 255 for the last two), 0 -> 0
    assert pixels[2, 2, 0] == 0 and pixels[2, 13, 0] == 1 and pixels[13, 2, 0] == 128 and pixels[13, 13, 0] == 255


def test_exif_orientation_is_applied(bad_run):
    pixels = color_of(bad_run, "dogs/rotated.jpg")
    assert pixels[:6].min() > 230 and pixels[-6:].max() < 25  # upright: white on top


def test_symlinked_folder_loop_is_listed_once(bad_run):
    assert [p for p in bad_run["features"] if p.endswith("nested.jpg")] == ["cats/sub/nested.jpg"]


def test_non_utf8_file_name_is_stored_and_reused(bad_run, tmp_path):
    assert (color_of(bad_run, NON_UTF8_STORED) == (90, 90, 9)).all()
    store = tmp_path / "s.h5"
    shutil.copy(bad_run["store"], store)
    again = invoke("extract", bad_run["root"], store, *PIXELS, "--json")
    out = json.loads(again.stdout)
    assert again.exit_code == 0 and out["extracted"] == 0 and out["reused"] == len(bad_run["features"])


def test_control_characters_in_names_are_printed_escaped(bad_run, tmp_path):
    result = invoke("extract", bad_run["root"], tmp_path / "t.h5", *PIXELS)
    assert result.exit_code == 0
    assert "  failed: cats/bad\\nname\\x1b[31m.jpg: not an image" in result.stderr
    assert "  failed: cats/\\udcff\\udcfeimage.jpg" not in result.stderr  # it decoded fine
    info = invoke("info", bad_run["store"])
    for text in (result.stdout, result.stderr, info.stdout):
        assert "\x1b" not in text and not any(ord(c) < 32 and c != "\n" for c in text)
    assert "  failed: cats/bad\\nname\\x1b[31m.jpg: not an image" in info.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("  failed: ")]
    assert len(lines) == len(FAILURES)  # one line per failure, newline in the name or not


def test_strict_makes_failures_exit_1(bad_run, tmp_path):
    assert invoke("extract", bad_run["root"], tmp_path / "t.h5", *PIXELS, "--strict").exit_code == 1


def test_max_pixels_option(tmp_path):
    root = write_tree(tmp_path / "i", per_class=1)  # 48x40 images
    class_image(1, 5, size=(20, 20)).save(root / "dogs" / "small.png")
    result = invoke("extract", root, tmp_path / "s.h5", *PIXELS, "--max-pixels", "1000", "--json")
    out = json.loads(result.stdout)
    reason = "image is 48x40 = 1,920 pixels, above the limit of 1,000 (--max-pixels); refused before decoding"
    assert result.exit_code == 0 and out["extracted"] == 1
    assert {f["path"]: f["reason"] for f in out["failures"]} == {"cats/cats.000.jpg": reason, "dogs/dogs.000.jpg": reason}


def test_enormous_dimensions_refused_before_decoding_even_above_pillow_limit():
    # 3e10 pixels would need 90 GB decoded; Pillow's own bomb error does not replace our reason.
    with pytest.raises(DecodeError, match=r"^image is 200000x150000 = 30,000,000,000 pixels, above the limit of 100,000,000"):
        decode_image(png_header_only(200_000, 150_000), 16)
    # Above Pillow's own limit (178,956,970) but allowed by --max-pixels: decoding is tried.
    with pytest.raises(DecodeError, match=r"^truncated image data \(PNG file ends early\)$"):
        decode_image(png_header_only(20_000, 10_000), 16, max_pixels=300_000_000)


def test_empty_class_folder_and_single_class_warn_and_go_on(tmp_path):
    root = write_tree(tmp_path / "i", per_class=2)
    (root / "birds").mkdir()
    result = invoke("extract", root, tmp_path / "a.h5", *PIXELS)
    assert result.exit_code == 0 and "  warning: class folder 'birds' holds no images" in result.stderr
    single = write_tree(tmp_path / "j", per_class=2, classes=("cats",))
    result = invoke("extract", single, tmp_path / "b.h5", *PIXELS, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["extracted"] == 2
    assert json.loads(result.stdout)["warnings"] == ["only one class ('cats'): a classifier needs at least two"]


def test_missing_and_empty_root_exit_1(tmp_path):
    missing = invoke("extract", tmp_path / "nope", tmp_path / "s.h5", *PIXELS)
    assert missing.exit_code == 1 and missing.stderr == f"error: {tmp_path / 'nope'}: image folder does not exist\n"
    (tmp_path / "empty").mkdir()
    empty = invoke("extract", tmp_path / "empty", tmp_path / "s.h5", *PIXELS)
    assert empty.exit_code == 1
    assert empty.stderr == (f"error: {tmp_path / 'empty'}: no class folders and no images found (expected one "
                            "subfolder of images per class, or images to extract unlabeled)\n")
    assert not (tmp_path / "s.h5").exists()


def test_store_in_missing_folder_exit_1(image_tree, tmp_path):
    result = invoke("extract", image_tree, tmp_path / "no" / "s.h5", *PIXELS)
    assert result.exit_code == 1
    assert result.stderr == f"error: {tmp_path / 'no' / 's.h5'}: folder {tmp_path / 'no'} does not exist\n"


def test_store_that_is_not_hdf5_is_refused_and_untouched(image_tree, tmp_path):
    store = tmp_path / "notes.h5"
    store.write_bytes(b"my precious notes\n")
    before = os.stat(store)
    for args in (("extract", image_tree, store, *PIXELS), ("info", store)):
        result = invoke(*args)
        assert result.exit_code == 1
        assert result.stderr == f"error: {store}: not an HDF5 file (refusing to touch it; choose another store path)\n"
    assert store.read_bytes() == b"my precious notes\n" and os.stat(store).st_mtime_ns == before.st_mtime_ns


def test_store_from_a_newer_format_is_refused(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    assert invoke("extract", image_tree, store, *PIXELS).exit_code == 0
    with h5py.File(store, "a") as f:
        f.attrs["format_version"] = 99
    data = store.read_bytes()
    message = f"error: {store}: store format version 99 is newer than this featcache (supports 1); upgrade featcache to read it\n"
    for args in (("extract", image_tree, store, *PIXELS), ("info", store)):
        result = invoke(*args)
        assert result.exit_code == 1 and result.stderr == message
    assert store.read_bytes() == data


def test_feature_set_whose_key_does_not_match_is_refused(image_tree, tmp_path):
    store = tmp_path / "s.h5"
    name = json.loads(invoke("extract", image_tree, store, *PIXELS, "--json").stdout)["feature_set"]
    with h5py.File(store, "a") as f:
        key = json.loads(f["feature_sets"][name].attrs["key"])
        f["feature_sets"][name].attrs["key"] = json.dumps({**key, "input_size": 17}, sort_keys=True)
    message = (f"error: {store}: feature set {name}: its key attributes do not match its name (edited by hand?); "
               "refusing to use it\n")
    for args in (("extract", image_tree, store, *PIXELS), ("info", store)):
        result = invoke(*args)
        assert result.exit_code == 1 and result.stderr == message
    with h5py.File(store, "a") as f:
        f["feature_sets"][name].attrs["key"] = "{not json"
    result = invoke("info", store)
    assert result.exit_code == 1 and result.stderr == (
        f"error: {store}: feature set {name}: its key attribute is unreadable (JSONDecodeError); "
        "edited by hand or written by another tool\n")


def test_symlinks_leaving_the_image_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    class_image(0, 60).save(outside / "secret.jpg")
    write_tree(outside / "elsewhere", per_class=1, classes=("birds",))
    root = write_tree(tmp_path / "i", per_class=1)
    os.symlink(outside / "secret.jpg", root / "cats" / "link.jpg")
    os.symlink(outside, root / "dogs" / "outside_dir")
    os.symlink(outside / "elsewhere" / "birds", root / "birds")  # a whole class folder outside
    os.symlink(root / "cats" / "cats.000.jpg", root / "dogs" / "inside.jpg")  # stays inside: followed
    result = invoke("extract", root, tmp_path / "a.h5", *PIXELS, "--json")
    out = json.loads(result.stdout)
    leaves = "symlink leaves the image folder (use --follow-symlinks to allow)"
    assert result.exit_code == 0 and out["extracted"] == 2 and out["reused"] == 1  # inside.jpg: same bytes
    assert {s["path"]: s["reason"] for s in out["skipped"]} == {
        "birds": leaves, "cats/link.jpg": leaves, "dogs/outside_dir": leaves}
    followed = invoke("extract", root, tmp_path / "b.h5", *PIXELS, "--json", "--follow-symlinks")
    out = json.loads(followed.stdout)
    with open_store(tmp_path / "b.h5") as s:
        fs = s[out["feature_set"]]
        paths = set(fs.column("paths")[fs.rows()])
    assert {"cats/link.jpg", "dogs/outside_dir/secret.jpg", "birds/birds.000.jpg"} <= paths
    assert out["skipped"] == [] and len(paths) == 7


# -- cases that need their own process --------------------------------------------------------

libc = ctypes.CDLL(None, use_errno=True)


def _drop_file_permission_override():
    """In the child: root loses CAP_DAC_OVERRIDE/READ_SEARCH, so file modes apply to it too."""
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone from the exec'd program too
            os._exit(99)


def run_without_permission_override(*args):
    if os.geteuid() != 0:
        return featcache_subprocess(*args)
    result = featcache_subprocess(*args, preexec_fn=_drop_file_permission_override)
    if result.returncode == 99:
        pytest.skip("running as root without CAP_SETPCAP: cannot make file permissions apply")
    return result


def test_unreadable_file_is_a_failure(tmp_path):
    root = write_tree(tmp_path / "i", per_class=2)
    locked = root / "cats" / "locked.jpg"
    class_image(0, 9).save(locked)
    locked.chmod(0)
    try:
        result = run_without_permission_override("extract", root, tmp_path / "s.h5", *PIXELS, "--json")
    finally:
        locked.chmod(0o644)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["failures"] == [{"path": "cats/locked.jpg", "reason": "permission denied"}] and out["extracted"] == 4


def test_unwritable_store_folder_or_file_exit_1(image_tree, tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        result = run_without_permission_override("extract", image_tree, folder / "s.h5", *PIXELS)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 1
    assert result.stderr == f"error: {folder / 's.h5'}: cannot write in folder {folder} (permission denied)\n"
    assert os.listdir(folder) == []
    store = tmp_path / "s.h5"  # a store file that may not be written, in a folder that may
    assert invoke("extract", image_tree, store, *PIXELS).exit_code == 0
    store.chmod(0o444)
    result = run_without_permission_override("extract", image_tree, store, *PIXELS)
    assert result.returncode == 1 and result.stderr == f"error: {store}: cannot write the store (permission denied)\n"


def _file_size_limit(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_full_disk_stops_cleanly_and_keeps_committed_rows(tmp_path):
    root = write_tree(tmp_path / "i", per_class=40)
    store = tmp_path / "s.h5"
    args = ("extract", root, store, "--base", "pixels", "--size", "64", "--batch-size", "4", "--no-progress")
    # 80 rows of 48 KiB need ~4 MiB: a 3 MiB limit stops the run part-way.
    full = featcache_subprocess(*args, preexec_fn=_file_size_limit(3 << 20))
    assert full.returncode == 1, full.stderr
    lines = full.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: file size limit exceeded while writing ")
    committed = int(lines[0].split(": ")[2].split()[0])
    assert lines[0] == (f"error: file size limit exceeded while writing {store}: {committed} images committed, "
                        "nothing lost; make room and run the same command again to resume")
    assert 0 < committed < 80
    with open_store(store) as s:  # every committed row intact: equal to the images themselves
        fs = s[s.feature_set_names()[0]]
        rows = fs.rows()
        assert len(rows) == committed
        for path, feature in zip(fs.column("paths")[rows], fs.read(rows)):
            img = Image.open(root / path).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR)
            np.testing.assert_allclose(feature, np.asarray(img) / 255.0, atol=1e-6)
    resumed = featcache_subprocess(*args, "--json")
    out = json.loads(resumed.stdout)
    assert resumed.returncode == 0 and out["reused"] == committed and out["extracted"] == 80 - committed
    with open_store(store) as s:
        digests = s[out["feature_set"]].column("digests")
        assert len(digests) == len(set(digests)) == 80
    assert os.path.getsize(store) < 80 * 48 * 1024 + (2 << 20)  # reserved space was given back
