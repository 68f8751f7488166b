"""The weights that ship inside the package: ``--weights bundled``.

The official Keras MobileNet (alpha 0.25) no-top ImageNet file (2.1 MB, Apache-2.0), so the
demo and a first extraction work on a machine with no network. Its sha256 is pinned here and
checked before every use: a missing or altered file is a clear error, never other numbers
under the same name. Its identity in the cache key is the sha256 of the file, exactly as for
``--weights PATH`` pointing at the same bytes.
"""
from __future__ import annotations

import hashlib
import os
from importlib import resources

from ...errors import FeatcacheError

BUNDLED = "bundled"  # the --weights value
BUNDLED_BASE = "mobilenet_0.25"  # the only base these weights fit
BUNDLED_FILE = "mobilenet_2_5_224_tf_no_top.h5"  # the name Keras itself downloads
BUNDLED_SHA256 = "dbdb03ee2a22fd895301636cd328b234bb3a9952358f436d82f46b81e0d5b0bf"


def bundled_weights_file() -> str:
    """Where the package keeps the file (it may be missing from a broken install)."""
    return os.fspath(resources.files("featcache") / "data" / BUNDLED_FILE)


def bundled_weights_path(base: str = BUNDLED_BASE, path: str | None = None) -> tuple[str, str]:
    """(path, sha256) of the bundled weights, verified; FeatcacheError otherwise.

    ``path`` overrides the package location (for tests of the checksum refusal).
    """
    if base != BUNDLED_BASE:
        raise FeatcacheError(
            f"--weights {BUNDLED}: the bundled weights are for base {BUNDLED_BASE!r}, not {base!r} "
            "(use --base mobilenet_0.25, or --weights imagenet / a path to a .h5 file)"
        )
    path = path or bundled_weights_file()
    try:
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        raise FeatcacheError(
            f"{path}: the bundled weights file is missing; reinstall featcache "
            "(pip install --force-reinstall featcache) or pass --weights PATH"
        ) from None
    except OSError as exc:
        raise FeatcacheError(f"{path}: cannot read the bundled weights file ({exc.strerror})") from None
    if digest != BUNDLED_SHA256:
        raise FeatcacheError(
            f"{path}: the bundled weights file was altered (sha256 {digest[:16]}..., expected "
            f"{BUNDLED_SHA256[:16]}...); reinstall featcache or pass --weights PATH"
        )
    return os.path.abspath(path), digest
