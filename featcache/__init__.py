"""featcache: cached convolutional features for fast transfer learning on images.

The public API (:mod:`featcache.api`: one function per command) and :func:`open_store` are
imported lazily, so ``import featcache`` (and the CLI's --help) never pays for TensorFlow.
``featcache.extract``, ``featcache.cache`` and ``featcache.classify`` are the three stage
packages; extraction's function is therefore ``featcache.extract_features``.
"""
from .version import __version__  # noqa: E402

__all__ = ["__version__", "FeatcacheError", "open_store", "extract_features", "info", "verify", "repair", "merge",
           "bases", "train", "compare", "search", "report", "predict", "export", "finetune", "ensemble", "upgrade", "audit", "similar", "demo"]

from .errors import FeatcacheError  # noqa: E402  (light: no third-party imports)

_SUBPACKAGES = ("extract", "cache", "classify")


def __getattr__(name):
    import importlib

    if name == "open_store":
        from .cache.store import open_store

        return open_store
    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__) | set(_SUBPACKAGES))
