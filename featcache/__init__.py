"""featcache: cached convolutional features for fast transfer learning on images.

The public API is imported lazily so that ``import featcache`` (and the CLI's --help)
never pays for TensorFlow.
"""
__version__ = "0.1.0"

__all__ = ["__version__", "extract", "open_store"]


def __getattr__(name):
    if name == "extract":
        from .extract.pipeline import extract

        return extract
    if name == "open_store":
        from .cache.store import open_store

        return open_store
    raise AttributeError(f"module 'featcache' has no attribute {name!r}")
