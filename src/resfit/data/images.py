"""Decode any image Pillow can read into plain RGB, and say what had to change to get there.

Real folders hold more than clean RGB JPEGs: phone photos rotated by an EXIF tag, grayscale scans,
transparent PNGs, CMYK prints, 16-bit microscopy, GIFs, and the occasional empty, truncated or
absurdly large file. Every conversion is recorded as a human note so the data report can show it,
and every unusable file raises ``ImageReadError`` with a short reason instead of crashing a worker.
No Pillow globals are touched: the decompression-bomb guard here is our own ``max_pixels`` check.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import struct
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, ImageOps, UnidentifiedImageError

from resfit.errors import ImageReadError

DEFAULT_MAX_PIXELS = 89_478_485  # same as Pillow's default warning threshold
UPLOAD_LABEL = "<upload>"

# Pillow signals bad data with any of these, depending on the plugin and where the data ends.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)
# What Pillow says when it recognises a file but has no decoder for its variant (stub plugins, codecs).
_UNSUPPORTED = re.compile(
    r"unsupported|not supported|cannot find loader|no decoder|decoder \S+ not available|not installed|"
    r"unknown (?:compression|pixel format|raw mode)|unimplemented",
    re.IGNORECASE,
)
_PILLOW_DIR = os.path.dirname(os.path.abspath(Image.__file__)) + os.sep
_MAX_WARNING_NOTES = 3

_ORIENTATION_NOTES = {
    2: "mirrored left-right",
    3: "rotated 180°",
    4: "mirrored top-bottom",
    5: "transposed (mirrored across the main diagonal)",
    6: "rotated 90° clockwise",
    7: "transversed (mirrored across the anti-diagonal)",
    8: "rotated 90° counter-clockwise",
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


@dataclass(frozen=True)
class ImageCheck:
    """Whether one file can be used, and the conversions reading it will apply."""

    ok: bool
    reason: str | None  # why it cannot be used (None when ok)
    notes: tuple[str, ...]  # conversions that reading it will apply
    width: int | None = None
    height: int | None = None


def open_rgb(
    source: str | os.PathLike | bytes | BinaryIO,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    label: str = UPLOAD_LABEL,
) -> tuple[Image.Image, list[str]]:
    """Fully decoded RGB image plus a note for every conversion applied; raises ImageReadError.

    ``label`` names in-memory data (bytes or a stream) in errors: an upload, or a dataset row.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        label = os.fspath(source)
        _require_regular_nonempty_file(label)
        data = _read_bytes(label)
    else:
        data = source.read()
    if not data:
        raise ImageReadError(label, "empty file (0 bytes)")
    image, notes, _ = _decode(io.BytesIO(data), label, max_pixels, for_check=False)
    return image, notes


def check_image(
    source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, label: str = UPLOAD_LABEL
) -> ImageCheck:
    """Decode once (JPEGs at 1/8 scale, which still reads every byte) and report what open_rgb would do.

    ``source`` is a file, or an image's encoded bytes (a dataset row, named ``label``).
    """
    try:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if not source:
                raise ImageReadError(label, "empty image data (0 bytes)")
            _, notes, (width, height) = _decode(io.BytesIO(source), label, max_pixels, for_check=True)
        else:
            label = os.fspath(source)
            _require_regular_nonempty_file(label)
            with _open_file(label) as handle:
                _, notes, (width, height) = _decode(handle, label, max_pixels, for_check=True)
    except ImageReadError as error:
        width, height = error.size if isinstance(error, _SizedImageReadError) else (None, None)
        return ImageCheck(ok=False, reason=error.reason, notes=(), width=width, height=height)
    return ImageCheck(ok=True, reason=None, notes=tuple(notes), width=width, height=height)


class EncodedImages:
    """Images stored as encoded bytes inside something else (arrow tables, tar shards): a subclass says how
    to find an item's bytes (``encoded``); reading, checking and fingerprinting go through the same Pillow
    boundary as a file."""

    def encoded(self, item: str) -> bytes:
        raise NotImplementedError

    def read(self, item: str, max_pixels: int) -> tuple[Image.Image, list[str]]:
        return open_rgb(self.encoded(item), max_pixels, label=item)

    def check(self, item: str, max_pixels: int) -> ImageCheck:
        try:
            data = self.encoded(item)
        except ImageReadError as error:
            return ImageCheck(ok=False, reason=error.reason, notes=())
        return check_image(data, max_pixels, label=item)

    def digest(self, item: str) -> str:
        """blake2b of the item's encoded image: what a cached verdict about it must still match."""
        return hashlib.blake2b(self.encoded(item), digest_size=20).hexdigest()


