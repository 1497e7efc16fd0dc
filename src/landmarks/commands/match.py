"""``landmarks match A B``: match two images with local features and RANSAC; print or draw the inliers.

Prints each image's keypoint count, the putative matches, the inliers and the 3x3 model mapping A's
pixels to B's. ``--json`` prints one object whose first keys are exactly::

    {"keypoints": [nA, nB], "matches": m, "inliers": i, "homography": [[...], [...], [...]] | null, ...}

followed by ``model``, ``model_3x3``, ``homography_inliers``, ``features`` and ``seed``. With
``--model homography`` or ``affine`` the homography is the fitted model (an affine map has last row
``0 0 1``). With ``--model fundamental`` (the default, as in re-ranking: landmarks are 3-D scenes),
``inliers`` counts the epipolar inliers and ``homography`` is fitted (same seed) to those inliers: the
map of the dominant plane, null when fewer than 5 inliers support one. The output depends only on
the images, the options and ``--seed``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from landmarks.errors import LandmarksError
from landmarks.utils.io import atomic_write_bytes

if TYPE_CHECKING:
    from landmarks.local_features import LocalFeatures
    from landmarks.verify import Verification

logger = logging.getLogger("landmarks")

_DRAW_FORMATS = (".png", ".jpg", ".jpeg", ".webp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks match``."""
    parser.add_argument("image_a", metavar="A", help="first image")
    parser.add_argument("image_b", metavar="B", help="second image")
    parser.add_argument(
        "--features",
        default=None,
        metavar="sift|RUN",
        help="local features: 'sift' (RootSIFT, no weights; the default) or a run directory with a "
        "local head",
    )
    parser.add_argument(
        "--index",
        type=Path,
        default=None,
        metavar="INDEX",
        help="use the local-feature settings recorded by this index (instead of --features)",
    )
    parser.add_argument(
        "--model",
        default="fundamental",
        choices=["fundamental", "homography", "affine"],
        help="geometric model for RANSAC (default: fundamental)",
    )
    parser.add_argument("--seed", type=int, default=0, help="RANSAC seed (default 0)")
    parser.add_argument(
        "--max-features",
        type=int,
        default=None,
        help="keypoints per image (default: 1000 for SIFT, the extractor's top N otherwise)",
    )
    parser.add_argument(
        "--threshold-px",
        type=float,
        default=None,
        help="RANSAC inlier threshold in pixels (default: per model and features)",
    )
    parser.add_argument(
        "--ratio", type=float, default=0.85, help="Lowe ratio test (>= 1 disables; default 0.85)"
    )
    parser.add_argument("--device", default="cpu", help="torch device for learned features (default cpu)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument(
        "--draw",
        type=Path,
        default=None,
        metavar="OUT.png",
        help="write the inlier matches side by side as an image (.png, .jpg, .webp)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``landmarks match``. Returns 0; user errors raise ``LandmarksError`` (exit status 2)."""
    from landmarks.data.decode import decode_image
    from landmarks.local_features import build_local_extractor
    from landmarks.rerank import index_extractor_from_dir
    from landmarks.verify import homography_from_inliers, verify

    if args.draw is not None and args.draw.suffix.lower() not in _DRAW_FORMATS:
        raise LandmarksError(f"--draw {args.draw}: unsupported image type (use {', '.join(_DRAW_FORMATS)})")
    if args.max_features is not None and args.max_features < 1:
        raise LandmarksError(f"--max-features must be positive, got {args.max_features}")
    img_a = decode_image(args.image_a)
    img_b = decode_image(args.image_b)
    if args.index is not None:
        if args.features is not None or args.max_features is not None:
            raise LandmarksError("--index sets the local features: drop --features / --max-features")
        extractor = index_extractor_from_dir(args.index, device=args.device)
        if extractor is None:
            raise LandmarksError(
                f"--index {args.index}: the index has no local features (`landmarks index --local`)"
            )
    else:
        extractor = build_local_extractor(
            args.features or "sift", device=args.device, max_features=args.max_features
        )
    t0 = time.perf_counter()
    fa = extractor(img_a)
    fb = extractor(img_b)
    t1 = time.perf_counter()
    threshold = args.threshold_px if args.threshold_px is not None else extractor.ransac_threshold_px
    ratio = args.ratio if args.ratio < 1.0 else None
    v = verify(fa, fb, args.model, args.seed, ratio=ratio, threshold_px=threshold)
    h = (
        v
        if args.model != "fundamental"
        else homography_from_inliers(fa, fb, v, args.seed, threshold_px=threshold)
    )
    t2 = time.perf_counter()
    logger.info("extraction %.0f ms, matching + RANSAC %.1f ms", (t1 - t0) * 1e3, (t2 - t1) * 1e3)
    homography = _normalised(h.model_3x3) if h.model_3x3 is not None else None
    result: dict[str, Any] = {
        "keypoints": [len(fa), len(fb)],
        "matches": len(v.matches),
        "inliers": v.num_inliers,
        "homography": homography.tolist() if homography is not None else None,
        "model": v.model,
        "model_3x3": v.model_3x3.tolist() if v.model_3x3 is not None else None,
        "homography_inliers": h.num_inliers,
        "features": extractor.name,
        "seed": args.seed,
    }
    if args.draw is not None:
        _draw(args.draw, img_a, img_b, fa, fb, v)
    if args.json:
        print(json.dumps(result))
    else:
        print(_text(args, result))
    return 0


def _normalised(m: np.ndarray) -> np.ndarray:
    """The 3x3 map scaled so that its bottom-right entry is 1 (when it is not ~0)."""
    return m / m[2, 2] if abs(m[2, 2]) > 1e-12 else m


def _draw(
    path: Path, img_a: np.ndarray, img_b: np.ndarray, fa: LocalFeatures, fb: LocalFeatures, v: Verification
) -> None:
    from landmarks.viz import draw_verification

    canvas = draw_verification(img_a, img_b, fa, fb, v)
    ok, buf = cv2.imencode(path.suffix.lower(), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))
    if not ok:
        raise LandmarksError(f"--draw {path}: could not encode the image")
    try:
        atomic_write_bytes(path, buf.tobytes())
    except OSError as e:
        raise LandmarksError(f"--draw {path}: cannot write: {e.strerror or e}") from None
    logger.info("wrote %s (%d inlier matches)", path, v.num_inliers)


def _text(args: argparse.Namespace, r: dict[str, Any]) -> str:
    lines = [
        f"A: {args.image_a}: {r['keypoints'][0]} keypoints ({r['features']})",
        f"B: {args.image_b}: {r['keypoints'][1]} keypoints",
        f"putative matches: {r['matches']}",
        f"inliers ({r['model']}, seed {r['seed']}): {r['inliers']}",
    ]
    if r["homography"] is None:
        lines.append("homography A -> B: none found")
    else:
        how = (
            ""
            if r["model"] != "fundamental"
            else f" (fitted to the fundamental inliers: {r['homography_inliers']} agree)"
        )
        lines.append(f"homography A -> B{how}:")
        lines += ["  [" + "  ".join(f"{x: .6g}" for x in row) + "]" for row in r["homography"]]
    return "\n".join(lines)
