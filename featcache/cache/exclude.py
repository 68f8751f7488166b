"""Rows left out on purpose (``train/compare/search/ensemble --exclude FILE``): a set of
relative image paths that :meth:`FeatureSet.rows` drops while a command runs inside
:func:`excluding`. ``featcache audit`` writes such a file (exclude.txt); runs record what they
excluded and read their rows the same way later (reports, ensembles)."""
from __future__ import annotations

import contextlib
import contextvars

from ..errors import FeatcacheError

_EXCLUDED: contextvars.ContextVar[frozenset] = contextvars.ContextVar("featcache_excluded", default=frozenset())


@contextlib.contextmanager
def excluding(paths):
    """Within this block, rows whose relative path is in ``paths`` are not part of any feature set."""
    token = _EXCLUDED.set(_EXCLUDED.get() | frozenset(paths))
    try:
        yield
    finally:
        _EXCLUDED.reset(token)


def excluded_paths() -> frozenset:
    return _EXCLUDED.get()


def read_exclude(path: str) -> list[str]:
    """The relative paths of an exclude file: one a line; blank lines and # comments skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except OSError as exc:
        raise FeatcacheError(f"--exclude {path}: cannot read ({exc.strerror or exc})") from None
    return [line for line in lines if line and not line.startswith("#")]
