"""Opening HDF5 files the way the store needs: SWMR-capable, crash-recoverable.

Why SWMR: a writer in SWMR mode keeps the file's metadata consistent on disk after every
flush (HDF5 orders its metadata writes for that), so a reader can open the file while it is
being appended to, and a writer killed with SIGKILL leaves a readable file.

The catch: SWMR marks the superblock "open for write"; after a crash HDF5 refuses to open
the file for writing again until the mark is cleared (the ``h5clear -s`` tool does this).
h5py has no wrapper for it, so :func:`clear_stale_write_flag` sets the same file-access
property h5clear sets, through ctypes on h5py's own libhdf5. It is called only while the
store's writer lock is held, so the mark is known to be stale.
"""
from __future__ import annotations

import ctypes
import functools
import glob
import os

import h5py

from ..errors import FeatcacheError


@functools.lru_cache(maxsize=1)
def _libhdf5():
    """h5py's bundled libhdf5 (wheels), else the system one h5py links against."""
    libdir = os.path.join(os.path.dirname(h5py.__file__), os.pardir, "h5py.libs")
    candidates = [p for p in glob.glob(os.path.join(libdir, "libhdf5-*")) if "_hl" not in p]
    lib = ctypes.CDLL(candidates[0] if candidates else "libhdf5.so")
    lib.H5Pset.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p]
    lib.H5Pset.restype = ctypes.c_int
    return lib


def _latest_fapl():
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_LATEST, h5py.h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, True)
    return fapl


def clear_stale_write_flag(path: str) -> None:
    """Clear the superblock's open-for-write mark left by a killed writer (h5clear -s)."""
    fapl = _latest_fapl()
    clear = ctypes.c_bool(True)
    if _libhdf5().H5Pset(fapl.id, b"clear_status_flags", ctypes.byref(clear)) < 0:
        raise FeatcacheError(f"{path}: could not clear the stale writer mark (h5clear -s {path} does it)")
    h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl).close()


def check_is_hdf5(path: str) -> None:
    if os.path.exists(path) and os.path.getsize(path) > 0 and not h5py.is_hdf5(path):
        raise FeatcacheError(f"{path}: not an HDF5 file (refusing to touch it; choose another store path)")


def open_for_write(path: str) -> h5py.File:
    """Open or create ``path`` for writing. The caller must hold the store's writer lock."""
    check_is_hdf5(path)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        clear_stale_write_flag(path)
    try:
        return h5py.File(path, "a", libver="latest", locking=False)
    except OSError as exc:
        raise FeatcacheError(f"{path}: cannot open for writing ({exc})") from None


def open_for_read(path: str) -> h5py.File:
    """Open ``path`` for reading; safe while a featcache writer appends to it (SWMR)."""
    if not os.path.exists(path):
        raise FeatcacheError(f"{path}: no such store")
    check_is_hdf5(path)
    try:
        return h5py.File(path, "r", libver="latest", swmr=True, locking=False)
    except OSError as exc:
        raise FeatcacheError(
            f"{path}: cannot read the store ({exc}); if a featcache run is setting it up, try again in a moment"
        ) from None
