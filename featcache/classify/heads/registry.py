"""The head registry: every kind of head by its ``--head`` name."""
from __future__ import annotations

from ...errors import FeatcacheError
from .base import Head
from .dense import DenseHead
from .knn import KNNHead
from .logreg import LogRegHead

HEADS: dict[str, type[Head]] = {"dense": DenseHead, "logreg": LogRegHead, "knn": KNNHead}


def make_head(name: str, **options) -> Head:
    if name not in HEADS:
        raise FeatcacheError(f"--head {name!r}: choose from {', '.join(HEADS)}")
    return HEADS[name](**options)
