"""Local features behind one interface: RootSIFT (weight-free) and DELG-style attention keypoints.

An extractor is a callable ``(H, W, 3) uint8 RGB -> LocalFeatures``::

    extractor = make_local_extractor("sift")           # or ("model", loaded_run_with_a_local_head)
    feats = extractor(decode_image("a.jpg"))
    same = extractor_from_info(extractor.to_info())    # the settings travel with the features
    feats.keypoints    # (N, 2) float32, x, y in pixels of the ORIGINAL image (pixel centres at integers)
    feats.descriptors  # (N, D) float32, L2-normalised rows
    feats.scores       # (N,) float32, detector response (SIFT) or attention score (DELG), descending

:class:`LocalFeatureStore` keeps the features of many images on disk for ``landmarks index --local``:
float16 descriptors and float32 keypoints in chunks of ``.npy`` files that are memory-mapped on read,
each chunk committed atomically by its JSON table, so an interrupted job resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import cv2
import numpy as np

from landmarks.errors import IncompatibleArtifactError, LandmarksError
from landmarks.utils.io import atomic_save, read_json, write_json

logger = logging.getLogger("landmarks")

#: Pyramid scales of DELG: 0.25 ... 2.0 by factors of sqrt(2).
DEFAULT_SCALES: tuple[float, ...] = tuple(round(2.0 ** (k / 2.0), 4) for k in range(-4, 3))
#: ImageNet statistics, used when a model's metadata carries none.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class LocalFeatures:
    """The local features of one image.

    Attributes:
        keypoints: ``(N, 2)`` float32, ``x, y`` in pixels of the original image (the centre of the
            top-left pixel is ``(0, 0)``).
        descriptors: ``(N, D)`` float32, rows L2-normalised.
        scores: ``(N,)`` float32, detector response or attention score (higher is stronger).
        image_size: ``(width, height)`` of the original image in pixels.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        self.keypoints = np.ascontiguousarray(self.keypoints, dtype=np.float32).reshape(-1, 2)
        desc = np.asarray(self.descriptors, dtype=np.float32)
        if desc.ndim != 2:
            raise ValueError(f"descriptors must be (N, D), got shape {desc.shape}")
        self.descriptors = np.ascontiguousarray(desc)
        self.scores = np.ascontiguousarray(self.scores, dtype=np.float32).reshape(-1)
        n = len(self.keypoints)
        if len(self.descriptors) != n or len(self.scores) != n:
            raise ValueError(
                f"inconsistent feature counts: {n} keypoints, {len(self.descriptors)} descriptors, "
                f"{len(self.scores)} scores"
            )
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""
        return int(self.descriptors.shape[1])

    @classmethod
    def empty(cls, dim: int, image_size: tuple[int, int]) -> LocalFeatures:
        """No features (a blank or tiny image)."""
        return cls(
            np.zeros((0, 2), np.float32), np.zeros((0, dim), np.float32), np.zeros(0, np.float32), image_size
        )


