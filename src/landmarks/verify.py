"""Matching and geometric verification of one pair of images' local features.

::

    v = verify(feats_a, feats_b, model="fundamental", seed=0)
    v.matches        # (M, 2) int64 putative matches (index into a, index into b)
    v.inlier_mask    # (M,) bool
    v.num_inliers    # int
    v.model_3x3      # (3, 3) float64 or None: H (x_b ~ H x_a), affine (last row 0 0 1) or F (x_b' F x_a = 0)

Putative matches are mutual nearest neighbours of L2-normalised descriptors with a ratio and/or
distance test, computed with one matrix product (no Python loop over features). The model is fitted
with OpenCV's USAC framework (MAGSAC++ scoring and sigma-consensus local optimisation by default),
seeded through ``UsacParams.randomGeneratorState`` and run single-threaded, so the same inputs and
seed give the same inliers in any process.

Pair-level only: verifying a query's candidates, the worker pool and the re-ranking scores live in
:mod:`landmarks.rerank`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from landmarks.local_features import LocalFeatures

GeometricModel = Literal["fundamental", "homography", "affine"]
MODELS: tuple[str, ...] = ("fundamental", "homography", "affine")
#: Fewest matches each model needs (minimal sample size + 1: a minimal sample always fits exactly).
MIN_MATCHES: dict[str, int] = {"fundamental": 8, "homography": 5, "affine": 4}
#: Default RANSAC thresholds in pixels for pixel-accurate keypoints (SIFT): reprojection error for
#: the homography and the affine map, distance to the epipolar line for the fundamental matrix.
DEFAULT_THRESHOLD_PX: dict[str, float] = {"fundamental": 2.0, "homography": 3.0, "affine": 5.0}
#: USAC presets: ``magsac`` = MAGSAC++ (uniform sampling, MAGSAC++ score, sigma-consensus LO,
#: MAGSAC final polishing); ``gc`` = Graph-Cut RANSAC with MSAC score; ``msac`` = plain MSAC + LSQ.
METHODS: tuple[str, ...] = ("magsac", "gc", "msac")


@dataclass
class Verification:
    """The outcome of verifying one image pair.

    Attributes:
        matches: ``(M, 2)`` int64 putative matches, column 0 indexes image A's features, column 1 B's.
        inlier_mask: ``(M,)`` bool, True for matches consistent with the model.
        num_inliers: ``inlier_mask.sum()``.
        model_3x3: ``(3, 3)`` float64 model or None when none was found: a homography or affine map
            (last row ``0 0 1``) with ``x_b ~ M x_a`` in pixels, or a fundamental matrix with
            ``x_b^T F x_a = 0``.
        model: which model was fitted (``fundamental``, ``homography``, ``affine``).
    """

    matches: np.ndarray
    inlier_mask: np.ndarray
    num_inliers: int
    model_3x3: np.ndarray | None
    model: str = "fundamental"

    @property
    def inlier_matches(self) -> np.ndarray:
        """``(I, 2)`` int64: the matches that are inliers."""
        return self.matches[self.inlier_mask]

    @classmethod
    def empty(cls, model: str, matches: np.ndarray | None = None) -> Verification:
        """No model: every match an outlier."""
        m = np.zeros((0, 2), np.int64) if matches is None else matches
        return cls(m, np.zeros(len(m), bool), 0, None, model)


# --------------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------------


def match_descriptors(
    desc_a: np.ndarray,
    desc_b: np.ndarray,
    ratio: float | None = 0.85,
    mutual: bool = True,
    max_distance: float | None = None,
) -> np.ndarray:
    """Nearest-neighbour matches from A to B, vectorised.

    Args:
        desc_a: ``(Na, D)`` float32, rows L2-normalised (distances are ``sqrt(2 - 2 a.b)``).
        desc_b: ``(Nb, D)`` float32, rows L2-normalised.
        ratio: keep ``i -> j`` only when ``d(i, j) < ratio * d(i, j2)`` with ``j2`` the second-nearest
            neighbour of ``i`` in B (Lowe's ratio test); None or >= 1 disables it (as does Nb < 2).
        mutual: keep only pairs where ``i`` is also the nearest neighbour of ``j`` in A.
        max_distance: keep only pairs with ``d(i, j) <= max_distance`` (None: no bound).

    Returns:
        ``(M, 2)`` int64 index pairs ``(i, j)``, sorted by ``i``. The nearest neighbour is the first
        index attaining the maximum similarity (``argmax`` semantics).
    """
    a = np.ascontiguousarray(desc_a, dtype=np.float32)
    b = np.ascontiguousarray(desc_b, dtype=np.float32)
    if a.ndim != 2 or b.ndim != 2 or (a.shape[1] != b.shape[1] and len(a) and len(b)):
        raise ValueError(f"descriptor shapes do not match: {a.shape} vs {b.shape}")
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64)
    # (Na, Nb) similarities; OpenCV's gemm follows cv2.setNumThreads (one thread in verify workers),
    # where NumPy's BLAS would start its own thread pool in every worker process.
    sim = np.asarray(cv2.gemm(a, b, 1.0, None, 0.0, flags=cv2.GEMM_2_T))  # type: ignore[call-overload]
    rows = np.arange(len(a))
    nn_ab = sim.argmax(axis=1)
    best = sim[rows, nn_ab]
    keep = np.ones(len(a), bool)
    if mutual:
        nn_ba = sim.argmax(axis=0)
        keep &= nn_ba[nn_ab] == rows
    d1 = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0))
    if max_distance is not None:
        keep &= d1 <= max_distance
    if ratio is not None and ratio < 1.0 and len(b) >= 2:
        sim[rows, nn_ab] = -np.inf  # sim is ours: knock out the best to find the second best
        second = sim.max(axis=1)
        d2 = np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0))
        keep &= d1 < ratio * d2
    idx = np.flatnonzero(keep)
    return np.stack([idx, nn_ab[idx]], axis=1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# Robust model fitting
# --------------------------------------------------------------------------------------------------


def usac_params(
    threshold_px: float,
    seed: int = 0,
    method: str = "magsac",
    max_iters: int = 10000,
    confidence: float = 0.9999,
) -> Any:
    """OpenCV ``UsacParams`` for a seeded, single-threaded (deterministic) USAC run."""
    if method not in METHODS:
        raise ValueError(f"unknown RANSAC method {method!r} (known: {', '.join(METHODS)})")
    p = cv2.UsacParams()
    p.threshold = float(threshold_px)
    p.confidence = float(confidence)
    p.maxIterations = int(max_iters)
    p.randomGeneratorState = int(seed) % (2**31)
    p.isParallel = False
    p.sampler = cv2.SAMPLING_UNIFORM
    if method == "magsac":
        p.score = cv2.SCORE_METHOD_MAGSAC
        p.loMethod = cv2.LOCAL_OPTIM_SIGMA
        p.loSampleSize = 50
        p.loIterations = 3
        p.final_polisher = cv2.MAGSAC
        p.final_polisher_iterations = 10
    elif method == "gc":
        p.score = cv2.SCORE_METHOD_MSAC
        p.loMethod = cv2.LOCAL_OPTIM_GC
        p.loSampleSize = 20
        p.loIterations = 3
        p.neighborsSearch = cv2.NEIGH_GRID
        p.final_polisher = cv2.COV_POLISHER
        p.final_polisher_iterations = 3
    else:
        p.score = cv2.SCORE_METHOD_MSAC
        p.loMethod = cv2.LOCAL_OPTIM_INNER_LO
        p.loSampleSize = 14
        p.loIterations = 5
        p.final_polisher = cv2.LSQ_POLISHER
        p.final_polisher_iterations = 3
    return p


def fit_model(
    pts_a: np.ndarray,
    pts_b: np.ndarray,
    model: str = "fundamental",
    threshold_px: float | None = None,
    seed: int = 0,
    method: str = "magsac",
    max_iters: int = 10000,
    confidence: float = 0.9999,
) -> tuple[np.ndarray | None, np.ndarray]:
    """Fit ``model`` to point correspondences with seeded USAC.

    Args:
        pts_a, pts_b: ``(M, 2)`` float pixel coordinates, row k of A corresponds to row k of B.
        model: ``fundamental``, ``homography`` or ``affine``.
        threshold_px: inlier threshold in pixels (default :data:`DEFAULT_THRESHOLD_PX`).

    Returns:
        ``(model_3x3 (3, 3) float64 or None, inlier_mask (M,) bool)``.
    """
    if model not in MODELS:
        raise ValueError(f"unknown geometric model {model!r} (known: {', '.join(MODELS)})")
    a = np.ascontiguousarray(pts_a, dtype=np.float64).reshape(-1, 2)
    b = np.ascontiguousarray(pts_b, dtype=np.float64).reshape(-1, 2)
    m = len(a)
    none = (None, np.zeros(m, bool))
    if m < MIN_MATCHES[model]:
        return none
    thr = DEFAULT_THRESHOLD_PX[model] if threshold_px is None else float(threshold_px)
    params = usac_params(thr, seed, method, max_iters, confidence)
    try:
        if model == "homography":
            mat, mask = cv2.findHomography(a, b, params)
        elif model == "affine":
            mat, mask = cv2.estimateAffine2D(a, b, params)
            if mat is not None and mat.size == 6:
                mat = np.vstack([mat.reshape(2, 3), [0.0, 0.0, 1.0]])
        else:
            mat, mask = cv2.findFundamentalMat(a, b, params)
    except cv2.error:  # degenerate configurations (all points collinear, duplicates)
        return none
    if mat is None or mask is None or np.asarray(mat).shape != (3, 3) or not np.all(np.isfinite(mat)):
        return none
    inliers = np.asarray(mask).reshape(-1).astype(bool)
    if len(inliers) != m or not inliers.any():
        return none
    mat = np.asarray(mat, dtype=np.float64)
    if model != "fundamental" and abs(mat[2, 2]) > 1e-12:
        mat = mat / mat[2, 2]
    return mat, inliers


def verify(
    feats_a: LocalFeatures,
    feats_b: LocalFeatures,
    model: str = "fundamental",
    seed: int = 0,
    *,
    ratio: float | None = 0.85,
    mutual: bool = True,
    max_distance: float | None = None,
    threshold_px: float | None = None,
    method: str = "magsac",
    max_iters: int = 10000,
    confidence: float = 0.9999,
    matches: np.ndarray | None = None,
) -> Verification:
    """Match two images' local features and verify the matches geometrically.

    Args:
        feats_a, feats_b: the two images' :class:`LocalFeatures`.
        model: ``fundamental`` (3-D scenes; the default), ``homography`` (planes, rotations) or
            ``affine`` (the DELF recipe's model).
        seed: RANSAC seed; the same inputs and seed give the same result in any process.
        ratio, mutual, max_distance: the matching tests of :func:`match_descriptors`.
        threshold_px: inlier threshold in pixels of the original images (default per model,
            :data:`DEFAULT_THRESHOLD_PX`; use the extractor's ``ransac_threshold_px`` when it has one).
        method: USAC preset (:data:`METHODS`), ``magsac`` = MAGSAC++.
        matches: precomputed ``(M, 2)`` matches (skips matching).

    Returns:
        :class:`Verification` (``num_inliers`` 0 and ``model_3x3`` None when no model is found).
    """
    if model not in MODELS:
        raise ValueError(f"unknown geometric model {model!r} (known: {', '.join(MODELS)})")
    if matches is None:
        matches = match_descriptors(
            feats_a.descriptors, feats_b.descriptors, ratio=ratio, mutual=mutual, max_distance=max_distance
        )
    matches = np.asarray(matches, dtype=np.int64).reshape(-1, 2)
    mat, mask = fit_model(
        feats_a.keypoints[matches[:, 0]],
        feats_b.keypoints[matches[:, 1]],
        model,
        threshold_px,
        seed,
        method,
        max_iters,
        confidence,
    )
    return Verification(matches, mask, int(mask.sum()), mat, model)


def homography_from_inliers(
    feats_a: LocalFeatures,
    feats_b: LocalFeatures,
    v: Verification,
    seed: int = 0,
    threshold_px: float | None = None,
    method: str = "magsac",
) -> Verification:
    """A homography fitted (seeded USAC) to the inliers of another verification, e.g. a fundamental one.

    With a fundamental matrix there is no map from A's pixels to B's; the dominant plane among its
    inliers gives one. Returns a ``homography`` :class:`Verification` over ``v``'s inlier matches.
    """
    if v.model == "homography":
        return v
    return verify(
        feats_a,
        feats_b,
        "homography",
        seed,
        matches=v.inlier_matches,
        threshold_px=threshold_px,
        method=method,
    )
