"""The one image decoder: orientation, modes, formats by content, bomb guard, and typed errors naming the file."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from landmarks.data.decode import decode_image, image_info, open_image
from landmarks.errors import ImageDecodeError, ImageTooLargeError, LandmarksError

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _two_halves(w: int = 20, h: int = 10) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = RED
    arr[:, w // 2 :] = BLUE
    return Image.fromarray(arr, "RGB")


def _close(a: np.ndarray, b: tuple[int, ...], tol: int = 10) -> bool:
    return bool(np.all(np.abs(a.astype(int) - np.array(b)) <= tol))


# --- orientation and modes --------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = _two_halves(20, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90° clockwise to display
    p = tmp_path / "rotated.jpg"
    img.save(p, quality=95, exif=exif)
    out = decode_image(p)
    assert out.shape == (20, 10, 3)  # width and height swapped
    assert _close(out[:6].reshape(-1, 3).mean(0), RED, 20)  # the left (red) half is now on top
    assert _close(out[-6:].reshape(-1, 3).mean(0), BLUE, 20)
    plain = tmp_path / "plain.jpg"
    img.save(plain, quality=95)
    assert decode_image(plain).shape == (10, 20, 3)


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    arr = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (4, 1))
    p = tmp_path / "g.png"
    Image.fromarray(arr, "L").save(p)
    out = decode_image(p)
    assert out.shape == (4, 8, 3) and out.dtype == np.uint8
    assert (
        np.array_equal(out[..., 0], arr)
        and np.array_equal(out[..., 1], arr)
        and np.array_equal(out[..., 2], arr)
    )


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb(tmp_path: Path, fmt: str) -> None:
    p = tmp_path / f"cmyk.{fmt.lower()}"
    Image.new("CMYK", (16, 8), (255, 0, 0, 0)).save(p, format=fmt)  # pure cyan
    assert image_info(p).mode == "CMYK"
    out = decode_image(p)
    assert out.shape == (8, 16, 3)
    assert _close(out.reshape(-1, 3).mean(0), (0, 255, 255), 12)


def test_palette_without_and_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    img.putpixel((1, 0), 1)
    plain = tmp_path / "p.png"
    img.save(plain)
    out = decode_image(plain)
    assert tuple(out[0, 0]) == RED and tuple(out[0, 1]) == BLUE
    transparent = tmp_path / "pt.png"
    img.save(transparent, transparency=1)  # index 1 (blue) is transparent -> composited on white
    out = decode_image(transparent)
    assert tuple(out[0, 0]) == RED and tuple(out[0, 1]) == (255, 255, 255)


def test_alpha_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[0, 0] = (0, 0, 0, 0)
    rgba[0, 1] = (0, 0, 0, 255)
    rgba[0, 2] = (0, 0, 0, 128)
    p = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(p)
    out = decode_image(p)
    assert tuple(out[0, 0]) == (255, 255, 255)
    assert tuple(out[0, 1]) == (0, 0, 0)
    assert all(120 <= v <= 135 for v in out[0, 2])
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (0, 0))
    la.putpixel((1, 0), (0, 255))
    q = tmp_path / "la.png"
    la.save(q)
    out = decode_image(q)
    assert tuple(out[0, 0]) == (255, 255, 255) and tuple(out[0, 1]) == (0, 0, 0)


def test_16_bit_png_becomes_8_bit(tmp_path: Path) -> None:
    img = Image.new("I;16", (3, 1))
    img.putpixel((0, 0), 0)
    img.putpixel((1, 0), 32896)  # 128.5/255 of full scale
    img.putpixel((2, 0), 65535)
    p = tmp_path / "deep.png"
    img.save(p)
    assert image_info(p).mode.startswith("I")
    out = decode_image(p)
    assert out.dtype == np.uint8 and out.shape == (1, 3, 3)
    assert list(out[0, :, 0]) == [0, 128, 255]
    assert np.array_equal(out[..., 0], out[..., 2])


# --- formats recognised by content ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,fmt,wrong_name",
    [
        ("jpeg", "JPEG", "x.png"),
        ("png", "PNG", "x.jpg"),
        ("webp", "WEBP", "x.gif"),
        ("avif", "AVIF", "x.jpg"),
        ("gif", "GIF", "x.bmp"),
        ("bmp", "BMP", "x.webp"),
        ("tiff", "TIFF", "x.jpg"),
        ("png", "PNG", "noext"),
    ],
)
def test_format_is_recognised_by_content_not_extension(
    tmp_path: Path, kind: str, fmt: str, wrong_name: str
) -> None:
    p = make_image(tmp_path / wrong_name, (12, 8), kind)
    info = image_info(p)
    assert info.format == fmt and (info.width, info.height) == (12, 8)
    out = decode_image(p)
    assert out.shape == (8, 12, 3) and out.dtype == np.uint8
    assert out.flags["C_CONTIGUOUS"]


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (6, 4), c) for c in (RED, (0, 255, 0), BLUE)]
    p = tmp_path / "anim.jpg"  # wrong extension too
    frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(p) as check:
        assert getattr(check, "n_frames", 1) == 3
    out = decode_image(p)
    assert out.shape == (4, 6, 3)
    assert _close(out.reshape(-1, 3).mean(0), RED, 2)


def test_bytes_input_and_open_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    _two_halves().save(buf, format="PNG")
    out = decode_image(buf.getvalue())
    assert out.shape == (10, 20, 3) and tuple(out[0, 0]) == RED
    assert decode_image(memoryview(buf.getvalue())).shape == (10, 20, 3)
    pil = open_image(buf.getvalue())
    assert pil.mode == "RGB" and pil.size == (20, 10)


def test_min_side_px_allows_reduced_jpeg_decoding(tmp_path: Path) -> None:
    p = make_image(tmp_path / "big.jpg", (256, 192), "jpeg")
    out = decode_image(p, min_side_px=40)
    assert min(out.shape[:2]) >= 40 and out.shape[0] < 192  # DCT scaling kicked in
    assert decode_image(p).shape == (192, 256, 3)


# --- the pixel-count limit --------------------------------------------------------------------------


def _png_header(w: int, h: int) -> bytes:
    """A PNG that claims ``w`` x ``h`` pixels but holds none (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    iend = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return b"\x89PNG\r\n\x1a\n" + chunk + iend


@pytest.mark.timeout(20)
@pytest.mark.parametrize("w,h", [(100_000, 100_000), (12_000, 10_000)])
def test_huge_png_header_is_refused_before_decoding(tmp_path: Path, w: int, h: int) -> None:
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_header(w, h))
    with pytest.raises(ImageTooLargeError) as e:
        decode_image(p)
    assert e.value.source == str(p) and str(p) in str(e.value)
    with pytest.raises(ImageTooLargeError):
        image_info(p)
    with pytest.raises(ImageTooLargeError):
        decode_image(_png_header(w, h), name="upload.png")