@runtime_checkable
class LocalExtractor(Protocol):
    """What every local-feature extractor provides (the classes of :data:`EXTRACTORS`)."""

    #: Short name, the key of :data:`EXTRACTORS` and ``to_info()["name"]``: ``"rootsift"`` or ``"delg"``.
    name: ClassVar[str]
    #: The value of ``landmarks index --local`` that selects it: ``"sift"`` or ``"model"``.
    features: ClassVar[str]
    #: True when it runs a model (extracted in the main process); False: weight-free, picklable, run
    #: in the worker processes that decode the images.
    needs_model: ClassVar[bool]
    #: Descriptor dimension D.
    dim: int
    #: RANSAC threshold in pixels suited to the keypoint precision (None: the verifier's defaults).
    ransac_threshold_px: float | None

    def __call__(self, img: np.ndarray) -> LocalFeatures:
        """Extract from an ``(H, W, 3)`` uint8 RGB image."""
        ...

    def to_info(self) -> dict[str, Any]:
        """JSON-ready description (name, parameters, model fingerprint); equal info = same features.

        :func:`extractor_from_info` rebuilds the same extractor from it."""
        ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``(N, D)`` scaled to unit L2 norm (zero rows stay zero); float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def root_sift(desc: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """RootSIFT (Arandjelović & Zisserman 2012): L1-normalise, square root, L2-normalise.

    ``desc``: ``(N, 128)`` non-negative SIFT descriptors. Returns ``(N, 128)`` float32 with unit L2
    norm, so that the dot product of two RootSIFT vectors is the Hellinger kernel of the SIFTs.
    """
    d = np.asarray(desc, dtype=np.float32)
    d = np.maximum(d, 0.0)
    d = d / np.maximum(d.sum(axis=1, keepdims=True), eps)
    return l2_normalize(np.sqrt(d), eps)


def _to_gray(img: np.ndarray) -> np.ndarray:
    if img.ndim == 2:
        return img
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    return cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)


def _check_image(img: np.ndarray) -> None:
    if (
        not isinstance(img, np.ndarray)
        or img.dtype != np.uint8
        or img.ndim not in (2, 3)
        or min(img.shape[:2]) < 1
    ):
        shape = getattr(img, "shape", None)
        dtype = getattr(img, "dtype", None)
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {shape} dtype {dtype}")


def _resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    h, w = img.shape[:2]
    if (w, h) == (width, height):
        return img
    interp = cv2.INTER_AREA if width < w else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interp)


def map_to_original(xy: np.ndarray, scale_x: float, scale_y: float) -> np.ndarray:
    """Map ``(N, 2)`` pixel coordinates of a resized image back to the original image.

    A resize by ``scale`` maps pixel centres as ``x_new + 0.5 = (x_orig + 0.5) * scale`` (the
    convention of ``cv2.resize``), so ``x_orig = (x_new + 0.5) / scale - 0.5``.
    """
    out = np.asarray(xy, dtype=np.float64).reshape(-1, 2).copy()
    out[:, 0] = (out[:, 0] + 0.5) / scale_x - 0.5
    out[:, 1] = (out[:, 1] + 0.5) / scale_y - 0.5
    return out.astype(np.float32)


