"""Clean stops: SIGINT/SIGTERM, a full disk or a dead decoding process end a run with what is committed."""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import threading

from ..cache.hdf5 import StoreWriteError
from ..cache.key import KeySpec
from ..cache.store import open_store
from ..errors import FeatcacheError
from .config import ExtractConfig, key_spec
from .images.feeder import DecoderDied


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped an extraction; what was committed stays. ``exit_status``: 128 + signal."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_status = 128 + signum


class StopSignals:
    """SIGINT/SIGTERM during an extraction in the main thread raise :class:`Interrupted`, but
    never inside a critical section (store set-up, appending and committing a batch): there
    the signal waits until the section is done, so the store is never left half-written."""

    def __init__(self):
        self.depth, self.pending, self.saved = 0, None, {}

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread() or self.saved:
            return False  # signal handlers belong to the main thread (and one run at a time)
        self.depth, self.pending = 0, None
        self.saved = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return True

    def restore(self) -> None:
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)
        self.saved = {}

    def _handle(self, signum, frame):
        if self.pending is not None:
            return  # already stopping
        self.pending = signum
        if not self.depth:
            raise Interrupted(signum)

    @contextlib.contextmanager
    def critical(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            raise Interrupted(self.pending)


SIGNALS = StopSignals()


def images_committed(store: str, spec: KeySpec) -> int:
    """Images of the current listing committed for ``spec`` (0 if the store cannot be read)."""
    try:
        with open_store(store) as s:
            fs = s.find(spec)
            return 0 if fs is None else len(fs.rows())
    except FeatcacheError:
        return 0


def stops_cleanly(func):
    """A signal, a full disk or a dead decoding process ends a run cleanly: the committed rows
    stay, and the message says how many and how to go on."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        arguments = inspect.signature(func).bind(*args, **kwargs).arguments

        def committed() -> tuple[str, int]:
            config = arguments.get("config") or ExtractConfig(**arguments.get("options", {}))
            store = os.fspath(arguments["store"])
            return store, images_committed(store, key_spec(config))

        installed = SIGNALS.install()
        try:
            return func(*args, **kwargs)
        except Interrupted as exc:
            store, n = committed()
            raise Interrupted(
                exc.signum, f"interrupted: {n} images committed to {store}; run the same command again to resume"
            ) from None
        except StoreWriteError as exc:
            store, n = committed()
            raise FeatcacheError(
                f"{exc.reason} while writing {store}: {n} images committed, nothing lost; "
                "make room and run the same command again to resume"
            ) from None
        except DecoderDied as exc:
            store, n = committed()
            raise FeatcacheError(
                f"{exc.reason}: {n} images committed to {store}, nothing lost; run the same command again to resume"
            ) from None
        finally:
            if installed:
                SIGNALS.restore()

    return wrapper