def test_pixel_limit_is_configurable(tmp_path: Path) -> None:
    p = make_image(tmp_path / "small.png", (40, 40), "png")
    with pytest.raises(ImageTooLargeError) as e:
        decode_image(p, max_pixels=1000)
    assert "1600" in e.value.reason
    assert isinstance(e.value, ImageDecodeError) and isinstance(e.value, LandmarksError)
    assert decode_image(p, max_pixels=None).shape == (40, 40, 3)


# --- bad inputs: typed errors that name the file ----------------------------------------------------


def _expect_error(source: Path, *words: str) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as e:
        decode_image(source)
    err = e.value
    assert not isinstance(err, ImageTooLargeError)
    assert err.source == str(source) and str(source) in str(err)
    for w in words:
        assert w in err.reason.lower(), err.reason
    return err


def test_truncated_jpeg(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, quality=90)
    data = full.read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    _expect_error(p, "truncated")
    image_info(p)  # the header alone is intact


def test_corrupt_bytes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    p = tmp_path / "garbage.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 400, dtype=np.uint8).tobytes())
    _expect_error(p)
    png = make_image(tmp_path / "ok.png", (32, 32), "png")
    data = bytearray(png.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 20] = bytes(20)
    bad = tmp_path / "broken.png"
    bad.write_bytes(bytes(data))
    _expect_error(bad)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    _expect_error(p, "empty")
    with pytest.raises(ImageDecodeError) as e:
        decode_image(b"", name="upload.jpg")
    assert e.value.source == "upload.jpg"


def test_text_file(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("this is not an image\n")
    _expect_error(p, "not a recognised image")


def test_directory_and_missing_file(tmp_path: Path) -> None:
    d = tmp_path / "folder.jpg"
    d.mkdir()
    _expect_error(d, "directory")
    _expect_error(tmp_path / "missing.jpg", "not found")
    with pytest.raises(ImageDecodeError) as e:
        image_info(tmp_path / "missing.jpg")
    assert "missing.jpg" in str(e.value)


def test_unsupported_format_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "x.jpg"
    Image.new("RGB", (4, 4)).save(p, format="PPM")
    _expect_error(p, "not a recognised image")
