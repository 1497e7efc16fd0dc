"""Test helpers of the re-ranking tests: textured synthetic scenes that RootSIFT can match, and model runs.

Two views of one scene (small random homographies, noise) share 35-85 RANSAC inliers; views of different
scenes share fewer than 10 (the re-ranker's minimum).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def scene(seed: int, h: int = 120, w: int = 160) -> np.ndarray:
    """A random arrangement of coloured rectangles and discs: ``(h, w, 3)`` uint8, one "landmark"."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), rng.integers(0, 255, 3), np.uint8)
    for _ in range(40):
        colour = tuple(int(v) for v in rng.integers(0, 255, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.rectangle(
                img, (x, y), (x + int(rng.integers(5, 30)), y + int(rng.integers(5, 30))), colour, -1
            )
        else:
            cv2.circle(img, (x, y), int(rng.integers(3, 15)), colour, -1)
    return cv2.GaussianBlur(img, (3, 3), 0)


def warp(img: np.ndarray, seed: int, jitter_px: float = 8.0, noise: float = 4.0) -> np.ndarray:
    """A view of ``img`` through a random homography (corners moved by up to ``jitter_px``) plus noise."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    src = np.float32([[0, 0], [w - 1, 0], [w - 1, h - 1], [0, h - 1]])
    dst = (src + rng.uniform(-jitter_px, jitter_px, src.shape)).astype(np.float32)
    out = cv2.warpPerspective(
        img, cv2.getPerspectiveTransform(src, dst), (w, h), borderMode=cv2.BORDER_REFLECT
    )
    return np.clip(out + rng.normal(0, noise, out.shape), 0, 255).astype(np.uint8)


def save(img: np.ndarray, path: Path) -> Path:
    """Write ``img`` as a JPEG (quality 95), creating folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95)
    return path


def make_scenes(root: Path, landmarks: dict[str, int], per_landmark: int = 3, seed: int = 0) -> Path:
    """``root/<landmark>/<landmark>_<i>.jpg``: ``per_landmark`` warped views of scene ``landmarks[name]``."""
    for name, s in landmarks.items():
        base = scene(s)
        for i in range(per_landmark):
            save(warp(base, seed * 1000 + s * 10 + i), root / name / f"{name}_{i}.jpg")
    return root


def make_queries(root: Path, landmarks: dict[str, int], seed: int = 7) -> dict[str, str]:
    """One new view of each landmark's scene, ``root/q_<landmark>.jpg``; returns ``{query id: landmark}``."""
    truth = {}
    for name, s in landmarks.items():
        save(warp(scene(s), 50_000 + seed * 100 + s), root / f"q_{name}.jpg")
        truth[f"q_{name}"] = name
    return truth


def make_run(path: Path, seed: int = 0, local_head: bool = False) -> Path:
    """A random-init ``test_resnet`` run (64 px, 64-d), optionally with the DELG-style local head."""
    import torch

    from landmarks.checkpoint import save_model
    from landmarks.config import to_dict
    from landmarks.data.transforms import Preprocess
    from landmarks.models.net import LandmarkNet, LocalConfig, ModelConfig

    torch.manual_seed(seed)
    conf = ModelConfig(
        backbone="test_resnet", embedding_dim=64, local=LocalConfig(enabled=local_head, hidden=32)
    )
    net = LandmarkNet(conf, num_classes=4)
    save_model(
        path,
        net,
        {
            "config": {"model": to_dict(conf)},
            "classes": {},
            "num_classes": 4,
            "preprocessing": Preprocess(64).to_dict(),
        },
    )
    return path
