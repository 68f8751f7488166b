"""Opening HDF5 files the way the store needs: SWMR-capable, crash-recoverable, failing clearly.

Why SWMR: a writer in SWMR mode keeps the file's metadata consistent on disk after every
flush (HDF5 orders its metadata writes for that), so a reader can open the file while it is
being appended to, and a writer killed with SIGKILL leaves a readable file.

The catch: SWMR marks the superblock "open for write"; after a crash HDF5 refuses to open
the file for writing again until the mark is cleared (the ``h5clear -s`` tool does this).
h5py has no wrapper for it, so :func:`clear_stale_write_flag` sets the same file-access
property h5clear sets, through ctypes on h5py's own libhdf5. It is called only while the
store's writer lock is held, so the mark is known to be stale.

Damage: a SWMR reader retries a metadata read whose checksum fails, since a live writer may be
rewriting that piece; HDF5's default is 100 attempts with a back-off that doubles from 1 ns
without a cap (measured: 32 attempts wait 4 s, 36 wait 69 s), so one damaged header made a
reader sleep for hours. Readers here allow METADATA_READ_ATTEMPTS (about 0.3 s of back-off in
all; a writer's rewrite of one piece of metadata takes microseconds). A SWMR reader also skips
HDF5's check that the file is as long as its superblock says, and would read the missing end
of a truncated file as zeros: :func:`open_for_read` checks that itself.

Why :func:`reserve_space`: HDF5 does not survive a failed write (a full disk, a file size
limit). The error surfaces later, from a flush or from freeing an object, and the library
can then crash the process (seen here: a segfault in the next flush). So the writer reserves
disk blocks past the end of the file's allocated space *before* HDF5 writes there; when the
reservation fails, nothing has been written yet and the writer stops cleanly.
"""
from __future__ import annotations

import ctypes
import errno
import functools
import glob
import os
import re

import filelock
import h5py

from ..errors import FeatcacheError
from .damage import READ_ERRORS, StoreDamaged, reason

METADATA_READ_ATTEMPTS = 28  # back-off 2**28 ns in all (~0.27 s); HDF5's SWMR default is 100
SIGNATURE = b"\x89HDF\r\n\x1a\n"
RESERVE_MARGIN = 1 << 20  # metadata a batch may add beyond its chunks (B-tree nodes, heaps, headers)
_STALE_FLAG = ("h5clear", "not already open for SWMR writing")  # HDF5's words for a left-over write mark

# errno -> what a person is told about a write that could not happen.
SPACE_ERRORS = {
    errno.ENOSPC: "no space left on device",
    errno.EFBIG: "file size limit exceeded",
    errno.EDQUOT: "disk quota exceeded",
}


class StoreWriteError(FeatcacheError):
    """Writing the store failed (no space, size limit, I/O error); ``reason`` says why.

    Raised before anything of the failed batch counts: committed rows are intact."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason} while writing")
        self.path, self.reason = path, reason


@functools.lru_cache(maxsize=1)
def _libhdf5():
    """h5py's bundled libhdf5 (wheels), else the system one h5py links against."""
    libdir = os.path.join(os.path.dirname(h5py.__file__), os.pardir, "h5py.libs")
    candidates = [p for p in glob.glob(os.path.join(libdir, "libhdf5-*")) if "_hl" not in p]
    lib = ctypes.CDLL(candidates[0] if candidates else "libhdf5.so")
    lib.H5Pset.argtypes = [ctypes.c_int64, ctypes.c_char_p, ctypes.c_void_p]
    lib.H5Pset.restype = ctypes.c_int
    lib.H5Fget_eoa.argtypes = [ctypes.c_int64, ctypes.POINTER(ctypes.c_uint64)]
    lib.H5Fget_eoa.restype = ctypes.c_int
    lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
    lib.H5Pset_metadata_read_attempts.restype = ctypes.c_int
    lib.H5Pset_link_phase_change.argtypes = [ctypes.c_int64, ctypes.c_uint, ctypes.c_uint]
    lib.H5Pset_link_phase_change.restype = ctypes.c_int
    return lib


def end_of_allocation(file: h5py.File) -> int:
    """HDF5's end-of-allocation address: where it puts new data. (h5py's get_filesize gives
    max(EOA, EOF), which is the file's length once space past the EOA is reserved.)"""
    eoa = ctypes.c_uint64()
    if _libhdf5().H5Fget_eoa(file.id.id, ctypes.byref(eoa)) < 0:
        raise OSError(f"{file.filename}: H5Fget_eoa failed")
    return eoa.value


