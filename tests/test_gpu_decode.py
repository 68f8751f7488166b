"""GPU JPEG decoding (``--decode gpu``) as far as a machine without a GPU can check it: the error
lines, the routing of files to the CPU path, the key, and the ``gpu-bilinear`` arithmetic.

The routing test puts a stand-in for nvImageCodec in its place (Pillow decodes; the images are
handed over through DLPack as nvImageCodec does, here on the CPU), so everything featcache
does around the decoder runs for real: CodeStream checks, DLPack into the Keras backend, the
resize on the backend, the CPU path for rejected files, joining both into one batch."""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import io
import types

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageOps

from conftest import CATS_DOGS, class_image, write_tree
from featcache import open_store
from featcache.cli import cli
from featcache.extract.images import gpu_decode
from featcache.extract.config import ExtractConfig, key_spec
from featcache.extract.images.decode import decode_image
from featcache.extract.pipeline import extract
from featcache.extract.images.resize import resize_array, triangle_weights

PIXELS = dict(base="pixels", size=16, progress=False, batch_size=4)


def test_without_nvimagecodec_one_line_says_what_to_install(tmp_path):
    if importlib.util.find_spec("nvidia") and importlib.util.find_spec("nvidia.nvimgcodec"):
        pytest.skip("nvImageCodec is installed here")
    tree = write_tree(tmp_path / "i", per_class=1)
    out = CliRunner().invoke(cli, ["extract", str(tree), str(tmp_path / "s.h5"), "--base", "pixels", "--decode", "gpu"])
    assert out.exit_code == 1
    assert out.stderr == ("error: --decode gpu needs NVIDIA nvImageCodec: pip install 'featcache[gpu-decode]' "
                          "(nvidia-nvimgcodec-cu12[nvjpeg]; on CUDA 13 nvidia-nvimgcodec-cu13[nvjpeg])\n")
    assert not (tmp_path / "s.h5").exists()  # refused before the store was touched


class FakeCodeStream:
    """What featcache reads of nvimgcodec.CodeStream: the header's size and channels."""

    def __init__(self, data: bytes):
        with Image.open(io.BytesIO(data)) as img:  # reads the header only, as nvImageCodec does
            self.width, self.height = img.size
            self.num_channels = len(img.getbands())
        self.data = data


def aligned(array: np.ndarray) -> np.ndarray:
    """A copy at a 64-byte boundary, as device allocations are (TensorFlow requires it of DLPack input)."""
    buffer = np.empty(array.nbytes + 64, np.uint8)
    start = -buffer.ctypes.data % 64
    out = buffer[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def at_address(interface: dict) -> np.ndarray:
    """The memory a __cuda_array_interface__ describes (here host memory), as a writable array."""
    shape = tuple(interface["shape"])
    memory = (ctypes.c_uint8 * int(np.prod(shape))).from_address(interface["data"][0])
    return np.ctypeslib.as_array(memory).reshape(shape)


class FakeImage:
    """What featcache uses of nvimgcodec.Image: shape, __cuda_array_interface__, DLPack export
    (counted: each is a hand-over into the backend), cuda(). Its "device" memory is host memory."""

    handovers = 0
    external = False  # over memory nvImageCodec does not own (as_image): decode writes into it

    def __init__(self, array: np.ndarray, external=False):
        self.array, self.external = array, external

    @property
    def shape(self):
        return self.array.shape

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.array.shape, "typestr": "|u1", "data": (self.array.ctypes.data, False), "version": 3,
                "stream": 1}

    def __dlpack__(self, stream=None):
        FakeImage.handovers += 1
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()

    def cuda(self):
        return FakeImage(aligned(self.array))


def as_image(source, cuda_stream=0):
    """nvimgcodec.as_image: wraps memory that is not its own (never copies)."""
    if hasattr(source, "__cuda_array_interface__"):
        return FakeImage(at_address(source.__cuda_array_interface__), external=True)
    return FakeImage(np.asarray(source), external=True)  # host memory (__array_interface__)


