"""Mixed precision and cuDNN settings for a device: one place decides, training and inference ask.

- :func:`choose_amp_dtype` is the pure rule (inputs in, dtype out), unit-tested on any machine;
  :func:`amp_dtype` feeds it what the running machine supports.
- :func:`needs_grad_scaler`: fp16 on CUDA needs a ``GradScaler`` (its gradients underflow); bf16 has
  fp32's exponent range and needs none.
- :func:`autocast` is a no-op context for fp32.
- :func:`cudnn_benchmark` lets cuDNN pick the fastest convolution kernels for the fixed input sizes
  of training and extraction, and restores the caller's setting afterwards (library code leaves no
  global state changed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: The values of an ``amp`` setting: "auto" (the rule below), "off" (fp32), or a forced dtype.
AMP_CHOICES = ("auto", "off", "bf16", "fp16")


def choose_amp_dtype(amp: str, device_type: str, *, cuda_bf16: bool, cpu_amx: bool) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on a ``device_type`` device (None: fp32).

    Args:
        amp: one of :data:`AMP_CHOICES`.
        device_type: ``"cuda"``, ``"cpu"``, ``"mps"``, ...
        cuda_bf16: the GPU computes bf16 natively (Ampere and newer; emulated bf16 does not count).
        cpu_amx: the CPU has AMX tiles (bf16 matrix units; AVX512-BF16 alone measured slower than fp32).

    ``"auto"`` gives bf16 on CUDA where native, else fp16 (with a grad scaler: :func:`needs_grad_scaler`);
    bf16 on CPUs with AMX; fp32 elsewhere.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device_type == "cuda":
        return torch.bfloat16 if cuda_bf16 else torch.float16
    if device_type == "cpu" and cpu_amx:
        return torch.bfloat16
    return None


def cuda_bf16_native() -> bool:
    """Whether the current CUDA device computes bf16 natively (False without CUDA)."""
    if not torch.cuda.is_available():
        return False
    return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (torch's own probe; False where torch lacks it)."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx is not None and amx())


def amp_dtype(amp: str, device: torch.device | str, *, cpu_auto: bool = True) -> torch.dtype | None:
    """:func:`choose_amp_dtype` for ``device`` on this machine.

    ``cpu_auto=False`` keeps ``"auto"`` at fp32 on CPUs (inference: an index built on an AMX machine
    stays comparable with one built elsewhere).
    """
    dev = torch.device(device)
    return choose_amp_dtype(
        amp,
        dev.type,
        cuda_bf16=dev.type == "cuda" and cuda_bf16_native(),
        cpu_amx=cpu_auto and dev.type == "cpu" and cpu_has_amx(),
    )


def needs_grad_scaler(dtype: torch.dtype | None, device_type: str) -> bool:
    """True for fp16 autocast on CUDA: the loss must be scaled so that small gradients survive."""
    return dtype == torch.float16 and device_type == "cuda"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    """``torch.autocast`` on ``device`` with ``dtype``; a no-op context for fp32 (None)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def cudnn_benchmark(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Within the block, let cuDNN benchmark convolution algorithms when ``device`` is CUDA (fixed input
    sizes: the first batch of each shape pays a search, later ones run the fastest kernels); the
    previous setting is restored on exit. A no-op on other devices."""
    if torch.device(device).type != "cuda":
        yield
        return
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before