def h5_errno(exc: BaseException) -> int | None:
    """The errno behind an h5py error: h5py sets it for opens, HDF5 writes it into the text otherwise."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    match = re.search(r"errno = (\d+)", str(exc))
    return int(match.group(1)) if match else None


def os_reason(exc: BaseException) -> str:
    """A short, stable reason for a failed file operation (no HDF5 internals)."""
    code = h5_errno(exc)
    if code in SPACE_ERRORS:
        return SPACE_ERRORS[code]
    if code is not None:
        return os.strerror(code).lower()
    text = str(exc).split(" (", 1)[-1].rstrip(")") if "(" in str(exc) else str(exc)
    return text or exc.__class__.__name__


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
    try:
        h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR, fapl=fapl).close()
    except (OSError, RuntimeError) as exc:
        raise FeatcacheError(
            f"{path}: left marked open by a killed writer and cannot be repaired ({os_reason(exc)}); "
            f"run featcache extract on it with write permission, or h5clear -s {path}"
        ) from None


def _is_stale_flag(exc: BaseException) -> bool:
    return any(words in str(exc) for words in _STALE_FLAG)


def check_is_hdf5(path: str) -> None:
    """Refuse a file that exists but is not HDF5 (never overwrite someone's data)."""
    if not os.path.exists(path) or os.path.isdir(path):
        if os.path.isdir(path):
            raise FeatcacheError(f"{path}: is a folder, not a store file")
        return
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as exc:
        raise FeatcacheError(f"{path}: cannot read the store ({os_reason(exc)})") from None
    if head == SIGNATURE:
        return  # HDF5, whatever state the rest is in
    if head and SIGNATURE.startswith(head):
        raise StoreDamaged(path, "file", f"truncated: it holds {len(head)} bytes")
    if head and not h5py.is_hdf5(path):  # (HDF5 may also start after a user block)
        raise FeatcacheError(f"{path}: not an HDF5 file (refusing to touch it; choose another store path)")


def _create_atomically(path: str) -> None:
    """A new, empty store appears under its name complete or not at all (a kill leaves no half file)."""
    tmp = f"{path}.creating"
    try:
        h5py.File(tmp, "w", libver="latest", locking=False).close()
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise FeatcacheError(f"{path}: cannot create the store ({os_reason(exc)})") from None


def open_for_write(path: str) -> h5py.File:
    """Open or create ``path`` for writing. The caller must hold the store's writer lock."""
    check_is_hdf5(path)
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        _create_atomically(path)
    for attempt in range(2):
        try:
            return h5py.File(path, "a", libver="latest", locking=False)
        except OSError as exc:
            if attempt == 0 and _is_stale_flag(exc):
                clear_stale_write_flag(path)  # we hold the lock: the writer that set it is gone
                continue
            raise FeatcacheError(f"{path}: cannot open the store for writing ({os_reason(exc)})") from None
    raise AssertionError("unreachable")


def _clear_if_no_writer(path: str) -> bool:
    """For a reader: clear a stale write mark if no featcache writer holds the lock. True if cleared."""
    lock = filelock.FileLock(path + ".lock", timeout=0)  # the writer lock (store.writer_lock)
    try:
        lock.acquire()
    except (filelock.Timeout, OSError):
        return False  # a writer is running (setting the store up), or we may not take the lock
    try:
        clear_stale_write_flag(path)
        return True
    except FeatcacheError:
        return False
    finally:
        lock.release()


def open_swmr(path: str, attempts: int = METADATA_READ_ATTEMPTS) -> h5py.File:
    """``h5py.File(path, "r", swmr=True)`` with few metadata read attempts (see the module doc;
    1 where no writer can be running: then a checksum that fails is damage)."""
    fapl = _latest_fapl()
    if _libhdf5().H5Pset_metadata_read_attempts(fapl.id, attempts) < 0:
        raise FeatcacheError(f"{path}: could not set HDF5's metadata read attempts")
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY | h5py.h5f.ACC_SWMR_READ, fapl=fapl)
    return h5py.File(fid)