class FakeDecoder:
    given: list[bytes] = []
    refuse: set[bytes] = set()
    options = None
    calls: list[int] = []  # images per decode call

    def __init__(self, options=None):
        FakeDecoder.options = options

    def decode(self, streams, *, images=None, params=None, cuda_stream=0):
        """nvImageCodec's batched decode: a list of CodeStreams in, an Image or None per stream out;
        with ``images`` (Images over external memory) it decodes into them and returns them."""
        assert params == {"apply_exif_orientation": True, "color_spec": "srgb"}
        assert images is None or len(images) == len(streams)
        FakeDecoder.calls.append(len(streams))
        out = []
        for k, stream in enumerate(streams):
            FakeDecoder.given.append(stream.data)
            try:
                assert stream.data not in FakeDecoder.refuse
                img = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(stream.data))).convert("RGB"))
            except Exception:  # nvImageCodec answers None for an image it cannot decode
                out.append(None)
                continue
            if images is None:
                out.append(FakeImage(aligned(img)))
                continue
            target = images[k]
            assert target.external  # only Images over external memory are decoded into in place
            if img.nbytes > target.array.nbytes:  # nvImageCodec fails the whole call (std::invalid_argument)
                raise ValueError("Existing buffer is too small to fit new image")
            target.array = target.array.reshape(-1)[: img.nbytes].reshape(img.shape)  # its shape, in the same memory
            target.array[...] = img
            out.append(target)
        return out


FAKE = types.SimpleNamespace(Decoder=FakeDecoder, CodeStream=FakeCodeStream, __version__="0.9.0",
                             as_image=as_image, as_images=lambda sources, cuda_stream=0: [as_image(s) for s in sources],
                             DecodeParams=lambda **kwargs: kwargs, ColorSpec=types.SimpleNamespace(SRGB="srgb"))


def keras_backend() -> str:
    import keras

    return keras.backend.backend()


def test_no_gpu_visible_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", lambda: FAKE)
    monkeypatch.setattr(gpu_decode, "gpu_visible", lambda: False)
    tree = write_tree(tmp_path / "i", per_class=1)
    out = CliRunner().invoke(cli, ["extract", str(tree), str(tmp_path / "s.h5"), "--base", "pixels", "--decode", "gpu"])
    assert out.exit_code == 1 and out.stderr == (
        f"error: --decode gpu: no CUDA GPU is visible to Keras ({keras_backend()}); use --decode processes (or threads)\n")
    pillow = CliRunner().invoke(cli, ["extract", str(tree), str(tmp_path / "s.h5"), "--base", "pixels", "--decode", "gpu",
                                      "--resize", "bilinear"])
    assert pillow.exit_code == 1 and pillow.stderr == (
        "error: --decode gpu resizes on the GPU (gpu-bilinear); leave --resize out or pass --resize gpu-bilinear "
        "(not bilinear)\n")


def jpeg(img: Image.Image, **save) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=92, **save)
    return out.getvalue()


