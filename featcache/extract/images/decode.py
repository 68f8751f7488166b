"""Robust image decoding with Pillow: every failure becomes a reason a person understands."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .claims import TWIN
from .resize import DRAFT_SUFFIX, GPU_RESIZE, check_resize, resize_array  # noqa: F401 (check_resize re-exported)

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
from ..defaults import MAX_PIXELS as DEFAULT_MAX_PIXELS
# The formats Pillow may decode: photos (JPEG includes MPO) and common web and scan formats.
# Others are never tried, whatever a file's name or first bytes say (EPS would start Ghostscript).
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "DIB", "WEBP", "TIFF")
_OPEN_LOCK = threading.Lock()


class DecodeError(Exception):
    """An image that cannot be used; the message is the reason shown to the user."""


def _os_reason(exc: OSError) -> str:
    if exc.errno == errno.EACCES or isinstance(exc, PermissionError):
        return "permission denied"
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, FileNotFoundError):
        return "file vanished (or a dangling symlink)"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not a file"
    return f"cannot read file ({exc.strerror or exc})"


def _open_regular(path: str) -> tuple[int, int]:
    """(a descriptor open for reading, the size fstat gives) of a regular file; a FIFO, socket or
    device would block or never end."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise DecodeError("not a regular file (a pipe, socket, device or folder)")
    return fd, info.st_size


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, hex. Raises DecodeError with the reason if unreadable."""
    try:
        with os.fdopen(_open_regular(path)[0], "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise DecodeError(_os_reason(exc)) from None


def read_bytes(path: str) -> bytes:
    """A file's bytes, read with plain os.read calls: no file object, whose set-up cost twice
    the read of a small image (24-31 us against 10-11 us for a 3 KB JPEG)."""
    try:
        fd, size = _open_regular(path)
        try:
            chunks, want = [], size + 1  # a byte more than fstat said: a file that grew is read to its end
            while chunk := os.read(fd, want):
                chunks.append(chunk)
                want = 1 << 20
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        finally:
            os.close(fd)
    except OSError as exc:
        raise DecodeError(_os_reason(exc)) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if img.mode.startswith("I;16"):
            top = 65535.0  # the format says 16 bits: a dark image stays dark
        elif img.mode == "F" and 0.0 <= top <= 1.0:
            top = 1.0  # float images in [0, 1]
        else:
            top = 255.0 if top <= 255 else 65535.0 if top <= 65535 else top
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _looks_like_text(data: bytes) -> bool:
    head = data[:512]
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c >= 32 or c in b"\t\n\r\f" for c in head)


def _open_header(data: bytes) -> Image.Image:
    """Image.open reads only the header. Pillow's own bomb limit is lifted for this call:
    --max-pixels is the one limit, checked right after, still before any pixel is decoded."""
    with _OPEN_LOCK:  # MAX_IMAGE_PIXELS is a module global; decoding threads share it
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(io.BytesIO(data), formats=FORMATS)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode(data: bytes, max_pixels: int, draft: int | None, finish):
    """Open image bytes as RGB (first frame, EXIF orientation applied) and return
    ``finish(image)``; every failure, in ``finish`` too (Pillow decodes lazily), becomes a
    DecodeError with a readable reason. ``draft``: let libjpeg downscale by DCT to at least
    this side first."""
    if not data:
        raise DecodeError("empty file (0 bytes)")
    fmt = "image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb/EXIF warnings: we report instead
            img = _open_header(data)
            fmt = img.format or fmt
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                    f"{max_pixels:,} (--max-pixels); refused before decoding"
                )
            if draft and img.format == "JPEG":
                img.draft("RGB", (draft, draft))  # DCT-domain downscale, never below draft
            img.seek(0)  # animated images: the first frame
            img = ImageOps.exif_transpose(img)
            return finish(_to_rgb(img))
    except DecodeError:
        raise
    except UnidentifiedImageError:
        if _looks_like_text(data):
            raise DecodeError("not an image (a text file)") from None
        raise DecodeError("not an image (unknown format or corrupt header)") from None
    except (OSError, SyntaxError, EOFError) as exc:
        text = str(exc)
        if isinstance(exc, EOFError) or "truncated" in text.lower():
            raise DecodeError(f"truncated image data ({fmt} file ends early)") from None
        raise DecodeError(f"corrupt {fmt} data ({text or exc.__class__.__name__})") from None
    except Exception as exc:  # anything a decoder trips over in a broken file: report, never stop the run
        raise DecodeError(f"cannot decode {fmt} ({exc.__class__.__name__}: {exc})") from None


def decode_image(data: bytes, size: int, resize: str = "bilinear", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a (size, size, 3) uint8 array, EXIF orientation applied.

    Raises DecodeError with a readable reason for anything that is not a usable image.
    """
    if resize == GPU_RESIZE:  # the GPU path's own filter, for the files it leaves to the CPU
        return _decode(data, max_pixels, None, lambda img: resize_array(np.asarray(img, dtype=np.uint8), size))
    method = RESAMPLING[resize.removesuffix(DRAFT_SUFFIX)]
    return _decode(data, max_pixels, size if resize.endswith(DRAFT_SUFFIX) else None,
                   lambda img: np.asarray(img.resize((size, size), method), dtype=np.uint8))


def thumbnail_image(data: bytes, side: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """An RGB thumbnail whose longer side is at most ``side``, aspect kept, EXIF orientation
    applied (what a person saw in a viewer). DecodeError with the reason otherwise."""

    def shrink(img):
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        return img

    return _decode(data, max_pixels, side, shrink)


def decode_file_hashed(path: str, size: int, resize: str = "bilinear", max_pixels: int = DEFAULT_MAX_PIXELS,
                       claims=None):
    """``(image, None, sha256)``, ``(None, reason, sha256)`` or, unreadable, ``(None, reason,
    None)``: :func:`decode_file` that hashes the bytes it decodes (one read per file).
    ``claims`` (:mod:`.claims`): bytes another file of the run has claimed are not decoded,
    ``(None, TWIN, sha256)``."""
    try:
        data = read_bytes(path)
    except DecodeError as exc:
        return None, str(exc), None
    digest = hashlib.sha256(data).hexdigest()
    if claims is not None and not claims.claim(digest):
        return None, TWIN, digest
    try:
        return decode_image(data, size, resize, max_pixels), None, digest
    except DecodeError as exc:
        return None, str(exc), digest


def decode_file(path: str, size: int, resize: str = "bilinear", max_pixels: int = DEFAULT_MAX_PIXELS):
    """``(image, None)`` or ``(None, reason)``: :func:`decode_image` of a file, in a form a
    decoding worker process can send back (no exception crosses the process boundary)."""
    try:
        return decode_image(read_bytes(path), size, resize, max_pixels), None
    except DecodeError as exc:
        return None, str(exc)
