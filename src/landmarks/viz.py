"""Drawings of local-feature matches (for ``landmarks match --draw``, the HTML report and the web page)."""

from __future__ import annotations

import colorsys
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    from landmarks.local_features import LocalFeatures
    from landmarks.verify import Verification


def _as_rgb(img: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"{name}: expected an (H, W, 3) uint8 image, got shape {arr.shape} dtype {arr.dtype}"
        )
    if arr.ndim == 2:
        return np.repeat(arr[:, :, None], 3, axis=2)
    if arr.shape[2] == 1:
        return np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def match_colors(n: int, saturation: float = 0.9, value: float = 1.0) -> np.ndarray:
    """``(n, 3)`` uint8 RGB colours spread around the hue circle (golden-ratio steps): deterministic."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array(
        [[round(255 * c) for c in colorsys.hsv_to_rgb(h, saturation, value)] for h in hues], dtype=np.uint8
    ).reshape(-1, 3)


def draw_matches(
    img_a: np.ndarray,
    img_b: np.ndarray,
    kpts_a: np.ndarray,
    kpts_b: np.ndarray,
    *,
    colors: np.ndarray | None = None,
    max_height_px: int | None = 720,
    gap_px: int = 8,
    radius_px: int = 3,
    thickness_px: int = 1,
    max_lines: int | None = 500,
) -> np.ndarray:
    """Draw corresponding keypoints of two images side by side, joined by lines.

    Args:
        img_a, img_b: ``(H, W, 3)`` uint8 RGB images (gray ``(H, W)`` accepted).
        kpts_a, kpts_b: ``(M, 2)`` float ``x, y`` pixels in each image; row k of A matches row k of B
            (e.g. ``feats_a.keypoints[v.inlier_matches[:, 0]]``).
        colors: ``(M, 3)`` uint8 RGB per match (default: distinct hues).
        max_height_px: both images are scaled to this common height (None: the taller one's height,
            never upscaled beyond it).
        gap_px: white space between the two images.
        radius_px, thickness_px: circle radius and line width.
        max_lines: draw at most this many matches (evenly spaced subset; None: all).

    Returns:
        ``(H, W, 3)`` uint8 RGB canvas.
    """
    a = _as_rgb(img_a, "img_a")
    b = _as_rgb(img_b, "img_b")
    pa = np.asarray(kpts_a, dtype=np.float64).reshape(-1, 2)
    pb = np.asarray(kpts_b, dtype=np.float64).reshape(-1, 2)
    if len(pa) != len(pb):
        raise ValueError(f"{len(pa)} keypoints in A but {len(pb)} in B: expected corresponding rows")
    height = max(a.shape[0], b.shape[0])
    if max_height_px is not None:
        height = min(height, int(max_height_px))
    height = max(height, 1)
    sa, sb = height / a.shape[0], height / b.shape[0]
    ra = cv2.resize(
        a,
        (max(1, round(a.shape[1] * sa)), height),
        interpolation=cv2.INTER_AREA if sa < 1 else cv2.INTER_LINEAR,
    )
    rb = cv2.resize(
        b,
        (max(1, round(b.shape[1] * sb)), height),
        interpolation=cv2.INTER_AREA if sb < 1 else cv2.INTER_LINEAR,
    )
    wa = ra.shape[1]
    canvas = np.full((height, wa + gap_px + rb.shape[1], 3), 255, np.uint8)
    canvas[:, :wa] = ra
    canvas[:, wa + gap_px :] = rb
    if colors is None:
        cols = match_colors(len(pa))
    else:
        cols = np.asarray(colors, dtype=np.uint8).reshape(-1, 3)
        if len(cols) != len(pa):
            raise ValueError(f"{len(cols)} colours for {len(pa)} matches")
    idx = np.arange(len(pa))
    if max_lines is not None and len(idx) > max_lines:
        idx = np.unique(np.linspace(0, len(pa) - 1, max_lines).round().astype(int))
    # Map pixel centres: x' + 0.5 = (x + 0.5) * s.
    qa = (pa[idx] + 0.5) * sa - 0.5
    qb = (pb[idx] + 0.5) * sb - 0.5
    qb[:, 0] += wa + gap_px
    shift = 4  # sub-pixel drawing precision (coordinates in 1/16 px)
    fa = np.round(qa * (1 << shift)).astype(np.int64)
    fb = np.round(qb * (1 << shift)).astype(np.int64)
    for k, (p, q) in enumerate(zip(fa, fb)):
        color = tuple(int(c) for c in cols[idx[k]])
        cv2.line(
            canvas, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), color, thickness_px, cv2.LINE_AA, shift
        )
        cv2.circle(
            canvas, (int(p[0]), int(p[1])), radius_px << shift, color, thickness_px, cv2.LINE_AA, shift
        )
        cv2.circle(
            canvas, (int(q[0]), int(q[1])), radius_px << shift, color, thickness_px, cv2.LINE_AA, shift
        )
    return canvas


def draw_verification(
    img_a: np.ndarray,
    img_b: np.ndarray,
    feats_a: LocalFeatures,
    feats_b: LocalFeatures,
    verification: Verification,
    *,
    max_side_px: int | None = None,
    **draw_kwargs: Any,
) -> np.ndarray:
    """Draw the inlier matches of a verified pair (what re-ranking counted), side by side.

    The one match drawing of the package: ``landmarks match --draw``, the HTML report and the
    service's ``/v1/matches`` all call it.

    Args:
        img_a, img_b: the ``(H, W, 3)`` uint8 RGB images the features were extracted from.
        feats_a, feats_b: their :class:`~landmarks.local_features.LocalFeatures` (keypoints in the
            images' pixels).
        verification: :func:`landmarks.verify.verify` of ``feats_a`` against ``feats_b``; its
            ``inlier_matches`` ``(I, 2)`` are drawn.
        max_side_px: shrink each image first so that its longer side is at most this (None: as is);
            keypoints follow the images.
        draw_kwargs: passed to :func:`draw_matches` (``max_height_px``, ``max_lines``, ...).

    Returns:
        ``(H, W, 3)`` uint8 RGB canvas.
    """
    inl = verification.inlier_matches
    pa = np.asarray(feats_a.keypoints, dtype=np.float64)[inl[:, 0]]
    pb = np.asarray(feats_b.keypoints, dtype=np.float64)[inl[:, 1]]
    a, sa = _shrink(_as_rgb(img_a, "img_a"), max_side_px)
    b, sb = _shrink(_as_rgb(img_b, "img_b"), max_side_px)
    return draw_matches(a, b, (pa + 0.5) * sa - 0.5, (pb + 0.5) * sb - 0.5, **draw_kwargs)


def _shrink(img: np.ndarray, max_side_px: int | None) -> tuple[np.ndarray, np.ndarray]:
    """``img`` with its longer side at most ``max_side_px``, and the ``(2,)`` x, y scale applied."""
    h, w = img.shape[:2]
    if max_side_px is None or max(h, w) <= max_side_px:
        return img, np.ones(2)
    s = max_side_px / max(h, w)
    nw, nh = max(1, round(w * s)), max(1, round(h * s))
    return cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA), np.array([nw / w, nh / h])
