"""What an extraction run is asked to do: its options, how ``auto`` values resolve, its cache key."""
from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

from ..cache.key import KeySpec
from ..errors import FeatcacheError
from .bases.backbones import check_size, get_backbone
from . import defaults as EXTRACT
from .images.discover import Listing, discover
from .bases.feature_model import POOLINGS, gpu_compute_capability, resolve_precision
from .images.resize import GPU_DECODERS, GPU_RESIZE, resolve_resize
from .bases.weights import resolve_weights

STORAGE_DTYPES = ("float32", "float16")
DECODERS = EXTRACT.DECODERS
# Decoding processes pay for themselves once the model outruns a few decoding threads: on many
# cores, or beside a GPU. Below this, threads (the model is the limit; nothing to gain).
PROCESS_MIN_CORES = 8
PROCESS_MIN_CORES_WITH_GPU = 4
# GPU decoding beats decoding processes only where the cores are few. Measured on an H200 with
# 16 cores (vgg16@150 fp16, benchmarks/gpu_extract.py): --decode gpu 4,500-7,400 img/s, 15 decoding
# processes 9,800-11,000 (about 700 per process), so processes win from about 11 cores on. --decode
# hybrid (4,400-5,200 there, docs/gpu-decoding.md) is never picked by auto.
GPU_DECODE_MAX_CORES = 10


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that decides the features (the key) plus how the run goes."""

    base: str = EXTRACT.BASE
    size: int | None = None
    weights: str | None = EXTRACT.WEIGHTS
    layer: str | None = None
    pooling: str = EXTRACT.POOLING
    dtype: str = EXTRACT.DTYPE
    precision: str = EXTRACT.PRECISION  # resolved per device and base (model.resolve_precision) before keying
    resize: str = EXTRACT.RESIZE  # resolved per machine and decoder (resize.resolve_resize) before keying
    batch_size: int = EXTRACT.BATCH_SIZE
    seed: int = EXTRACT.SEED
    split_fractions: tuple[float, float, float] = EXTRACT.SPLIT_FRACTIONS
    split_seed: int = EXTRACT.SPLIT_SEED
    max_pixels: int = EXTRACT.MAX_PIXELS
    follow_symlinks: bool = False
    decode_workers: int | None = None
    xla: bool = False  # jit_compile the model step (not in the key: float rounding only)
    decode: str = EXTRACT.DECODE  # threads, processes, gpu or hybrid (see resolve_decode); not in the key, the resize is
    decode_processes: bool = False  # the older spelling of decode="processes"
    progress: bool = True
    augment: int = EXTRACT.AUGMENT  # K augmented views per training image (0: none); see extract/augment.py
    aug_seed: int = EXTRACT.AUG_SEED  # seed of the augmented views (in the key with the recipe and K)
    unlabeled: bool = False  # list every image below the folder, without classes (a flat folder is always so)
    rehash: bool = False  # read and hash every file, even one whose path and stat match a stored row (filestat.py)


@functools.lru_cache(maxsize=1)
def gpu_decode_installed() -> bool:
    """nvImageCodec is importable (checked without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except (ImportError, ValueError):
        return False


def resolve_decode(config: ExtractConfig) -> str:
    """How images are decoded: ``config.decode`` itself, or for ``auto``:

    * ``gpu`` where nvImageCodec is installed (``featcache[gpu-decode]``), a GPU is visible and
      the cores are few (GPU_DECODE_MAX_CORES or fewer);
    * ``processes`` on PROCESS_MIN_CORES cores or more (PROCESS_MIN_CORES_WITH_GPU beside a GPU);
    * ``threads`` otherwise.
    """
    if config.decode not in DECODERS:
        raise FeatcacheError(f"unknown decoder {config.decode!r}; choose from {', '.join(DECODERS)}")
    if config.decode_processes:
        if config.decode not in ("auto", "processes"):
            raise FeatcacheError(f"--decode-processes and --decode {config.decode}: choose one")
        return "processes"
    if config.decode != "auto":
        return config.decode
    gpu = gpu_compute_capability() is not None
    cores = os.cpu_count() or 1
    if gpu and cores <= GPU_DECODE_MAX_CORES and gpu_decode_installed():
        return "gpu"
    return "processes" if cores >= (PROCESS_MIN_CORES_WITH_GPU if gpu else PROCESS_MIN_CORES) else "threads"


def decoding_is_the_limit() -> bool:
    """Many cores, or a GPU running the model: the machines where ``auto`` picks the faster resize."""
    cores = os.cpu_count() or 1
    return cores >= PROCESS_MIN_CORES or gpu_compute_capability() is not None


def run_resize(config: ExtractConfig, decode: str | None = None) -> str:
    """The resize method of a run, resolved (never ``auto``)."""
    decode = decode or resolve_decode(config)
    fast = config.resize == "auto" and decode not in GPU_DECODERS and decoding_is_the_limit()
    return resolve_resize(config.resize, decode, fast)


def check_decoder(decode: str, resize: str) -> None:
    """GPU decoding: the library, a GPU and a backend that takes DLPack arrays, or one clear line."""
    if decode not in GPU_DECODERS:
        return
    from .images.gpu_decode import check_gpu_decoding

    if resize != GPU_RESIZE:
        raise FeatcacheError(f"--decode {decode} resizes on the GPU ({GPU_RESIZE}); leave --resize out or pass "
                             f"--resize {GPU_RESIZE} (not {resize})")
    check_gpu_decoding(decode)


def key_spec(config: ExtractConfig) -> KeySpec:
    """The cache key fields of a run (no I/O beyond hashing a local weights file)."""
    backbone = get_backbone(config.base)
    if config.pooling not in POOLINGS:
        raise FeatcacheError(f"unknown pooling {config.pooling!r}; choose from {', '.join(POOLINGS)}")
    if config.dtype not in STORAGE_DTYPES:
        raise FeatcacheError(f"unknown storage dtype {config.dtype!r}; choose from {', '.join(STORAGE_DTYPES)}")
    size = config.size or backbone.default_size
    check_size(backbone, size)
    return KeySpec(
        backbone=backbone.name,
        weights=resolve_weights(backbone, config.weights, config.seed, size).identity,
        input_size=size,
        resize=run_resize(config),
        preprocessing=backbone.preprocessing,
        layer=config.layer or "output",
        pooling=config.pooling,
        dtype=config.dtype,
        precision=resolve_precision(config.precision, backbone),
        augment=_augment_field(config),
    )


def _augment_field(config: ExtractConfig) -> str:
    if not config.augment:
        return "none"
    from .images.augment import DEFAULT_STRENGTHS, augment_key

    if config.augment < 0:
        raise FeatcacheError(f"--augment {config.augment}: must be 0 (none) or more views")
    return augment_key(dict(DEFAULT_STRENGTHS), config.aug_seed, config.augment)


def listing_attrs(listing: Listing, config: ExtractConfig, image_dir: str) -> dict:
    """Feature-set attributes that describe the listing a run saw (not part of the key)."""
    backbone = get_backbone(config.base)
    return {
        "split_source": listing.split_source,
        "split_fractions": list(config.split_fractions),
        "split_seed": config.split_seed,
        "image_root": os.path.abspath(image_dir),
        # The key holds only the weights' hash; stage two needs the argument to rebuild the base.
        "weights_arg": resolve_weights(backbone, config.weights, config.seed).arg,
    }


def resolve_run(image_dir: str, config: ExtractConfig, stat_files: bool = False):
    """What every extraction run (plain or augmented) settles before it touches the store:
    (decode, key spec, backbone, input size, listing), the decoder checked against the resize.
    ``stat_files``: the listing also holds each file's stat (see discover)."""
    decode = resolve_decode(config)
    spec = key_spec(config)
    check_decoder(decode, spec.resize)
    listing = discover(image_dir, config.split_fractions, config.split_seed, config.follow_symlinks, config.unlabeled,
                       stat_files)
    return decode, spec, get_backbone(config.base), spec.input_size, listing
