"""Image transforms for training and inference, on ``(H, W, 3)`` uint8 RGB arrays (OpenCV + NumPy).

- :class:`TrainTransform`: augmentations that suit landmarks: a random resized crop with a mild scale
  range, a small shift/scale/rotation and an optional horizontal flip (one affine warp for all three),
  colour jitter, JPEG re-compression and cutout. Never a vertical flip. Deterministic given the
  ``numpy.random.Generator`` it is called with.
- :func:`resize_square`: the inference resize (the whole image squashed to ``S × S``, nothing cropped:
  a landmark may sit anywhere in the photo).
- :class:`Preprocess`: the contract's preprocessing, ``(H, W, 3)`` uint8 -> ``(3, S, S)`` float32
  normalised tensor, rebuilt from a checkpoint's ``meta["preprocessing"]``.
- :func:`normalize_batch`: ``(B, S, S, 3)`` uint8 batches -> normalised ``(B, 3, S, S)`` float32 in
  channels-last memory layout; DataLoader workers ship uint8 (4× less than float) and the main process
  normalises whole batches at once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

#: ImageNet statistics (timm's default for most models).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class AugmentConfig:
    """Training augmentations (probabilities in [0, 1]; 0 turns one off)."""

    enabled: bool = True  # False: training images get the inference resize only
    crop_scale: tuple[float, float] = (0.6, 1.0)  # random resized crop: area fraction range (mild)
    crop_ratio: tuple[float, float] = (0.75, 1.3333)  # random resized crop: aspect-ratio range
    hflip: float = 0.5  # probability of a horizontal flip (never vertical)
    ssr: float = 0.5  # probability of the shift/scale/rotate jitter
    shift: float = 0.06  # max shift as a fraction of the output side
    scale: float = 0.1  # max relative zoom in or out
    rotate_deg: float = 10.0  # max rotation in degrees
    jitter: float = 0.8  # probability of colour jitter
    brightness: float = 0.25  # brightness factor range 1 ± this
    contrast: float = 0.25  # contrast factor range 1 ± this
    saturation: float = 0.25  # saturation factor range 1 ± this
    hue: float = 0.02  # hue shift range ± this fraction of the colour circle
    jpeg: float = 0.25  # probability of JPEG re-compression
    jpeg_quality: tuple[int, int] = (40, 95)  # JPEG quality range
    cutout: float = 0.3  # probability of one cutout rectangle
    cutout_size: tuple[float, float] = (0.1, 0.3)  # cutout side as a fraction of the output side


def _interp(scale: float) -> int:
    """OpenCV interpolation for a resize by ``scale`` (area when shrinking, bilinear when growing)."""
    return cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Squash an ``(H, W, 3)`` uint8 image to ``(size, size, 3)`` uint8 (area when shrinking)."""
    h, w = img.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(img)
    return cv2.resize(img, (size, size), interpolation=_interp(min(size / h, size / w)))