def writer_running(path: str) -> bool:
    """True if a featcache writer holds the store's lock. False when the lock cannot be taken
    for another reason (a read-only folder): no featcache writer can write there either."""
    lock = filelock.FileLock(path + ".lock", timeout=0)  # the writer lock (layout.writer_lock)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def marked_open_for_write(path: str) -> bool:
    """The superblock's status flags say a writer has the file open (or was killed with it
    open). Superblock versions 2 and 3 (what libver="latest" writes) keep them in byte 11."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return False
    return len(head) == 12 and head[:8] == SIGNATURE and head[8] in (2, 3) and head[11] != 0


def left_by_killed_writer(path: str, lock_held: bool = False) -> bool:
    """Marked open for writing while no writer runs (``lock_held``: the caller is the writer)."""
    return marked_open_for_write(path) and (lock_held or not writer_running(path))


def check_length(file: h5py.File, path: str, writer_possible: bool = True) -> None:
    """StoreDamaged if the file is shorter than HDF5's end of allocation, unless a writer is
    running (it may have allocated space it has not written yet: normally it reserves that
    space on disk first, see reserve_space, but not on file systems that cannot)."""
    eoa = end_of_allocation(file)
    size = os.path.getsize(path)
    if size < eoa and not (writer_possible and writer_running(path)):
        raise StoreDamaged(path, "file", f"truncated: it holds {size} of its {eoa} bytes")


def open_for_read(path: str, lock_held: bool = False, attempts: int = METADATA_READ_ATTEMPTS,
                  truncated_ok: bool = False) -> h5py.File:
    """Open ``path`` for reading; safe while a featcache writer appends to it (SWMR).

    ``lock_held``: the caller holds the writer lock, so a write mark found is stale.
    A damaged or truncated file raises StoreDamaged (``truncated_ok``: not for truncation;
    what lies past the end then reads as zeros, which fails the checksums)."""
    if not os.path.exists(path):
        raise FeatcacheError(f"{path}: no such store")
    check_is_hdf5(path)
    if os.path.getsize(path) == 0:
        raise StoreDamaged(path, "file", "empty (0 bytes)")
    for attempt in range(2):
        try:
            file = open_swmr(path, attempts)
            break
        except OSError as exc:
            if attempt == 0 and _is_stale_flag(exc):
                if lock_held:
                    clear_stale_write_flag(path)
                    continue
                if _clear_if_no_writer(path):
                    continue
            if _is_stale_flag(exc):
                raise FeatcacheError(
                    f"{path}: a featcache run is setting the store up (or was killed doing so); "
                    "try again in a moment, or run featcache extract on it to repair it"
                ) from None
            if h5_errno(exc) is not None:
                raise FeatcacheError(f"{path}: cannot read the store ({os_reason(exc)})") from None
            raise StoreDamaged(path, "file metadata", reason(exc)) from None
        except READ_ERRORS as exc:
            raise StoreDamaged(path, "file metadata", reason(exc)) from None
    else:
        raise AssertionError("unreachable")
    try:
        if not truncated_ok:
            check_length(file, path, writer_possible=not lock_held)
    except BaseException:
        file.close()
        raise
    return file


def create_compact_group(parent: h5py.Group, name: str, max_links: int, max_attrs: int) -> h5py.Group:
    """A new group whose links and attributes stay in its object header, where HDF5 checksums
    them (up to ``max_links`` links and ``max_attrs`` attributes; HDF5 moves larger ones out)."""
    gcpl = h5py.h5p.create(h5py.h5p.GROUP_CREATE)
    if _libhdf5().H5Pset_link_phase_change(gcpl.id, max_links, min(max_links, 8)) < 0:
        raise RuntimeError("H5Pset_link_phase_change failed")
    gcpl.set_attr_phase_change(max_attrs, min(max_attrs, 6))
    return h5py.Group(h5py.h5g.create(parent.id, name.encode(), gcpl=gcpl))


def reserve_space(file: h5py.File, fd: int, nbytes: int) -> None:
    """Make sure ``nbytes`` of disk blocks exist past the end of HDF5's allocated space.

    HDF5 allocates new space at its end-of-allocation (EOA), so a reservation there makes the
    next writes land in blocks the file system already gave us. Raises StoreWriteError when
    the space cannot be had; then HDF5 has not been asked to write anything."""
    eoa = end_of_allocation(file)
    if os.fstat(fd).st_size - eoa >= nbytes:
        return
    try:
        os.posix_fallocate(fd, eoa, nbytes)
    except OSError as exc:
        if exc.errno in SPACE_ERRORS:
            raise StoreWriteError(file.filename, SPACE_ERRORS[exc.errno]) from None
        if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            return  # a file system that cannot reserve: write without the safety net
        raise StoreWriteError(file.filename, os_reason(exc)) from None


def trim_reserved(path: str) -> None:
    """Give back reserved blocks past the store's end once the writer has closed it."""
    try:
        with open_swmr(path) as f:
            eoa = end_of_allocation(f)
        if os.path.getsize(path) > eoa:
            os.truncate(path, eoa)
    except (OSError, RuntimeError):
        pass  # only disk space is at stake; the next writer's close trims it
