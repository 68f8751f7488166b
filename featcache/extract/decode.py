"""Robust image decoding with Pillow: every failure becomes a reason a person understands."""
from __future__ import annotations

import errno
import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

RESAMPLING = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
DRAFT_SUFFIX = "+jpeg-draft"  # resize names ending in this let libjpeg downscale by DCT first
DEFAULT_MAX_PIXELS = 100_000_000


class DecodeError(Exception):
    """An image that cannot be used; the message is the reason shown to the user."""


def check_resize(resize: str) -> None:
    from ..errors import FeatcacheError

    if resize.removesuffix(DRAFT_SUFFIX) not in RESAMPLING:
        choices = ", ".join(list(RESAMPLING) + [f"bilinear{DRAFT_SUFFIX}"])
        raise FeatcacheError(f"unknown resize method {resize!r}; choose from {choices}")


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


def file_digest(path: str) -> str:
    """sha256 of a file's bytes, hex. Raises DecodeError with the reason if unreadable."""
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        raise DecodeError(_os_reason(exc)) from None


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DecodeError(_os_reason(exc)) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), alpha composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr * (255.0 / top), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(data: bytes, size: int, resize: str = "bilinear", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode image bytes to a (size, size, 3) uint8 array, EXIF orientation applied.

    Raises DecodeError with a readable reason for anything that is not a usable image.
    """
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own bomb/EXIF warnings: we report instead
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise DecodeError(
                    f"image is {width}x{height} = {width * height:,} pixels, above the limit of "
                    f"{max_pixels:,} (--max-pixels); refused before decoding"
                )
            if resize.endswith(DRAFT_SUFFIX) and img.format == "JPEG":
                img.draft("RGB", (size, size))  # DCT-domain downscale, never below size
            img.seek(0)  # animated images: the first frame
            img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
            img = img.resize((size, size), RESAMPLING[resize.removesuffix(DRAFT_SUFFIX)])
            return np.asarray(img, dtype=np.uint8)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image Pillow can read (unknown format or corrupt header)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        text = str(exc)
        if "truncated" in text.lower():
            raise DecodeError(f"truncated image data ({text})") from None
        raise DecodeError(f"corrupt image data ({exc.__class__.__name__}: {text})") from None
