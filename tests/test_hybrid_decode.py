"""Hybrid decoding (``--decode hybrid``): decoders of different speeds sharing one listing.

The scheduler is checked with thread "decoders" of different speeds (deterministic: the fast
one starts only once the slow one holds a batch), and a whole run with the GPU decoder's
stand-in (tests/test_gpu_decode.py) beside real decoding processes."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import write_tree
from featcache import open_store
from featcache.extract.config import ExtractConfig, key_spec
from featcache.extract.images import gpu_decode
from featcache.extract.images.batches import Batch, Chunks
from featcache.extract.images.hybrid import interleave
from featcache.extract.pipeline import extract
from test_gpu_decode import FAKE, PIXELS, FakeDecoder


def thread_decoder(name, delay, taken, started=None, wait_for=None, fail_after=None):
    """A source that 'decodes' a chunk by sleeping ``delay``; records which chunks it took."""

    def make(chunks):
        def batches():
            if wait_for is not None:
                assert wait_for.wait(5)
            for n, pairs in enumerate(chunks):
                if started is not None:
                    started.set()
                if fail_after is not None and n == fail_after:
                    raise RuntimeError(f"{name} broke")
                time.sleep(delay)
                taken.setdefault(name, []).extend(d for _, d in pairs)
                yield Batch([e for e, _ in pairs], [d for _, d in pairs], np.zeros((len(pairs), 1)), [])

        return batches()

    return make


def _threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("featcache-hybrid")]


def test_two_decoders_of_different_speeds_give_every_row_once_as_one_decoder_does():
    todo = [(f"entry-{i}", f"digest-{i}") for i in range(40)]
    one = [d for b in interleave(Chunks(todo, 4), {"only": thread_decoder("only", 0, {})}) for d in b.digests]
    taken, slow_started = {}, threading.Event()
    both = [d for b in interleave(Chunks(todo, 4), {
        "slow": thread_decoder("slow", 0.05, taken, started=slow_started),
        "fast": thread_decoder("fast", 0.001, taken, wait_for=slow_started),
    }) for d in b.digests]
    assert sorted(both) == sorted(one) == sorted(d for _, d in todo)  # every row once, nothing lost or doubled
    assert one == [d for _, d in todo]  # one decoder: listing order
    assert len(taken["slow"]) >= 4 and len(taken["fast"]) > len(taken["slow"])  # each took work; the fast one more
    assert _threads() == []


def test_a_decoder_that_fails_ends_the_run_with_its_error_and_stops_the_others():
    todo = [(f"e{i}", f"d{i}") for i in range(400)]
    got = []
    with pytest.raises(RuntimeError, match="gpu broke"):
        for batch in interleave(Chunks(todo, 4), {"gpu": thread_decoder("gpu", 0.001, {}, fail_after=2),
                                                   "cpu": thread_decoder("cpu", 0.01, {})}):
            got.append(batch)
    assert 0 < sum(len(b.digests) for b in got) < 400  # it stopped, it did not run on to the end
    assert _threads() == []


def test_a_consumer_that_leaves_early_stops_every_decoder_and_releases_queued_batches():
    todo = [(f"e{i}", f"d{i}") for i in range(400)]
    released = []

    def make(chunks):
        def batches():
            for pairs in chunks:
                batch = Batch(pairs, pairs, None, [])
                batch.release = lambda: released.append(1)
                yield batch
        return batches()

    batches = interleave(Chunks(todo, 4), {"a": make, "b": make})
    next(batches)
    batches.close()  # Ctrl-C in the model loop: the run's generator is closed
    assert _threads() == [] and released  # nothing hangs; queued batches went back to their decoders


def test_a_hybrid_run_gives_the_rows_and_key_of_a_gpu_run_with_both_sides_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_decode, "import_nvimgcodec", lambda: FAKE)
    monkeypatch.setattr(gpu_decode, "gpu_visible", lambda: True)
    tree = write_tree(tmp_path / "i", per_class=12)
    real_decode = FakeDecoder.decode

    def slow_decode(self, streams, **kwargs):  # the stand-in slower than 2 processes: both sides get work
        time.sleep(0.3)
        return real_decode(self, streams, **kwargs)

    monkeypatch.setattr(FakeDecoder, "decode", slow_decode)
    FakeDecoder.given, FakeDecoder.refuse = [], set()
    hybrid = extract(str(tree), str(tmp_path / "h.h5"), ExtractConfig(**PIXELS, decode="hybrid", decode_workers=2))
    on_gpu = len(FakeDecoder.given)
    gpu = extract(str(tree), str(tmp_path / "g.h5"), ExtractConfig(**PIXELS, decode="gpu"))
    assert hybrid["decode"] == "hybrid" and hybrid["resize"] == "gpu-bilinear"
    assert hybrid["feature_set"] == gpu["feature_set"]  # one key: gpu-bilinear on both sides
    assert key_spec(ExtractConfig(**PIXELS, decode="hybrid")) == key_spec(ExtractConfig(**PIXELS, decode="gpu"))
    assert 0 < on_gpu < 24  # the GPU decoder and the processes each decoded some of the 24 images

    def rows(store):
        with open_store(store) as s:
            fs = s[gpu["feature_set"]]
            return dict(zip(fs.column("paths")[fs.rows()], fs.read(fs.rows())))

    a, b = rows(tmp_path / "h.h5"), rows(tmp_path / "g.h5")
    assert hybrid["extracted"] == gpu["extracted"] == 24 and a.keys() == b.keys()
    for path in a:  # Pillow + the float filter on the CPU side vs the GPU side: a rounding step apart
        np.testing.assert_allclose(a[path], b[path], atol=1.01 / 255, err_msg=path)
