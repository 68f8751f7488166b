"""featcache's Python API: one function per command.

Each function takes the command's options as keyword arguments, with the same names (dashes
become underscores) and the same defaults as the command line, and returns the dict that the
command's ``--json`` prints. Errors raise :class:`featcache.FeatcacheError`, whose message is the
one line the command prints after ``error:``. Options that only shape the command's own output
(``--json``, ``--no-progress`` as ``progress``, ``--strict``'s exit status) are the CLI's.

Usage::

    import featcache
    result = featcache.extract_features("images/", "features.h5", base="mobilenet_0.25", weights="bundled")
    run = featcache.train("features.h5", out="runs/dense", head="dense", pool="avg")

The heavy stages (TensorFlow, scikit-learn) are imported inside the functions, so importing
this module is instant."""
from __future__ import annotations

from ..errors import FeatcacheError
from ..classify.rows import DEFAULT_MEMORY_BUDGET_MB  # noqa: F401  (the CLI's --memory-budget default)
from .heads import compare, ensemble, finetune, report, search, train
from .models import audit, demo, export, predict, similar, upgrade
from .store import bases, extract_features, info, merge, repair, verify

__all__ = ["extract_features", "info", "verify", "repair", "merge", "bases", "train", "compare", "search", "report",
           "predict", "export", "finetune", "ensemble", "upgrade", "audit", "similar", "demo", "FeatcacheError"]