class SiftExtractor:
    """RootSIFT keypoints from OpenCV's SIFT; weight-free.

    The image is converted to gray and, when its longer side exceeds ``max_side_px``, resized down
    first; keypoints are mapped back to the original image's pixels. At most ``max_features``
    keypoints are kept, the strongest by detector response, ordered by decreasing response.
    """

    name: ClassVar[str] = "rootsift"
    features: ClassVar[str] = "sift"
    needs_model: ClassVar[bool] = False
    dim = 128
    #: None: the verifier's per-model defaults (SIFT keypoints are pixel-accurate).
    ransac_threshold_px: float | None = None
    #: Constructor arguments recorded by :meth:`to_info` (the rest of the info is derived).
    PARAMS: ClassVar[tuple[str, ...]] = (
        "max_features",
        "max_side_px",
        "contrast_threshold",
        "edge_threshold",
        "root",
    )
    #: The argument that caps the features per image.
    COUNT_PARAM: ClassVar[str] = "max_features"

    def __init__(
        self,
        max_features: int = 1000,
        max_side_px: int | None = 1024,
        contrast_threshold: float = 0.02,
        edge_threshold: float = 10.0,
        root: bool = True,
    ):
        """
        Args:
            max_features: keep the ``max_features`` strongest keypoints (> 0).
            max_side_px: resize images whose longer side is larger to this size first (None: never).
            contrast_threshold: OpenCV SIFT contrast threshold (lower: more keypoints on flat images).
                0.02 (OpenCV's default: 0.04) doubles the keypoints on small, low-contrast images
                (median 107 -> 229 on the 256 px synthetic set) and lets more true pairs pass
                verification; on large photos ``max_features`` caps the count anyway.
            edge_threshold: OpenCV SIFT edge threshold.
            root: RootSIFT (True) or plain L2-normalised SIFT (False).
        """
        if max_features < 1:
            raise ValueError(f"max_features must be positive, got {max_features}")
        if max_side_px is not None and max_side_px < 16:
            raise ValueError(f"max_side_px must be at least 16, got {max_side_px}")
        self.max_features = int(max_features)
        self.max_side_px = max_side_px
        self.contrast_threshold = float(contrast_threshold)
        self.edge_threshold = float(edge_threshold)
        self.root = bool(root)

    def to_info(self) -> dict[str, Any]:
        """JSON-ready description of this extractor (:meth:`from_info` rebuilds it)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "max_features": self.max_features,
            "max_side_px": self.max_side_px,
            "contrast_threshold": self.contrast_threshold,
            "edge_threshold": self.edge_threshold,
            "root": self.root,
            "ransac_threshold_px": self.ransac_threshold_px,
        }

    @classmethod
    def from_info(cls, info: dict[str, Any], loaded_model: Any = None) -> SiftExtractor:
        """The extractor described by :meth:`to_info` (``loaded_model`` is not used: SIFT has no weights)."""
        return cls(**{k: info[k] for k in cls.PARAMS if k in info})

    def __call__(self, img: np.ndarray) -> LocalFeatures:
        """Extract from an ``(H, W, 3)`` (or ``(H, W)``) uint8 image. Returns :class:`LocalFeatures`."""
        _check_image(img)
        gray = _to_gray(img)
        h, w = gray.shape[:2]
        sx = sy = 1.0
        if self.max_side_px is not None and max(h, w) > self.max_side_px:
            s = self.max_side_px / max(h, w)
            nw, nh = max(1, round(w * s)), max(1, round(h * s))
            gray = _resize(gray, nw, nh)
            sx, sy = nw / w, nh / h
        # A detector per call: cheap, and safe when one extractor serves several threads.
        sift = cv2.SIFT.create(
            nfeatures=self.max_features,
            contrastThreshold=self.contrast_threshold,
            edgeThreshold=self.edge_threshold,
        )
        kps, desc = sift.detectAndCompute(gray, None)
        if desc is None or len(kps) == 0:
            return LocalFeatures.empty(self.dim, (w, h))
        xy = np.array([kp.pt for kp in kps], dtype=np.float32).reshape(-1, 2)
        resp = np.array([kp.response for kp in kps], dtype=np.float32)
        order = np.argsort(-resp, kind="stable")[: self.max_features]
        xy, resp, desc = xy[order], resp[order], desc[order]
        if sx != 1.0 or sy != 1.0:
            xy = map_to_original(xy, sx, sy)
        desc = root_sift(desc) if self.root else l2_normalize(desc)
        return LocalFeatures(xy, desc, resp, (w, h))


class DelgExtractor:
    """DELG-style local features from a model's attention head, over an image pyramid.

    For every scale ``s`` of the pyramid the image is resized by ``s`` (capped so that its longer
    side stays at most ``max_side_px``; scales that collapse onto the same size are run once), the
    model gives an attention map and 128-d descriptors at stride ``local_stride``; each feature-map
    cell ``(i, j)`` is placed at the centre of its receptive field,
    ``j * stride - padding + (rf - 1) / 2`` in the resized image, and mapped back to the original
    image's pixels. Across all scales, the ``top_n`` cells with the highest attention at or above
    ``threshold`` are kept (ties broken by scale order, then row-major position).

    The model contract (``landmarks.models``): ``local_features(x (B, 3, H, W)) -> (attention
    (B, h, w) >= 0, descriptors (B, D, h, w))``, ``local_stride: int``,
    ``local_receptive_field: (rf, padding)`` and ``has_local_head: bool``.
    """

    name: ClassVar[str] = "delg"
    features: ClassVar[str] = "model"
    needs_model: ClassVar[bool] = True
    #: Constructor arguments recorded by :meth:`to_info` (the rest is derived from the model).
    PARAMS: ClassVar[tuple[str, ...]] = (
        "scales",
        "max_side_px",
        "top_n",
        "threshold",
        "mean",
        "std",
        "ransac_threshold_px",
    )
    #: The argument that caps the features per image.
    COUNT_PARAM: ClassVar[str] = "top_n"

    def __init__(
        self,
        loaded_model: Any,
        scales: Sequence[float] = DEFAULT_SCALES,
        max_side_px: int = 1024,
        top_n: int = 1000,
        threshold: float = 0.0,
        *,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        min_side_px: int | None = None,
        ransac_threshold_px: float = 20.0,
    ):
        """
        Args:
            loaded_model: a ``landmarks.checkpoint.LoadedModel`` (``.model``, ``.meta``,
                ``.fingerprint``) or the ``LandmarkNet``-like module itself.
            scales: pyramid scales relative to the original image.
            max_side_px: no pyramid level has a longer side above this.
            top_n: keep at most this many features per image, by attention.
            threshold: keep only cells whose attention is at least this.
            mean, std: input normalisation (default: the model's metadata, else ImageNet's).
            min_side_px: skip levels whose shorter side is below this (default: 2 x stride).
            ransac_threshold_px: suggested RANSAC threshold: DELG keypoints are receptive-field
                centres, precise to about a stride (DELF's matcher uses 20 px).
        """
        module = getattr(loaded_model, "model", loaded_model)
        meta = getattr(loaded_model, "meta", None) or {}
        if not getattr(module, "has_local_head", False):
            raise IncompatibleArtifactError(
                "this model has no local-feature head (train one, or use --features sift)"
            )
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive, got {list(scales)}")
        if top_n < 1:
            raise ValueError(f"top_n must be positive, got {top_n}")
        self.model = module
        self.scales = tuple(float(s) for s in scales)
        self.max_side_px = int(max_side_px)
        self.top_n = int(top_n)
        self.threshold = float(threshold)
        self.stride = int(module.local_stride)
        rf, pad = module.local_receptive_field
        self.receptive_field = (float(rf), float(pad))
        self.min_side_px = int(min_side_px) if min_side_px is not None else 2 * self.stride
        self.dim = self._probe_dim()
        self.ransac_threshold_px: float | None = float(ransac_threshold_px)
        prep = meta.get("preprocessing") or meta.get("preprocess") or {}
        self.mean = tuple(float(v) for v in (mean if mean is not None else prep.get("mean", IMAGENET_MEAN)))
        self.std = tuple(float(v) for v in (std if std is not None else prep.get("std", IMAGENET_STD)))
        self.fingerprint = str(getattr(loaded_model, "fingerprint", "") or "")

    def _probe_dim(self) -> int:
        """Descriptor width D, read from one forward pass on a blank image (never guessed)."""
        import torch

        try:
            device = next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            device = torch.device("cpu")
        side = max(64, 4 * self.stride)
        with torch.inference_mode():
            _, desc = self.model.local_features(torch.zeros(1, 3, side, side, device=device))
        return int(desc.shape[1])

    @classmethod
    def from_info(cls, info: dict[str, Any], loaded_model: Any = None) -> DelgExtractor:
        """The extractor described by :meth:`to_info`, on ``loaded_model`` (a run with a local head).

        Raises :class:`IncompatibleArtifactError` when there is no model or its fingerprint is not
        the one recorded (the features would differ)."""
        if loaded_model is None:
            raise IncompatibleArtifactError("DELG local features need the model run they were extracted with")
        ext = cls(loaded_model, **{k: info[k] for k in cls.PARAMS if k in info})
        want = str(info.get("fingerprint") or "")
        if want and ext.fingerprint != want:
            raise IncompatibleArtifactError(
                f"the local features come from model {want[:12]}, not {ext.fingerprint[:12]}"
            )
        return ext

    def to_info(self) -> dict[str, Any]:
        """JSON-ready description: parameters and the model fingerprint (:meth:`from_info` rebuilds it)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "scales": list(self.scales),
            "max_side_px": self.max_side_px,
            "top_n": self.top_n,
            "threshold": self.threshold,
            "stride": self.stride,
            "receptive_field": list(self.receptive_field),
            "mean": list(self.mean),
            "std": list(self.std),
            "fingerprint": self.fingerprint,
            "ransac_threshold_px": self.ransac_threshold_px,
        }

    def pyramid_sizes(self, width: int, height: int) -> list[tuple[int, int]]:
        """The ``(w, h)`` of each pyramid level for an image of ``width x height``, deduplicated.

        Each scale is capped so the longer side is at most ``max_side_px``; levels whose shorter side
        is below ``min_side_px`` are skipped (when all are, the largest allowed level is kept).
        """
        side = max(width, height)
        cap = self.max_side_px / side
        sizes: list[tuple[int, int]] = []
        for s in self.scales:
            s_eff = min(s, cap)
            size = (max(1, round(width * s_eff)), max(1, round(height * s_eff)))
            if min(size) < self.min_side_px or size in sizes:
                continue
            sizes.append(size)
        if not sizes:
            s_eff = min(max(self.scales), cap)
            sizes.append((max(1, round(width * s_eff)), max(1, round(height * s_eff))))
        return sizes

    def cell_centres(self, h: int, w: int) -> np.ndarray:
        """``(h * w, 2)`` float64 receptive-field centres ``x, y`` of a feature map, row-major, in the
        pixels of the image that was fed to the model."""
        rf, pad = self.receptive_field
        off = -pad + (rf - 1.0) / 2.0
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
        return np.stack([xs.ravel() * self.stride + off, ys.ravel() * self.stride + off], axis=1)

    def __call__(self, img: np.ndarray) -> LocalFeatures:
        """Extract from an ``(H, W, 3)`` uint8 RGB image. Returns :class:`LocalFeatures`, at most
        ``top_n`` features ordered by decreasing attention."""
        import torch

        _check_image(img)
        if img.ndim == 2:
            img = np.repeat(img[:, :, None], 3, axis=2)
        height, width = img.shape[:2]
        try:
            device = next(self.model.parameters()).device
        except (StopIteration, AttributeError):
            device = torch.device("cpu")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        all_xy, all_desc, all_score = [], [], []
        with torch.inference_mode():
            for w, h in self.pyramid_sizes(width, height):
                level = np.require(_resize(img, w, h), dtype=np.uint8, requirements=["C", "W"])
                x = torch.from_numpy(level).to(device).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
                x = (x - mean) / std
                att, desc = self.model.local_features(x)
                att = att[0].float()
                desc = desc[0].float()
                fh, fw = att.shape
                if fh == 0 or fw == 0:
                    continue
                score = att.reshape(-1).cpu().numpy()
                keep = np.flatnonzero(score >= self.threshold)
                if len(keep) > self.top_n:  # per-level pre-selection; the final cut is global
                    keep = keep[np.argsort(-score[keep], kind="stable")[: self.top_n]]
                    keep.sort()
                if len(keep) == 0:
                    continue
                d = desc.reshape(desc.shape[0], -1)[:, torch.from_numpy(keep).to(desc.device)].T
                centres = self.cell_centres(fh, fw)[keep]
                all_xy.append(map_to_original(centres, w / width, h / height))
                all_desc.append(d.cpu().numpy())
                all_score.append(score[keep])
        if not all_xy:
            return LocalFeatures.empty(self.dim, (width, height))
        xy = np.concatenate(all_xy)
        desc_np = np.concatenate(all_desc)
        scores = np.concatenate(all_score).astype(np.float32)
        order = np.argsort(-scores, kind="stable")[: self.top_n]
        xy = xy[order]
        xy[:, 0] = np.clip(xy[:, 0], 0.0, width - 1.0)
        xy[:, 1] = np.clip(xy[:, 1], 0.0, height - 1.0)
        return LocalFeatures(xy, l2_normalize(desc_np[order]), scores[order], (width, height))


