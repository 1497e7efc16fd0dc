"""PCA-whitening learned without labels (cnnimageretrieval's "PCA-w"): pure functions + a small record.

Given ``X (N, D)`` L2-normalised embeddings (the indexed images themselves), :func:`learn_whitening`
computes the mean ``m (D,)``, the covariance ``C = (X − m)ᵀ(X − m) / N`` and its eigendecomposition
``C = V diag(λ) Vᵀ`` (λ descending), keeps the first ``dim`` components and returns the projection
``P = V[:, :dim] / sqrt(λ[:dim] + s · mean(λ))`` (``s`` = ``shrinkage``, relative to the mean
eigenvalue so that it does not depend on D or on the embeddings' scale). :func:`apply_whitening` maps
``x -> normalize((x − m) P)``: ``(n, D) -> (n, dim)`` float32, L2-normalised.

Why it helps a descriptor that was never trained for retrieval (an ImageNet backbone + GeM): the
first components of such features are dominated by a few directions shared by all photos (sky,
texture, exposure); centring removes the shared mean and whitening equalises the variance of the rest,
so the cosine similarity weighs the discriminative directions (Radenović et al., "Fine-tuning CNN image
retrieval with no human annotation", 2018; Jégou & Chum, "Negative evidences and co-occurrences in
image retrieval", 2012). Shrinkage damps the smallest eigenvalues, which are estimated from few images
and would otherwise amplify noise.

The rank of ``C`` is at most ``N − 1``: ``dim`` is capped there (:func:`effective_dim`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landmarks.errors import ConfigError, IncompatibleArtifactError

#: Components kept by default: at most this many (and at most N − 1).
DEFAULT_DIM = 256


@dataclass
class WhitenConfig:
    """PCA-whitening learned on the index images at index time."""

    dim: int | None = None  # components kept (None: min(256, D, N − 1))
    shrinkage: float = 1.0  # s in 1/sqrt(λ + s · mean(λ)): 0 = full whitening; larger = closer to plain PCA
    # learn on the non-landmark set too (when the index has one): more images, the same "no labels"
    with_non_landmarks: bool = True

    def __post_init__(self) -> None:
        if self.dim is not None and self.dim < 1:
            raise ConfigError(f"whitening dim must be >= 1, got {self.dim}")
        if not self.shrinkage >= 0:
            raise ConfigError(f"whitening shrinkage must be >= 0, got {self.shrinkage}")


@dataclass
class Whitening:
    """A learned whitening: ``mean (D,)`` float64 and ``proj (D, dim)`` float64, plus how it was learned."""

    mean: np.ndarray
    proj: np.ndarray
    eigenvalues: np.ndarray  # (dim,) float64, descending: the variance of each kept component
    shrinkage: float
    n_train: int

    @property
    def in_dim(self) -> int:
        """D, the width of the embeddings it takes."""
        return int(self.proj.shape[0])

    @property
    def dim(self) -> int:
        """The width of the embeddings it returns."""
        return int(self.proj.shape[1])

    def digest(self) -> str:
        """SHA-256 of the parameters (part of an index's identity)."""
        h = hashlib.sha256()
        for a in (self.mean, self.proj):
            arr = np.ascontiguousarray(a, dtype=np.float64)
            h.update(f"{arr.shape}|".encode())
            h.update(arr.tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        """JSON-ready summary: ``{"in_dim", "dim", "shrinkage", "n_train", "sha256"}``."""
        return {
            "in_dim": self.in_dim,
            "dim": self.dim,
            "shrinkage": self.shrinkage,
            "n_train": self.n_train,
            "sha256": self.digest(),
        }


def effective_dim(d: int, n: int, dim: int | None) -> int:
    """Components that can be kept from ``n`` rows of width ``d``: ``min(dim or 256, d, n − 1)``, at least 1."""
    want = DEFAULT_DIM if dim is None else dim
    return int(max(1, min(want, d, n - 1)))


def learn_whitening(x: np.ndarray, dim: int | None = None, shrinkage: float = 1.0) -> Whitening:
    """Learn PCA-whitening on ``x (N, D)`` float32 (rows = images); see the module docstring.

    Raises :class:`ConfigError` when fewer than 2 rows are given.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ConfigError(f"whitening needs at least 2 embeddings, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ConfigError("whitening: the embeddings contain NaN or infinite values")
    n, d = x.shape
    k = effective_dim(d, n, dim)
    mean = x.mean(axis=0)
    xc = x - mean
    cov = (xc.T @ xc) / n
    cov = (cov + cov.T) / 2
    lam, vec = np.linalg.eigh(cov)  # ascending
    order = np.argsort(-lam, kind="stable")
    lam, vec = np.maximum(lam[order], 0.0), vec[:, order]
    # a deterministic sign per component: the largest-magnitude entry is positive
    flip = np.sign(vec[np.argmax(np.abs(vec), axis=0), np.arange(d)])
    vec = vec * np.where(flip == 0, 1.0, flip)
    floor = shrinkage * float(lam.mean()) if lam.mean() > 0 else 0.0
    scale = np.sqrt(lam[:k] + floor)
    scale = np.where(scale > 0, scale, 1.0)
    return Whitening(
        mean=mean, proj=vec[:, :k] / scale, eigenvalues=lam[:k], shrinkage=float(shrinkage), n_train=n
    )


def apply_whitening(x: np.ndarray, w: Whitening) -> np.ndarray:
    """``x (n, D)`` -> ``normalize((x − mean) @ proj)`` ``(n, dim)`` float32, L2-normalised.

    Raises :class:`IncompatibleArtifactError` when ``D`` is not the whitening's input width.
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != w.in_dim:
        raise IncompatibleArtifactError(f"whitening takes ({w.in_dim})-wide embeddings, got shape {x.shape}")
    if len(x) == 0:
        return np.zeros((0, w.dim), np.float32)
    y = (x.astype(np.float64) - w.mean) @ w.proj
    norm = np.linalg.norm(y, axis=1, keepdims=True)
    return np.ascontiguousarray(y / np.maximum(norm, 1e-12), dtype=np.float32)


# --- files ------------------------------------------------------------------------------------------


def save_whitening(path: str | Path, w: Whitening) -> None:
    """Write ``w`` as one safetensors file (tensors + a JSON header), atomically."""
    import torch
    from safetensors.torch import save_file

    from landmarks.utils.io import atomic_save

    tensors = {
        "mean": torch.from_numpy(np.ascontiguousarray(w.mean)),
        "proj": torch.from_numpy(np.ascontiguousarray(w.proj)),
        "eigenvalues": torch.from_numpy(np.ascontiguousarray(w.eigenvalues)),
    }
    meta = {"landmarks_whitening": json.dumps(w.describe())}
    atomic_save(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_whitening(path: str | Path, expect_sha256: str | None = None) -> Whitening:
    """Read :func:`save_whitening`'s file; with ``expect_sha256``, refuse other parameters."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            info = json.loads((f.metadata() or {})["landmarks_whitening"])
            arrays = {k: f.get_tensor(k) for k in ("mean", "proj", "eigenvalues")}
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise IncompatibleArtifactError(f"{path}: not a readable whitening file ({e})") from e
    w = Whitening(
        mean=np.asarray(arrays["mean"], np.float64),
        proj=np.asarray(arrays["proj"], np.float64),
        eigenvalues=np.asarray(arrays["eigenvalues"], np.float64),
        shrinkage=float(info["shrinkage"]),
        n_train=int(info["n_train"]),
    )
    if expect_sha256 is not None and w.digest() != expect_sha256:
        raise IncompatibleArtifactError(
            f"{path}: whitening parameters do not match the index's meta.json "
            "(file corrupt or replaced); rebuild the index"
        )
    return w
