"""Weights sources and their identity in the cache key.

``imagenet``: Keras' own file (downloaded once into ~/.keras/models, or placed there by
hand), identified by Keras' file name and hash. A path: a local .h5/.weights.h5 file,
identified by the sha256 of its bytes. ``none``: random init, seeded so that the cached
numbers are reproducible. Offline without the file there is a clear error, never a
silent fall-back to random weights.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ...errors import FeatcacheError
from .backbones import Backbone, imagenet_weights_file


@dataclass(frozen=True)
class WeightsSource:
    keras_arg: str | None  # what the keras.applications constructor gets
    identity: str  # what the cache key records
    bundled: bool = False  # the file shipped in the package

    @property
    def arg(self) -> str:
        """What a later stage passes back to resolve_weights (recorded as weights_arg): "bundled",
        not the path, since the package may be installed elsewhere when the run is reused."""
        return "bundled" if self.bundled else (self.keras_arg or "none")


def sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def keras_models_dir() -> str:
    """Where Keras keeps downloaded weights ($KERAS_HOME/models, default ~/.keras/models)."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def resolve_weights(backbone: Backbone, weights: str | None, seed: int = 0, size: int | None = None) -> WeightsSource:
    """Where the weights come from and what the cache key calls them (no model is built)."""
    if backbone.constructor is None:  # pixels: no network, nothing to load
        return WeightsSource(None, "none")
    if weights is None or str(weights).lower() in ("none", "random"):
        return WeightsSource(None, f"random:seed={seed}")
    if weights == "imagenet":
        file, file_hash = imagenet_weights_file(backbone, size or backbone.default_size)
        return WeightsSource("imagenet", f"imagenet:{file}:{file_hash}")
    if weights == "bundled":  # the file shipped in the package, checksum-verified
        from .bundled import bundled_weights_path

        path, digest = bundled_weights_path(backbone.name)
        return WeightsSource(path, f"sha256:{digest}", bundled=True)
    path = os.fspath(weights)
    if not os.path.isfile(path):
        raise FeatcacheError(
            f"{path}: weights file not found (use --weights imagenet, --weights none, or a path to a .h5 file)"
        )
    try:
        digest = sha256_file(path)
    except OSError as exc:
        raise FeatcacheError(f"{path}: cannot read weights file ({exc.strerror})") from None
    return WeightsSource(os.path.abspath(path), f"sha256:{digest}")


def weights_load_error(backbone: Backbone, source: WeightsSource, exc: Exception) -> FeatcacheError:
    """The message for a base whose weights could not be loaded: says what to do."""
    if source.keras_arg == "imagenet":
        file = source.identity.split(":")[1]
        target = os.path.join(keras_models_dir(), file if file != "None" else "<keras weights file>")
        return FeatcacheError(
            f"cannot get ImageNet weights for {backbone.name} ({exc.__class__.__name__}: {str(exc)[:200]}). "
            f"Without network, copy the file to {target}, or pass --weights PATH to a local .h5 file, "
            f"or --weights none for random init"
        )
    return FeatcacheError(
        f"{source.keras_arg}: cannot load as {backbone.name} weights ({exc.__class__.__name__}: {str(exc)[:300]})"
    )