#: The local-feature extractors by ``name`` (the ``"name"`` of their ``to_info()``).
EXTRACTORS: dict[str, type[SiftExtractor] | type[DelgExtractor]] = {
    SiftExtractor.name: SiftExtractor,
    DelgExtractor.name: DelgExtractor,
}
#: The same classes by the value of ``landmarks index --local`` (``"sift"``, ``"model"``).
LOCAL_FEATURES: dict[str, type[SiftExtractor] | type[DelgExtractor]] = {
    c.features: c for c in EXTRACTORS.values()
}


def make_local_extractor(features: str, loaded_model: Any = None, **kwargs: Any) -> LocalExtractor:
    """A new extractor: ``features`` is a key of :data:`LOCAL_FEATURES` (``"sift"``, ``"model"``).

    ``loaded_model``: the run with a local head (``"model"``); ``kwargs`` override the class's
    defaults. Raises :class:`LandmarksError` for an unknown name.
    """
    cls = LOCAL_FEATURES.get(features)
    if cls is None:
        raise LandmarksError(f"unknown local features {features!r} (known: {', '.join(LOCAL_FEATURES)})")
    unknown = sorted(set(kwargs) - set(cls.PARAMS))
    if unknown:
        raise LandmarksError(
            f"{features} local features take no {', '.join(unknown)} (known: {', '.join(cls.PARAMS)})"
        )
    return cls.from_info(kwargs, loaded_model)