class _SizedImageReadError(ImageReadError):
    """An ImageReadError that also knows the header size, so a scan can report it."""

    def __init__(self, path: str, reason: str, size: tuple[int, int]):
        super().__init__(path, reason)
        self.size = size


def _require_regular_nonempty_file(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageReadError(path, "file not found") from None
    except OSError as error:
        raise ImageReadError(path, f"cannot read file: {error.strerror or error}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ImageReadError(path, "not a regular file")
    if info.st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")


def _open_file(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except OSError as error:  # vanished or lost permissions since the stat
        raise ImageReadError(path, f"cannot read file: {error.strerror or error}") from None


def _read_bytes(path: str) -> bytes:
    with _open_file(path) as handle:
        try:
            return handle.read()
        except OSError as error:
            raise ImageReadError(path, f"cannot read file: {error.strerror or error}") from None


def _decode(
    fp: BinaryIO, label: str, max_pixels: int, *, for_check: bool
) -> tuple[Image.Image, list[str], tuple[int, int]]:
    """Header, size guard, one decode, EXIF orientation, RGB conversion; returns (image, notes, size)."""
    with warnings.catch_warnings(record=True) as caught:
        # Pillow's warnings about this file become its notes instead of lines on the console; our own
        # max_pixels check below replaces Pillow's global guard.
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with _pillow_boundary(label, None):
            image = _open_header(fp, label)
            width, height = image.size
        if isinstance(image, ImageFile.StubImageFile):  # WMF, HDF5, GRIB, BUFR: identified, never decoded
            raise ImageReadError(
                label, f"unsupported format: Pillow identifies {image.format} but has no decoder for it"
            )
        if width < 1 or height < 1:
            raise ImageReadError(label, f"empty image: {width}x{height} pixels")
        if width * height > max_pixels:
            reason = (
                f"too large: {width}x{height} = {width * height:,} pixels exceeds the limit of "
                f"{max_pixels:,} (decompression-bomb guard)"
            )
            raise _SizedImageReadError(label, reason, (width, height))
        notes: list[str] = []
        with _pillow_boundary(label, image.format):
            # is_animated looks one frame ahead at most; n_frames would walk every page of the file.
            several_frames = bool(getattr(image, "is_animated", False))
            orientation = _exif_orientation(image, notes)
            if for_check and image.format == "JPEG":
                image.draft(None, (1, 1))  # DCT scaling still consumes the whole stream: truncation shows
            image.load()
            if several_frames:
                notes.append("first frame used (the file holds several)")
            if orientation in _ORIENTATION_NOTES:
                notes.append(f"EXIF orientation {orientation} applied ({_ORIENTATION_NOTES[orientation]})")
                if orientation in (5, 6, 7, 8):
                    width, height = height, width
                if not for_check:
                    image = ImageOps.exif_transpose(image)
            rgb, mode_note = _to_rgb(image, label)
        if mode_note:
            notes.append(mode_note)
    said = dict.fromkeys(" ".join(str(w.message).split())[:160] for w in caught)
    notes += [f"Pillow warned: {message}" for message in list(said)[:_MAX_WARNING_NOTES]]
    return rgb, notes, (width, height)


@contextmanager
def _pillow_boundary(label: str, image_format: str | None):
    """Whatever the image library raises while reading this file is the file's problem: an ImageReadError
    with the real reason. An exception with no Pillow frame in its traceback is resfit's own and surfaces."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as error:
        if not _raised_inside_pillow(error):
            raise
        raise ImageReadError(label, _failure_reason(error, image_format)) from None


def _raised_inside_pillow(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None:
        if os.path.abspath(traceback.tb_frame.f_code.co_filename).startswith(_PILLOW_DIR):
            return True
        traceback = traceback.tb_next
    return False


def _failure_reason(error: Exception, image_format: str | None) -> str:
    """A short, true reason: too large, a format variant Pillow cannot decode, truncated data, or malformed."""
    text = str(error).strip() or type(error).__name__
    kind = f"{image_format} " if image_format else ""
    if isinstance(error, Image.DecompressionBombError):
        return f"too large: {_pixels_from_message(error)} (decompression-bomb guard)"
    if "ghostscript" in text.lower():
        return f"{kind}needs Ghostscript, which is not installed: {text}"
    if isinstance(error, NotImplementedError) or _UNSUPPORTED.search(text):
        return f"unsupported {kind}variant (this Pillow cannot decode it): {text}"
    if isinstance(error, _DECODE_ERRORS):
        return f"truncated or corrupt image data: {text}"
    return f"malformed {kind}file: {text} ({type(error).__name__})"


def _open_header(fp: BinaryIO, label: str) -> ImageFile.ImageFile:
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as error:
        # Pillow refuses beyond twice its global limit before we can apply ours; read the header anyway.
        image = _open_ignoring_pillow_guard(fp)
        if image is None:
            reason = f"too large: {_pixels_from_message(error)} (decompression-bomb guard)"
            raise ImageReadError(label, reason) from None
        return image
    except UnidentifiedImageError:
        raise ImageReadError(label, "not an image: cannot identify image file") from None


def _open_ignoring_pillow_guard(fp: BinaryIO) -> ImageFile.ImageFile | None:
    """What Image.open does, minus its global size check: the registered plugin that accepts the prefix."""
    fp.seek(0)
    prefix = fp.read(16)
    Image.init()
    for image_format in Image.ID:
        factory, accept = Image.OPEN[image_format]
        verdict = accept(prefix) if accept else True
        if isinstance(verdict, str) or not verdict:  # a str is Pillow's "almost, but no" warning
            continue
        fp.seek(0)
        try:
            return factory(fp, "")
        except _DECODE_ERRORS:
            continue
    return None


def _pixels_from_message(error: Exception) -> str:
    match = re.search(r"\((\d+) pixels\)", str(error))
    return f"{int(match.group(1)):,} pixels" if match else str(error)


def _exif_orientation(image: Image.Image, notes: list[str]) -> int:
    try:
        return int(image.getexif().get(ExifTags.Base.Orientation, 1))
    except (*_DECODE_ERRORS, TypeError, KeyError) as error:
        notes.append(f"EXIF data unreadable ({error}): orientation not applied")
        return 1


def _to_rgb(image: Image.Image, label: str) -> tuple[Image.Image, str | None]:
    """Plain 8-bit RGB, transparency flattened onto white; returns (image, note or None)."""
    mode = image.mode
    if mode.startswith("I;16"):
        # Round to nearest (v / 257): 65535 -> 255, 32768 -> 128.
        values = (np.asarray(image).astype(np.uint32) * 255 + 32767) // 65535
        return _gray_array_to_rgb(values), f"16-bit ({mode}) scaled to 8-bit RGB"
    if mode in ("I", "F"):
        return _wide_gray_to_rgb(image)
    if mode in _ALPHA_MODES or image.has_transparency_data:
        return _composite_on_white(image, label), _transparency_note(image)
    if mode == "RGB":
        return image, None
    if mode in ("1", "L"):
        return image.convert("RGB"), f"grayscale ({mode}) converted to RGB"
    if mode == "P":
        return image.convert("RGB"), "palette (P) converted to RGB"
    try:
        return image.convert("RGB"), f"{mode} converted to RGB"
    except ValueError:
        raise ImageReadError(label, f"unsupported colour mode {mode}") from None


def _transparency_note(image: Image.Image) -> str:
    if image.mode in _ALPHA_MODES:
        return f"{image.mode} composited on white"
    kind = {"P": "palette (P)", "L": "grayscale (L)", "1": "grayscale (1)"}.get(image.mode, image.mode)
    return f"{kind} with transparency composited on white"


def _composite_on_white(image: Image.Image, label: str) -> Image.Image:
    try:
        rgba = image.convert("RGBA")
    except ValueError:
        raise ImageReadError(label, f"unsupported colour mode {image.mode}") from None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _wide_gray_to_rgb(image: Image.Image) -> tuple[Image.Image, str]:
    """32-bit int or float gray: use the smallest standard range that holds the values, else stretch."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    kind = "32-bit integer (I)" if image.mode == "I" else "32-bit float (F)"
    if image.mode == "F" and low >= 0 and high <= 1:
        scaled, how = values * 255, "values in [0, 1] scaled"
    elif low >= 0 and high <= 255:
        scaled, how = values, "8-bit values copied"
    elif low >= 0 and high <= 65535:
        scaled, how = values * 255 / 65535, "16-bit values scaled"
    else:
        span = high - low or 1.0
        scaled, how = (values - low) * 255 / span, f"values stretched from [{low:g}, {high:g}]"
    return _gray_array_to_rgb(np.rint(scaled)), f"{kind} {how} to 8-bit RGB"


def _gray_array_to_rgb(values: np.ndarray) -> Image.Image:
    gray = np.clip(values, 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.repeat(gray[..., None], 3, axis=2)))
