"""The one image decoder used by every stage.

``decode_image`` turns a file path or raw bytes into an ``(H, W, 3)`` uint8 RGB array:

- the format is recognised by content, never by extension (JPEG, PNG, WebP, AVIF, GIF first frame,
  BMP, TIFF; MPO is read as its first JPEG frame);
- EXIF orientation is applied;
- grayscale, CMYK, palette, alpha (composited on white) and 16-bit images become 8-bit RGB;
- a pixel-count limit refuses decompression bombs before any pixel is decoded, and a limit on the
  scans of a progressive JPEG refuses scan bombs (a 376 KB 6000x6000 JPEG whose last scan is repeated
  2,000 times decodes for ~55 s; every scan costs a pass over all coefficients);
- truncated, corrupt, zero-byte and non-image inputs raise :class:`ImageDecodeError` naming the source.

Nothing here changes Pillow's global state (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``).
"""

from __future__ import annotations

import io
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from landmarks.errors import ImageDecodeError, ImageTooLargeError

#: Formats accepted, by Pillow's format name (detected from the bytes).
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")
#: Default pixel-count limit (width × height): 100 megapixels.
DEFAULT_MAX_PIXELS = 100_000_000

#: Default limit on the scans (SOS markers) of a JPEG. libjpeg's standard progression writes 10 scans for
#: colour and 6 for greyscale; baseline JPEGs have 1 (or 1 per component).
DEFAULT_MAX_JPEG_SCANS = 100

ImageSource = str | Path | bytes | bytearray | memoryview

# a marker: 0xFF followed by neither 0x00 (stuffing), 0xFF (fill) nor RST0-7 (inside entropy-coded data)
_MARKER = re.compile(rb"\xff[^\x00\xff\xd0-\xd7]")


def count_jpeg_scans(data: bytes, stop_after: int | None = None) -> int:
    """The number of scans (SOS segments) of the first image of a JPEG stream, without decoding it.

    Segments are skipped by their length (a thumbnail inside EXIF is not counted) and entropy-coded
    data is searched for the next marker. Counting stops after ``stop_after`` + 1 scans.
    Returns 0 for data that does not start like a JPEG.
    """
    if data[:2] != b"\xff\xd8":
        return 0
    n, pos, scans = len(data), 2, 0
    while pos < n - 1:
        m = _MARKER.search(data, pos)
        if m is None:
            break
        code = data[m.start() + 1]
        pos = m.start() + 2
        if code == 0xD9:  # EOI
            break
        if code == 0x01 or 0xD0 <= code <= 0xD8:  # markers without a length
            continue
        if pos + 2 > n:
            break
        if code == 0xDA:
            scans += 1
            if stop_after is not None and scans > stop_after:
                break
        pos += int.from_bytes(data[pos : pos + 2], "big")
    return scans


@dataclass(frozen=True)
class ImageInfo:
    """What the header says about an image (no pixels decoded)."""

    format: str
    width: int
    height: int
    mode: str


def _open_formats() -> list[str]:
    """The supported formats this Pillow can open (Pillow 13 reads MPO through its JPEG opener)."""
    Image.init()
    return [f for f in SUPPORTED_FORMATS if f in Image.OPEN]


def _name(source: ImageSource, name: str | None) -> str:
    if name is not None:
        return name
    if isinstance(source, (str, Path)):
        return str(source)
    return "<bytes>"


def _check_scans(img: Image.Image, source: ImageSource, name: str, max_scans: int | None) -> None:
    if max_scans is None or img.format not in ("JPEG", "MPO"):
        return
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            raise ImageDecodeError(name, f"cannot read file: {e.strerror or e}") from None
    scans = count_jpeg_scans(data, max_scans)
    if scans > max_scans:
        img.close()
        raise ImageTooLargeError(
            name,
            f"refused: a JPEG with more than {max_scans} scans (a progressive "
            "decoding bomb; re-encode the image)",
        )