class TrainTransform:
    """Training augmentation: ``(H, W, 3)`` uint8 -> ``(S, S, 3)`` uint8, driven by an explicit RNG."""

    def __init__(self, image_size: int, conf: AugmentConfig | None = None):
        self.size = int(image_size)
        self.conf = conf or AugmentConfig()

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Augment one image; the same ``rng`` state gives the same output."""
        c = self.conf
        if not c.enabled:
            return resize_square(img, self.size)
        s = self.size
        h, w = img.shape[:2]
        x0, y0, cw, ch = self._crop_box(w, h, rng)
        # Shrink big images first with area interpolation (an affine warp would alias).
        pre = min(1.0, 1.5 * s / max(1.0, min(cw, ch)))
        if pre < 0.75:
            img = cv2.resize(
                img, (max(1, round(w * pre)), max(1, round(h * pre))), interpolation=cv2.INTER_AREA
            )
            x0, y0, cw, ch = x0 * pre, y0 * pre, cw * pre, ch * pre
        # Crop box -> output square.
        m = np.array([[s / cw, 0.0, -x0 * s / cw], [0.0, s / ch, -y0 * s / ch], [0.0, 0.0, 1.0]])
        if rng.random() < c.hflip:
            m = np.array([[-1.0, 0.0, s], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
        if rng.random() < c.ssr:
            angle = rng.uniform(-c.rotate_deg, c.rotate_deg)
            zoom = rng.uniform(1 - c.scale, 1 + c.scale)
            tx, ty = rng.uniform(-c.shift, c.shift, size=2) * s
            r = cv2.getRotationMatrix2D((s / 2, s / 2), angle, zoom)
            r[:, 2] += (tx, ty)
            m = np.vstack([r, [0.0, 0.0, 1.0]]) @ m
        out = cv2.warpAffine(img, m[:2], (s, s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        if rng.random() < c.jitter:
            out = self._jitter(out, rng)
        if rng.random() < c.jpeg:
            q = int(rng.integers(c.jpeg_quality[0], c.jpeg_quality[1] + 1))
            ok, buf = cv2.imencode(
                ".jpg", np.ascontiguousarray(out[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, q]
            )
            decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
            if decoded is not None:
                out = np.ascontiguousarray(decoded[:, :, ::-1])
        if rng.random() < c.cutout:
            side = rng.uniform(*c.cutout_size, size=2) * s
            cx, cy = rng.uniform(0, s, size=2)
            xa, xb = int(max(0, cx - side[0] / 2)), int(min(s, cx + side[0] / 2))
            ya, yb = int(max(0, cy - side[1] / 2)), int(min(s, cy + side[1] / 2))
            out = out.copy() if not out.flags.writeable else out
            out[ya:yb, xa:xb] = rng.integers(0, 256, size=3, dtype=np.uint8)
        return np.ascontiguousarray(out)

    def _crop_box(self, w: int, h: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """A random crop ``(x0, y0, cw, ch)`` with area fraction and aspect ratio in the configured ranges."""
        c = self.conf
        area = float(w * h)
        log_r = (math.log(c.crop_ratio[0]), math.log(c.crop_ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*c.crop_scale)
            ratio = math.exp(rng.uniform(*log_r))
            cw = math.sqrt(target * ratio)
            ch = math.sqrt(target / ratio)
            if 0 < cw <= w and 0 < ch <= h:
                return float(rng.uniform(0, w - cw)), float(rng.uniform(0, h - ch)), cw, ch
        return 0.0, 0.0, float(w), float(h)

    def _jitter(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        c = self.conf
        x = img.astype(np.float32)
        order = rng.permutation(3)
        for op in order:
            if op == 0 and c.brightness > 0:
                x *= rng.uniform(1 - c.brightness, 1 + c.brightness)
            elif op == 1 and c.contrast > 0:
                mean = float((x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).mean())
                x = (x - mean) * rng.uniform(1 - c.contrast, 1 + c.contrast) + mean
            elif op == 2 and c.saturation > 0:
                gray = (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
                x = (x - gray) * rng.uniform(1 - c.saturation, 1 + c.saturation) + gray
        out = np.clip(x, 0, 255).astype(np.uint8)
        if c.hue > 0:
            shift = int(round(rng.uniform(-c.hue, c.hue) * 180))
            if shift:
                hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV)
                hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int16) + shift) % 180).astype(np.uint8)
                out = np.asarray(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), dtype=np.uint8)
        return out


def normalize_batch(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``(B, S, S, 3)`` uint8 -> ``(B, 3, S, S)`` float32, ``(x / 255 − mean) / std``, channels-last.

    The uint8 batch moves to ``device`` first (4× less to copy than float).
    """
    x = images.to(device, non_blocking=True) if device is not None else images
    x = x.permute(0, 3, 1, 2).float()  # a channels-last strided NCHW view
    m, sd = _norm_constants(tuple(float(v) for v in mean), tuple(float(v) for v in std), x.device)
    return ((x - m) / sd).contiguous(memory_format=torch.channels_last)


@functools.lru_cache(maxsize=32)
def _norm_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``255 * mean`` and ``255 * std`` as ``(1, 3, 1, 1)`` float32 on ``device``, made once per device: made
    for every batch on a GPU, each is a host-to-device copy that waits for the kernels already queued."""
    with torch.inference_mode(False):
        m = torch.tensor([v * 255.0 for v in mean], dtype=torch.float32, device=device).view(1, 3, 1, 1)
        sd = torch.tensor([v * 255.0 for v in std], dtype=torch.float32, device=device).view(1, 3, 1, 1)
    return m, sd


@dataclass(frozen=True)
class Preprocess:
    """The inference preprocessing of a checkpoint: ``(H, W, 3)`` uint8 -> ``(3, S, S)`` float32.

    The whole image is squashed to ``S × S`` (:func:`resize_square`) and normalised with ``mean``/``std``
    (RGB, in [0, 1] units). Picklable, so DataLoader workers can use it.
    """

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` float32 normalised tensor."""
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.shape} {img.dtype}")
        x = resize_square(img, self.image_size).astype(np.float32)
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        y = ((x * np.float32(1.0 / 255.0) - mean) / std).astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(y.transpose(2, 0, 1)))

    def to_dict(self) -> dict[str, Any]:
        """``{"image_size": S, "mean": [3 floats], "std": [3 floats], "resize": "squash"}`` for meta.json."""
        return {
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": "squash",
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocess:
        """Inverse of :meth:`to_dict` (extra keys ignored)."""
        mean = tuple(float(v) for v in d.get("mean", IMAGENET_MEAN))
        std = tuple(float(v) for v in d.get("std", IMAGENET_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"preprocessing mean/std must have 3 values, got {mean}, {std}")
        return cls(int(d["image_size"]), (mean[0], mean[1], mean[2]), (std[0], std[1], std[2]))