def test_non_jpeg_and_rejected_files_take_the_cpu_path_and_failures_are_reported(tmp_path, monkeypatch):
    tree = write_tree(tmp_path / "i", per_class=3)  # 6 JPEGs of 48x40
    cats, dogs = tree / "cats", tree / "dogs"
    refused = jpeg(class_image(0, 50, size=(64, 48)))
    (cats / "refused.jpg").write_bytes(refused)  # a JPEG the GPU decoder will not take: Pillow does
    whole = jpeg(class_image(1, 51, size=(120, 90)))
    (cats / "truncated.jpg").write_bytes(whole[: len(whole) // 2])  # the header is fine, the data ends early
    Image.new("RGB", (30, 20), (10, 200, 30)).save(dogs / "really_png.jpg", "PNG")
    (dogs / "cmyk.jpg").write_bytes(jpeg(Image.new("CMYK", (24, 24), (0, 255, 255, 0))))
    rotated = Image.new("RGB", (40, 20), (0, 0, 0))
    rotated.paste((255, 255, 255), (0, 0, 20, 20))  # stored: left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: white on top
    (dogs / "rotated.jpg").write_bytes(jpeg(rotated, exif=exif))
    (dogs / "gray.jpg").write_bytes(jpeg(Image.new("L", (32, 32), 100)))

    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", lambda: FAKE)
    monkeypatch.setattr(gpu_decode, "gpu_visible", lambda: True)
    FakeDecoder.given, FakeDecoder.refuse = [], {refused}
    on_gpu = extract(str(tree), str(tmp_path / "g.h5"), ExtractConfig(**PIXELS, decode="gpu"))
    on_cpu = extract(str(tree), str(tmp_path / "c.h5"), ExtractConfig(**PIXELS, decode="threads", resize="gpu-bilinear"))

    # the GPU decoder saw exactly the JPEGs of 1 or 3 channels; PNG and CMYK went straight to the CPU
    jpegs = {p.relative_to(tree).as_posix() for p in tree.rglob("*.jpg")} - {"dogs/really_png.jpg", "dogs/cmyk.jpg"}
    assert sorted(FakeDecoder.given) == sorted((tree / p).read_bytes() for p in jpegs)
    assert FakeDecoder.options == ":fancy_upsampling=1"
    assert on_gpu["decode"] == "gpu" and on_gpu["resize"] == "gpu-bilinear"
    assert on_gpu["feature_set"] == on_cpu["feature_set"]  # gpu-bilinear: one key value, whichever side decoded
    with open_store(tmp_path / "g.h5") as s:
        fs = s[on_gpu["feature_set"]]
        assert fs.spec.resize == "gpu-bilinear" == key_spec(ExtractConfig(**PIXELS, decode="gpu")).resize
        gpu_rows = dict(zip(fs.column("paths")[fs.rows()], fs.read(fs.rows())))
        assert dict(fs.failures()) == {"cats/truncated.jpg": "truncated image data (JPEG file ends early)"}
    with open_store(tmp_path / "c.h5") as s:
        fs = s[on_cpu["feature_set"]]
        cpu_rows = dict(zip(fs.column("paths")[fs.rows()], fs.read(fs.rows())))
        assert dict(fs.failures()) == {"cats/truncated.jpg": "truncated image data (JPEG file ends early)"}
    assert on_gpu["extracted"] == on_cpu["extracted"] == 11 and gpu_rows.keys() == cpu_rows.keys()
    for path in gpu_rows:  # the same filter on the backend as in numpy: at most a rounding step apart
        np.testing.assert_allclose(gpu_rows[path], cpu_rows[path], atol=1.01 / 255, err_msg=path)
    upright = gpu_rows["dogs/rotated.jpg"]
    assert upright[:4].min() > 0.85 and upright[-4:].max() < 0.15  # EXIF orientation applied: white on top
    assert np.allclose(gpu_rows["dogs/gray.jpg"], 100 / 255, atol=2 / 255)  # grayscale: R = G = B


def test_triangle_weights_are_pillows_bilinear_coefficients():
    w = triangle_weights(375, 150)
    assert w.shape == (150, 375) and np.allclose(w.sum(axis=1), 1.0)
    assert (w > 0).sum(axis=1).max() <= 6  # support 2.5 input pixels each side: antialiased
    up = triangle_weights(4, 8)  # upscaling: plain linear interpolation between neighbours
    assert (up > 0).sum(axis=1).max() == 2 and np.allclose(up[0], [1, 0, 0, 0])


def test_gpu_bilinear_stays_within_rounding_of_pillow_bilinear():
    photos = sorted((CATS_DOGS / "train" / "cats").glob("*.jpg"))[:8] if CATS_DOGS.exists() else []
    images = [np.asarray(Image.open(p).convert("RGB")) for p in photos] or [np.asarray(class_image(0, i, (200, 150)))
                                                                           for i in range(4)]
    for image in images:
        ours = resize_array(image, 150).astype(int)
        pillow = np.asarray(Image.fromarray(image).resize((150, 150), Image.Resampling.BILINEAR)).astype(int)
        assert np.abs(ours - pillow).max() <= 2 and np.abs(ours - pillow).mean() < 0.3
    tiny = np.full((1, 1, 3), 77, np.uint8)
    assert (resize_array(tiny, 5) == 77).all()
    data = jpeg(class_image(1, 3, size=(90, 60)))
    assert decode_image(data, 32, "gpu-bilinear").shape == (32, 32, 3)


def _gpu_run(tmp_path, monkeypatch, per_class=5):
    from featcache.extract.images.discover import discover

    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", lambda: FAKE)
    FakeDecoder.given, FakeDecoder.refuse = [], set()
    listing = discover(str(write_tree(tmp_path / "i", per_class=per_class)))
    todo = [(e, f"digest-{i}") for i, e in enumerate(listing.entries)]
    return listing, todo, gpu_decode.GpuDecoder(16, 10**8, 2)


def _stage_threads():
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("featcache-gpu")]


def test_the_three_stages_keep_listing_order_across_batches(tmp_path, monkeypatch):
    listing, todo, decoder = _gpu_run(tmp_path, monkeypatch)
    batches = list(gpu_decode.gpu_batches(listing, todo, 16, 10**8, 3, 2, decoder))
    assert [len(b.entries) for b in batches] == [3, 3, 3, 1]
    # Listing order, and each digest is of the bytes the reader read (one read per file)
    read_digests = [hashlib.sha256(open(listing.path(e), "rb").read()).hexdigest() for e, _ in todo]
    assert [d for b in batches for d in b.digests] == read_digests
    for batch in batches:  # each row is its own file's pixels, decoded and resized on the "GPU"
        for entry, image in zip(batch.entries, np.asarray(batch.images)):
            expected = decode_image(open(listing.path(entry), "rb").read(), 16, "gpu-bilinear")
            assert np.abs(image.astype(int) - expected).max() <= 1, entry.relpath
    assert decoder.on_gpu == 10 and decoder.on_cpu == 0 and _stage_threads() == []


def test_a_run_that_stops_early_or_fails_in_a_stage_ends_every_stage_thread(tmp_path, monkeypatch):
    listing, todo, decoder = _gpu_run(tmp_path, monkeypatch, per_class=8)
    batches = gpu_decode.gpu_batches(listing, todo, 16, 10**8, 2, 2, decoder)
    assert len(next(batches).entries) == 2
    batches.close()  # the consumer leaves (a stop): nothing hangs, no stage thread is left
    assert _stage_threads() == []

    listing, todo, decoder = _gpu_run(tmp_path / "again", monkeypatch, per_class=8)
    read, calls = decoder.read, []

    def read_then_fail(paths):
        calls.append(paths)
        if len(calls) == 3:
            raise RuntimeError("disk went away")
        return read(paths)

    decoder.read = read_then_fail
    got = []
    with pytest.raises(RuntimeError, match="disk went away"):
        for batch in gpu_decode.gpu_batches(listing, todo, 16, 10**8, 2, 2, decoder):
            got.append(batch)
    assert [len(b.entries) for b in got] == [2, 2]  # the batches before the failure came through
    assert _stage_threads() == []


def _mixed_tree(tmp_path):
    """Ten JPEGs of two header sizes, one EXIF-turned a quarter, one the decoder refuses."""
    tree = write_tree(tmp_path / "i", per_class=3)  # 6 JPEGs of 48x40
    for i in range(2):
        (tree / "cats" / f"wide{i}.jpg").write_bytes(jpeg(class_image(2, i, size=(64, 48))))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48x40, shown 40x48: decoded (48, 40, 3) in a slot planned as (40, 48, 3)
    (tree / "dogs" / "turned.jpg").write_bytes(jpeg(class_image(3, 7), exif=exif))
    refused = jpeg(class_image(1, 9, size=(64, 48)))
    (tree / "dogs" / "refused.jpg").write_bytes(refused)
    return tree, refused


def _one_batch(tree, refused, version):
    """Every file in one batch through gpu_batches with a stand-in of nvImageCodec ``version``:
    ({relpath: row}, DLPack hand-overs, decode calls, resize calls)."""
    from featcache.extract.images.discover import discover

    FakeDecoder.given, FakeDecoder.refuse, FakeDecoder.calls, FakeImage.handovers = [], {refused}, [], 0
    listing = discover(str(tree))
    todo = [(e, None) for e in listing.entries]
    decoder = gpu_decode.GpuDecoder(16, 10**8, 2)
    assert decoder.into_buffer == (version >= "0.7")
    resizes, resize = [], decoder.ops.resize
    decoder.ops.resize = lambda *args: resizes.append(1) or resize(*args)
    (batch,) = gpu_decode.gpu_batches(listing, todo, 16, 10**8, len(todo), 2, decoder)
    rows = dict(zip([e.relpath for e in batch.entries], np.asarray(batch.images)))
    return rows, FakeImage.handovers, FakeDecoder.calls, len(resizes)


def test_a_batch_is_one_decode_call_and_one_hand_over_per_image_size_with_the_rows_of_per_image_hand_overs(
        tmp_path, monkeypatch):
    tree, refused = _mixed_tree(tmp_path)
    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", lambda: FAKE)
    rows, handovers, calls, resizes = _one_batch(tree, refused, FAKE.__version__)
    # 10 files: 9 GPU candidates in ONE decode call; 2 header sizes -> 2 DLPack hand-overs; 3 resizes
    # (48x40 upright, 48x40 turned, 64x48), whatever the number of images
    assert calls == [10] and handovers == 2 and resizes == 3
    assert len(rows) == 10  # the refused one came back from the CPU path

    # nvImageCodec before 0.7 (no decoding into given memory): an Image and a hand-over per image
    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", lambda: types.SimpleNamespace(**{**vars(FAKE),
                                                                                          "__version__": "0.6.0"}))
    before, per_image, calls, _ = _one_batch(tree, refused, "0.6.0")
    assert calls == [10] and per_image == 9
    assert rows.keys() == before.keys()
    for path in rows:  # the same pixels, whichever way they reached the backend
        np.testing.assert_array_equal(rows[path], before[path], err_msg=path)
    turned = decode_image((tree / "dogs" / "turned.jpg").read_bytes(), 16, "gpu-bilinear")
    assert np.abs(rows["dogs/turned.jpg"].astype(int) - turned).max() <= 1  # EXIF-turned, picked by the gather
    expected = decode_image(refused, 16, "gpu-bilinear")
    np.testing.assert_array_equal(rows["dogs/refused.jpg"], expected)  # the CPU path's row, joined


def test_a_batch_the_decoder_fails_as_a_whole_goes_to_the_cpu_path(tmp_path, monkeypatch):
    tree, refused = _mixed_tree(tmp_path)
    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", lambda: FAKE)

    def too_small(self, streams, **kwargs):  # what nvImageCodec raises for a buffer an image does not fit
        raise ValueError("Existing buffer is too small to fit new image")

    monkeypatch.setattr(FakeDecoder, "decode", too_small)
    rows, handovers, _, resizes = _one_batch(tree, refused, FAKE.__version__)
    assert handovers == 0 and resizes == 0 and len(rows) == 10
    for path, row in rows.items():
        expected = decode_image((tree / path).read_bytes(), 16, "gpu-bilinear")
        np.testing.assert_array_equal(row, expected, err_msg=path)
