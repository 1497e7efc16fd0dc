"""The GPU route of extraction, checked on a CPU: workers send uint8 squares and the model's batch is
normalised where it runs, giving the tensors the run's own preprocessing gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landmarks.data.transforms import Preprocess, normalize_batch
from landmarks.extract import SquareUint8, batch_route


def test_uint8_route_matches_the_preprocessing() -> None:
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((50, 70), (64, 64), (90, 40))]
    pre = Preprocess(64, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    want = torch.stack([pre(img) for img in imgs])  # (B, 3, S, S) float32 made by the workers on a CPU
    squares = torch.stack([SquareUint8(64)(img) for img in imgs])
    assert squares.dtype == torch.uint8 and squares.shape == (3, 64, 64, 3)
    got = normalize_batch(squares, pre.mean, pre.std, "cpu")  # what the GPU does with them
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="expected an"):
        SquareUint8(64)(imgs[0][:, :, 0])


def test_route_by_device_and_preprocessor() -> None:
    pre = Preprocess(32)
    worker, _ = batch_route(pre, torch.device("cuda"))
    assert worker == SquareUint8(32)  # a GPU with the run's preprocessing: uint8 travels
    custom = lambda img: torch.zeros(3, 8, 8)  # noqa: E731 (another embedder's preprocessor)
    assert batch_route(custom, torch.device("cuda"))[0] is custom
    worker, to_model = batch_route(pre, torch.device("cpu"))  # a CPU: as before
    x = torch.randn(2, 3, 32, 32)
    assert worker is pre and to_model(x) is x
