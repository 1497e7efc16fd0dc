"""Test helpers of the index/recognize tests: a tiny deterministic embedder and synthetic landmark images.

The embedder projects mean-subtracted 8x8 average-pooled pixels with a fixed random matrix, so two
noisy views of one synthetic "landmark" pattern embed close together and unrelated patterns do not.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclass(frozen=True)
class TinyPreprocess:
    """Resize to ``size``², normalise with mean 0.5 / std 0.25: what DataLoader workers receive."""

    size: int

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).float()[None] / 255.0
        t = F.interpolate(
            t, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False
        )[0]
        return (t - 0.5) / 0.25


class TinyEmbedder:
    """A deterministic :class:`landmarks.extract.Embedder` for tests (no training, no weights)."""

    def __init__(
        self,
        dim: int = 32,
        size: int = 32,
        seed: int = 0,
        delay_s: float = 0.0,
        source: str | None = None,
        block_after: int | None = None,
    ):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(3 * 8 * 8, dim, generator=g)
        self.seed = seed
        self.dim = dim
        self.size = size
        self.delay_s = delay_s
        self.source = source
        self.block_after = block_after  # embed() calls after which the next one never returns (kill tests)
        self.calls = 0

    @classmethod
    def from_run(cls, run: str | Path, device: Any = "cpu") -> TinyEmbedder:
        """Read ``tiny.json`` (seed, dim, delay_s, block_after) from a fake run folder."""
        conf = json.loads((Path(run) / "tiny.json").read_text())
        return cls(source=str(Path(run).absolute()), **conf)

    @property
    def fingerprint(self) -> str:
        return f"tiny{self.seed:04d}{self.dim:04d}" + "0" * 24

    @property
    def embedding_dim(self) -> int:
        return self.dim

    @property
    def image_size(self) -> int:
        return self.size

    @property
    def preprocessor(self) -> TinyPreprocess:
        return TinyPreprocess(self.size)

    def preprocess(self, img: np.ndarray) -> torch.Tensor:
        return self.preprocessor(img)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        if self.block_after is not None and self.calls >= self.block_after:
            threading.Event().wait()  # never set: the process waits here to be killed
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        p = F.adaptive_avg_pool2d(batch.float(), 8).flatten(1)
        p = p - p.mean(dim=1, keepdim=True)
        return F.normalize(p @ self.proj, dim=1)

    def describe(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "name": f"tiny-{self.seed}",
            "embedding_dim": self.dim,
            "image_size": self.size,
            "source": self.source,
        }


def write_tiny_run(
    path: Path, seed: int = 0, dim: int = 32, delay_s: float = 0.0, block_after: int | None = None
) -> Path:
    """A fake model run folder read by :meth:`TinyEmbedder.from_run`."""
    path.mkdir(parents=True, exist_ok=True)
    conf = {
        "seed": seed,
        "dim": dim,
        "delay_s": delay_s,
        **({"block_after": block_after} if block_after else {}),
    }
    (path / "tiny.json").write_text(json.dumps(conf))
    return path


def pattern(seed: int, h: int = 96, w: int = 128) -> np.ndarray:
    """A smooth random RGB pattern, ``(h, w, 3)`` float32 in 0..255: one synthetic "landmark"."""
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(6, 8, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)


def view(base: np.ndarray, seed: int, noise: float = 12.0) -> np.ndarray:
    """A noisy, slightly brightened view of a pattern: ``(h, w, 3)`` uint8."""
    rng = np.random.default_rng(seed)
    img = base * rng.uniform(0.9, 1.1) + rng.normal(0, noise, size=base.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def save_jpeg(img: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=92)
    return path


def make_collection(root: Path, landmarks: dict[str, int], per_landmark: int = 4, seed: int = 0) -> Path:
    """``root/<landmark>/<i>.jpg``: ``per_landmark`` views of the pattern ``landmarks[name]``."""
    for name, pat in landmarks.items():
        base = pattern(pat)
        for i in range(per_landmark):
            save_jpeg(view(base, seed * 1000 + pat * 100 + i), root / name / f"{name}_{i}.jpg")
    return root


def write_bad_images(folder: Path) -> list[Path]:
    """A zero-byte file, a truncated JPEG and a text file named .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    good = folder / ".tmp_good.jpg"
    save_jpeg(view(pattern(999), 1), good)
    data = good.read_bytes()
    good.unlink()
    trunc = folder / "truncated.jpg"
    trunc.write_bytes(data[: len(data) // 3])
    text = folder / "notes.jpg"
    text.write_text("not an image")
    return [empty, trunc, text]
