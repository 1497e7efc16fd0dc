"""The device-precision rules of the GPU path, checked on any machine (pure functions, flag restoring)."""

from __future__ import annotations

import math

import pytest
import torch

from landmarks.errors import LandmarksError
from landmarks.train import read_stats
from landmarks.utils.precision import (
    AMP_CHOICES,
    autocast,
    choose_amp_dtype,
    cudnn_benchmark,
    needs_grad_scaler,
)

BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    ("amp", "device", "cuda_bf16", "cpu_amx", "want"),
    [
        ("auto", "cuda", True, False, BF16),  # Ampere and newer
        ("auto", "cuda", False, False, FP16),  # V100, T4: fp16 + grad scaler
        ("auto", "cpu", False, True, BF16),  # AMX tiles
        ("auto", "cpu", False, False, None),  # AVX512-BF16 alone was slower than fp32
        ("auto", "mps", False, False, None),
        ("off", "cuda", True, True, None),
        ("bf16", "cpu", False, False, BF16),  # forced
        ("fp16", "cuda", True, False, FP16),
    ],
)
def test_choose_amp_dtype(
    amp: str, device: str, cuda_bf16: bool, cpu_amx: bool, want: torch.dtype | None
) -> None:
    assert choose_amp_dtype(amp, device, cuda_bf16=cuda_bf16, cpu_amx=cpu_amx) is want


def test_choose_amp_dtype_rejects_unknown() -> None:
    assert set(AMP_CHOICES) == {"auto", "off", "bf16", "fp16"}
    with pytest.raises(ValueError, match="amp must be one of"):
        choose_amp_dtype("fp8", "cuda", cuda_bf16=True, cpu_amx=False)


def test_grad_scaler_only_for_fp16_on_cuda() -> None:
    assert needs_grad_scaler(FP16, "cuda")
    assert not needs_grad_scaler(BF16, "cuda")
    assert not needs_grad_scaler(None, "cuda")
    assert not needs_grad_scaler(FP16, "cpu")


def test_autocast_none_is_fp32() -> None:
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), None):
        assert (a @ b).dtype == torch.float32
    with autocast(torch.device("cpu"), BF16):
        assert (a @ b).dtype == BF16


def test_cudnn_benchmark_is_set_for_cuda_and_restored() -> None:
    before = torch.backends.cudnn.benchmark
    try:
        torch.backends.cudnn.benchmark = False
        with cudnn_benchmark("cpu"):
            assert torch.backends.cudnn.benchmark is False  # other devices: untouched
        with pytest.raises(RuntimeError), cudnn_benchmark("cuda:0"):
            assert torch.backends.cudnn.benchmark is True
            raise RuntimeError("boom")
        assert torch.backends.cudnn.benchmark is False  # restored, also after an error
    finally:
        torch.backends.cudnn.benchmark = before


def test_read_stats_floats_and_non_finite_loss() -> None:
    vals = read_stats({"loss": torch.tensor(1.5), "acc": torch.tensor(0.25, dtype=torch.float64)}, 3)
    assert vals == {"loss": 1.5, "acc": 0.25} and all(type(v) is float for v in vals.values())
    assert math.isnan(read_stats({"acc": torch.tensor(float("nan"))}, 3)["acc"])  # only losses are checked
    with pytest.raises(LandmarksError, match="the loss became nan by step 7"):
        read_stats({"loss": torch.tensor(float("nan"))}, 7)
    with pytest.raises(LandmarksError, match="the loss became inf"):
        read_stats({"local_loss": torch.tensor(float("inf"))}, 7)
