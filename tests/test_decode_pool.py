"""JPEG scan counting and the killable decoder processes."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from landmarks.data.decode import count_jpeg_scans, decode_image
from landmarks.data.decode_pool import DecoderPool, DecodeTimeoutError
from landmarks.errors import ImageDecodeError, ImageTooLargeError
from serve_fake import scan_bomb

RNG_IMG = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def jpeg(img: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", **kw)
    return buf.getvalue()


def test_scan_count_matches_the_encoders_scripts() -> None:
    assert count_jpeg_scans(jpeg(RNG_IMG)) == 1  # baseline, interleaved
    assert count_jpeg_scans(jpeg(RNG_IMG, progressive=True)) == 10  # libjpeg's colour progression
    grey = np.asarray(Image.fromarray(RNG_IMG).convert("L"))
    assert count_jpeg_scans(jpeg(grey, progressive=True)) == 6
    # a progressive thumbnail inside EXIF (an APP1 segment) is skipped by its length, not counted
    thumb = jpeg(RNG_IMG[:16, :16], progressive=True)
    exif = b"Exif\x00\x00" + thumb
    data = jpeg(RNG_IMG)
    data = data[:2] + b"\xff\xe1" + (len(exif) + 2).to_bytes(2, "big") + exif + data[2:]
    assert count_jpeg_scans(data) == 1
    assert count_jpeg_scans(scan_bomb(64, 64, 500)) == 510
    assert count_jpeg_scans(scan_bomb(64, 64, 500), stop_after=20) == 21
    assert count_jpeg_scans(b"\x89PNG\r\n") == 0


def test_scan_bombs_are_refused_unless_the_limit_is_lifted() -> None:
    bomb = scan_bomb(64, 48, 300)
    with pytest.raises(ImageTooLargeError, match="more than 100 scans"):
        decode_image(bomb, name="bomb.jpg")
    assert decode_image(bomb, max_scans=None).shape == (48, 64, 3)
    assert decode_image(jpeg(RNG_IMG, progressive=True)).shape == (48, 64, 3)


def test_decoder_pool_decodes_like_decode_image_and_kills_overdue_work() -> None:
    pool = DecoderPool(1, max_scans=None)
    try:
        good = jpeg(RNG_IMG, quality=95)
        np.testing.assert_array_equal(pool.decode(good, "a.jpg", time.monotonic() + 60), decode_image(good))
        with pytest.raises(ImageDecodeError, match="b.jpg"):
            pool.decode(good[: len(good) // 3], "b.jpg", time.monotonic() + 60)
        with pytest.raises(ImageDecodeError, match="not a recognised image"):
            pool.decode(b"hello", "c.txt", time.monotonic() + 60)
        t0 = time.monotonic()
        with pytest.raises(DecodeTimeoutError):
            pool.decode(scan_bomb(2000, 2000, 2000), "bomb.jpg", time.monotonic() + 0.5)  # ~8 s of decoding
        assert (
            pool.killed == 1 and time.monotonic() - t0 < 4.0
        )  # stopped at the deadline, not after the decode
        # the only process was replaced: the pool still decodes
        np.testing.assert_array_equal(pool.decode(good, "d.jpg", time.monotonic() + 60), decode_image(good))
    finally:
        pool.close()