def extractor_from_info(info: dict[str, Any], loaded_model: Any = None) -> LocalExtractor:
    """Rebuild the extractor that wrote ``info`` (its ``to_info()``): same class, same settings.

    Raises :class:`IncompatibleArtifactError` for an unknown name, or a model that is not the one
    recorded (DELG).
    """
    cls = EXTRACTORS.get(str(info.get("name")))
    if cls is None:
        raise IncompatibleArtifactError(
            f"unknown local-feature extractor {info.get('name')!r} (known: {', '.join(EXTRACTORS)})"
        )
    return cls.from_info(info, loaded_model)


def build_local_extractor(
    name_or_run: str | Path, device: str = "cpu", *, max_features: int | None = None, **kwargs: Any
) -> LocalExtractor:
    """An extractor for ``landmarks match --features``: ``"sift"`` or a run directory with a local head.

    ``max_features`` caps the features per image (the class's ``COUNT_PARAM``); ``kwargs`` override
    the extractor's defaults. Raises ``LandmarksError`` when the name is neither,
    ``IncompatibleArtifactError`` when the model has no local head.
    """
    key = str(name_or_run)
    features = "sift" if key.lower() in ("sift", SiftExtractor.name) else "model"
    if max_features is not None:
        kwargs[LOCAL_FEATURES[features].COUNT_PARAM] = max_features
    if features == "sift":
        return make_local_extractor("sift", **kwargs)
    path = Path(key)
    if not path.exists():
        raise LandmarksError(
            f"unknown local features {key!r}: expected 'sift' or a run directory with a local head"
        )
    from landmarks.checkpoint import load_model

    return make_local_extractor("model", load_model(path, device=device), **kwargs)