def _open(
    source: ImageSource, name: str, max_pixels: int | None, max_scans: int | None = DEFAULT_MAX_JPEG_SCANS
) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageDecodeError(name, "empty input (0 bytes)")
        fp: io.BytesIO | str = io.BytesIO(data)
    else:
        path = Path(source)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageDecodeError(name, "file not found") from None
        except OSError as e:
            raise ImageDecodeError(name, f"cannot read file: {e.strerror or e}") from None
        if path.is_dir():
            raise ImageDecodeError(name, "is a directory, not an image")
        if size == 0:
            raise ImageDecodeError(name, "empty file (0 bytes)")
        fp = str(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fp, formats=_open_formats())
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(name, f"refused: too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(
            name, "not a recognised image (supported: JPEG, PNG, WebP, AVIF, GIF, BMP, TIFF)"
        ) from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        struct.error,
        EOFError,
        IndexError,
        TypeError,
        KeyError,
        ZeroDivisionError,
    ) as e:
        raise ImageDecodeError(name, f"corrupt image header: {e or type(e).__name__}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageDecodeError(name, f"invalid size {w}x{h}")
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise ImageTooLargeError(name, f"refused: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    _check_scans(img, source, name, max_scans)
    return img


def image_info(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_scans: int | None = DEFAULT_MAX_JPEG_SCANS,
) -> ImageInfo:
    """Read the format and size from the header only (JPEG scans are counted). Raises :class:`ImageDecodeError`."""
    label = _name(source, name)
    img = _open(source, label, max_pixels, max_scans)
    try:
        return ImageInfo(format=str(img.format), width=img.size[0], height=img.size[1], mode=img.mode)
    finally:
        img.close()


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 or mode.startswith("I;16") else 255.0
        arr8 = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip(np.round((np.nan_to_num(arr, nan=lo) - lo) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return img
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def open_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side_px: int | None = None,
    max_scans: int | None = DEFAULT_MAX_JPEG_SCANS,
) -> Image.Image:
    """Decode to an RGB ``PIL.Image`` (EXIF orientation applied).

    ``min_side_px``: when set, JPEG decoding may use DCT scaling (``draft``) to any size whose shorter
    side stays at least this large; a speed-up for stages that resize anyway. ``max_scans``: refuse
    JPEGs with more scans (None: no limit).
    """
    label = _name(source, name)
    img = _open(source, label, max_pixels, max_scans)
    try:
        if img.format == "GIF":
            img.seek(0)
        if min_side_px is not None and img.format in ("JPEG", "MPO"):
            w, h = img.size
            scale = min_side_px / max(1, min(w, h))
            if scale < 1.0:
                img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()
        img = ImageOps.exif_transpose(img) or img
        out = _to_rgb(img)
        out.load()
        return out
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageTooLargeError(label, f"refused: too many pixels ({e})") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        IndexError,
        TypeError,
        ZeroDivisionError,
        KeyError,
        struct.error,
    ) as e:  # struct.error: a corrupt EXIF block
        msg = str(e) or type(e).__name__
        if "truncated" in msg.lower():
            raise ImageDecodeError(label, f"truncated image ({msg})") from None
        raise ImageDecodeError(label, f"corrupt image data ({msg})") from None
    except MemoryError:
        raise ImageTooLargeError(label, "refused: out of memory while decoding") from None


def decode_image(
    source: ImageSource,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side_px: int | None = None,
    max_scans: int | None = DEFAULT_MAX_JPEG_SCANS,
) -> np.ndarray:
    """Decode an image file or bytes to an ``(H, W, 3)`` uint8 RGB array.

    Args:
        source: a path, or the raw bytes of an encoded image.
        name: how errors name the source (default: the path, or ``<bytes>``).
        max_pixels: refuse images with more than this many pixels (None: no limit).
        min_side_px: allow faster reduced-size JPEG decoding down to this shorter side.
        max_scans: refuse JPEGs with more scans than this (progressive-decoding bombs; None: no limit).

    Raises:
        ImageDecodeError: (or its subclass ImageTooLargeError) with ``.source`` and ``.reason``.
    """
    img = open_image(source, name=name, max_pixels=max_pixels, min_side_px=min_side_px, max_scans=max_scans)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ImageDecodeError(_name(source, name), f"unexpected decoded shape {arr.shape}")
    return np.ascontiguousarray(arr)
