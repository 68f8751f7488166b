"""Silence TensorFlow's start-up notices on the command line.

TensorFlow's C++ side prints notices (oneDNN, absl) while it is imported, before its
logging is configured, so TF_CPP_MIN_LOG_LEVEL cannot hide them. The CLI installs this
import hook: the first ``import tensorflow`` runs with file descriptor 2 pointed at
/dev/null, and is restored right after, so errors and progress bars still show. The
library itself never does this at import; it uses :func:`stderr_to_devnull` only around the
TensorFlow Lite converter and interpreter set-up, whose C++ diagnostics (tens of KB for one
unsupported op, a delegate notice per interpreter) it reports itself.
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import sys


@contextlib.contextmanager
def stderr_to_devnull():
    """File descriptor 2 to /dev/null for the block: C++ libraries write there directly."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietTensorFlowImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)  # one-shot: find the real spec, wrap its loader once
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def quiet_exec_module(module):
            with stderr_to_devnull():
                exec_module(module)

        spec.loader.exec_module = quiet_exec_module
        return spec


def install() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