# --------------------------------------------------------------------------------------------------
# On-disk store
# --------------------------------------------------------------------------------------------------

STORE_FORMAT = "landmarks-local-features"
STORE_VERSION = 1
_CHUNK_RE = re.compile(r"^chunk_(\d{6})\.json$")


@dataclass
class _Entry:
    chunk: int
    start: int
    count: int
    size: tuple[int, int]


@dataclass
class LocalFeatureStore:
    """Local features of many images on disk, memory-mapped, written in atomic resumable chunks.

    Layout of ``dir``::

        meta.json                  {"format", "version", "dim", "extractor": {...}}
        chunk_000000.desc.npy      (N, D) float16 descriptors of all images of the chunk, stacked
        chunk_000000.kpts.npy      (N, 3) float32: x, y (original pixels), score
        chunk_000000.json          {"ids": [...], "offsets": [0, n0, n0+n1, ...], "sizes": [[w, h], ...]}

    A chunk exists once its JSON table does (written last, atomically); ``.npy`` files without a
    table are leftovers of an interrupted write and are overwritten. An id written again in a later
    chunk replaces the earlier features.

    Use :meth:`create` (new, or resume a compatible store) and :meth:`open` (read).
    """

    root: Path
    dim: int
    extractor: dict[str, Any] = field(default_factory=dict)
    _entries: dict[str, _Entry] = field(default_factory=dict, repr=False)
    _chunks: list[int] = field(default_factory=list, repr=False)
    _mmaps: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @classmethod
    def create(cls, root: str | Path, dim: int, extractor: dict[str, Any] | None = None) -> LocalFeatureStore:
        """A new store in ``root``, or the existing one there when it is compatible (resume).

        Raises ``IncompatibleArtifactError`` when ``root`` holds a store of another dimension or of
        another extractor (compared on ``extractor`` info when both are given).
        """
        root = Path(root)
        extractor = json.loads(json.dumps(extractor or {}))
        if (root / "meta.json").exists():
            store = cls.open(root)
            if store.dim != dim:
                raise IncompatibleArtifactError(f"{root}: local features of dimension {store.dim}, not {dim}")
            if extractor and store.extractor and store.extractor != extractor:
                raise IncompatibleArtifactError(
                    f"{root}: local features were extracted with {store.extractor.get('name')} "
                    f"({_digest(store.extractor)}), not {extractor.get('name')} ({_digest(extractor)})"
                )
            return store
        root.mkdir(parents=True, exist_ok=True)
        write_json(
            root / "meta.json",
            {"format": STORE_FORMAT, "version": STORE_VERSION, "dim": int(dim), "extractor": extractor},
        )
        return cls(root=root, dim=int(dim), extractor=extractor)

    @classmethod
    def open(cls, root: str | Path) -> LocalFeatureStore:
        """Open an existing store (its committed chunks). Raises ``IncompatibleArtifactError``."""
        root = Path(root)
        meta_path = root / "meta.json"
        if not meta_path.exists():
            raise IncompatibleArtifactError(f"{root}: not a local-feature store (no meta.json)")
        meta = read_json(meta_path)
        if meta.get("format") != STORE_FORMAT:
            raise IncompatibleArtifactError(f"{meta_path}: not a local-feature store")
        if int(meta.get("version", -1)) > STORE_VERSION:
            raise IncompatibleArtifactError(
                f"{meta_path}: store version {meta.get('version')} is newer than this program's ({STORE_VERSION})"
            )
        store = cls(root=root, dim=int(meta["dim"]), extractor=dict(meta.get("extractor") or {}))
        store._load_tables()
        return store

    def _load_tables(self) -> None:
        chunks = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _CHUNK_RE.match(p.name)))
        self._entries.clear()
        self._chunks = []
        for c in chunks:
            self._add_table(c, read_json(self._path(c, "json")))

    def _add_table(self, chunk: int, table: dict[str, Any]) -> None:
        ids, offsets, sizes = table["ids"], table["offsets"], table["sizes"]
        for k, image_id in enumerate(ids):
            self._entries[str(image_id)] = _Entry(
                chunk, int(offsets[k]), int(offsets[k + 1] - offsets[k]), (int(sizes[k][0]), int(sizes[k][1]))
            )
        self._chunks.append(chunk)

    def _path(self, chunk: int, kind: str) -> Path:
        return self.root / (f"chunk_{chunk:06d}.json" if kind == "json" else f"chunk_{chunk:06d}.{kind}.npy")

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._entries

    def has(self, image_id: str) -> bool:
        """True when features of ``image_id`` are stored."""
        return image_id in self._entries

    def has_chunk(self, chunk: int) -> bool:
        """True when chunk number ``chunk`` is committed."""
        return chunk in self._chunks

    def ids(self) -> list[str]:
        """Ids of all stored images (in insertion order)."""
        return list(self._entries)

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids of ``ids`` that are not stored yet (order kept): what a resumed job still has to do."""
        return [i for i in ids if i not in self._entries]

    def write_chunk(
        self, ids: Sequence[str], feats_list: Sequence[LocalFeatures], chunk: int | None = None
    ) -> int:
        """Write the features of ``ids`` as one chunk, atomically. Returns the chunk number.

        ``chunk``: an explicit chunk number; when that chunk is already committed nothing is written
        (a resumed job skips finished chunks). Default: the next free number.
        """
        if len(ids) != len(feats_list):
            raise ValueError(f"{len(ids)} ids but {len(feats_list)} feature sets")
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate ids in one chunk")
        if chunk is None:
            chunk = max(self._chunks, default=-1) + 1
        elif chunk in self._chunks:
            return chunk
        for image_id, f in zip(ids, feats_list):
            if len(f) and f.dim != self.dim:
                raise IncompatibleArtifactError(
                    f"{image_id}: descriptors of dimension {f.dim}, store holds {self.dim}"
                )
        counts = [len(f) for f in feats_list]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        desc = np.zeros((int(offsets[-1]), self.dim), np.float16)
        kpts = np.zeros((int(offsets[-1]), 3), np.float32)
        for k, f in enumerate(feats_list):
            a, b = offsets[k], offsets[k + 1]
            if b > a:
                desc[a:b] = f.descriptors.astype(np.float16)
                kpts[a:b, :2] = f.keypoints
                kpts[a:b, 2] = f.scores
        atomic_save(self._path(chunk, "desc"), lambda p: np.save(p, desc))
        atomic_save(self._path(chunk, "kpts"), lambda p: np.save(p, kpts))
        table = {
            "ids": [str(i) for i in ids],
            "offsets": offsets.tolist(),
            "sizes": [list(f.image_size) for f in feats_list],
        }
        write_json(self._path(chunk, "json"), table)
        self._mmaps.pop(chunk, None)
        self._add_table(chunk, table)
        return chunk

    def _arrays(self, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        if chunk not in self._mmaps:
            arrays = []
            for kind in ("desc", "kpts"):
                try:
                    arrays.append(np.load(self._path(chunk, kind), mmap_mode="r"))
                except ValueError:  # a chunk of images without features: nothing to map
                    arrays.append(np.load(self._path(chunk, kind)))
            self._mmaps[chunk] = (arrays[0], arrays[1])
        return self._mmaps[chunk]

    def get(self, image_id: str) -> LocalFeatures:
        """The features of ``image_id`` (descriptors back to float32, re-normalised). Raises ``KeyError``."""
        e = self._entries.get(image_id)
        if e is None:
            raise KeyError(f"no local features stored for {image_id!r}")
        desc_mm, kpts_mm = self._arrays(e.chunk)
        desc = np.asarray(desc_mm[e.start : e.start + e.count], dtype=np.float32)
        kpts = np.asarray(kpts_mm[e.start : e.start + e.count])
        return LocalFeatures(kpts[:, :2], l2_normalize(desc), kpts[:, 2], e.size)

    def get_many(self, ids: Sequence[str]) -> list[LocalFeatures | None]:
        """Features of each id, None where none are stored."""
        return [self.get(i) if i in self._entries else None for i in ids]

    def nbytes(self) -> int:
        """Bytes on disk of all committed chunk files."""
        return sum(self._path(c, k).stat().st_size for c in self._chunks for k in ("desc", "kpts", "json"))


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
