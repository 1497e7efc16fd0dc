"""The landmark index: embeddings of labelled images, a FAISS index over them, and the out-of-domain set.

An index folder::

    INDEX/
      meta.json             format, model (fingerprint, name, source), views (scales, flip), index
                            config, counts; names the current data folder (the commit point)
      data-000003/
        images.json         {"ids": [...], "landmarks": [...], "paths": [...]}, one entry per row
        labels.npy          (N,) int64, the FAISS ids of the rows (ascending, never reused)
        embeddings.npy      (N, D) float16 or float32, L2-normalised, memory-mapped on load
        faiss.index         FAISS's own format
        penalty.npy         (N,) float32: mean of the top-5 cosine similarities of each row to the
                            non-landmark set N (0 without N): the GLR-2020 index-side penalty
        nonlandmarks.npy    (M, D) float32 embeddings of N (absent without N)
        nonlandmarks.json   {"ids": [...]}
        raw_embeddings.npy  (N, D) the embeddings before database-side augmentation (only with DBA:
                            ``embeddings.npy`` and FAISS then hold the augmented rows; meta.json's
                            ``dba`` = {"n", "alpha"}; see :mod:`landmarks.expansion`)
        whitening.safetensors  (with ``--whiten``) PCA-whitening learned on the index images at build
                            time (:mod:`landmarks.whiten`); its SHA-256 is in meta.json["whitening"]
      skipped.csv           images that could not be read
      work/                 extraction chunks while ``landmarks index`` runs (removed when done)

Embeddings enter an index in the model's space and :meth:`LandmarkIndex.project` maps them to the
index's space (identity, or the index's PCA-whitening): :meth:`~LandmarkIndex.build`,
:meth:`~LandmarkIndex.add` and :meth:`~LandmarkIndex.set_non_landmarks` call it on what they store,
and the :class:`~landmarks.recognize.Recognizer` on every query batch; :meth:`~LandmarkIndex.search`
and :meth:`~LandmarkIndex.query_ood` take index-space queries (width :attr:`~LandmarkIndex.d`).

Saving writes a new ``data-NNNNNN`` folder, then replaces ``meta.json`` atomically, then deletes the
old folder: a reader or a killed writer always sees one complete, consistent index. Loading with a model
whose fingerprint differs from ``meta.json``'s raises :class:`IncompatibleArtifactError`.

Index types (``IndexConfig.type``); searches use inner product on L2-normalised rows (= cosine):

- ``flat`` (default): exact, ``IndexIDMap(IndexFlatIP)``; 4·D + 8 bytes of RAM per image
  (2,056 B at D = 512); searches at 0.99x the speed of a raw ``faiss.IndexFlatIP`` (bench/search.py).
- ``ivfpq``: ``IndexIVFPQFastScan`` (nlist ≈ sqrt(N) lists, D/8 sub-quantizers of 4 bits, SIMD
  scanning) followed by an exact re-ranking of max(k · ``refine_factor``, 100) candidates with the stored
  (memory-mapped) embeddings; trained once at build time on up to ``max_train_points`` rows, never
  retrained by ``add``; ``remove`` re-encodes the remaining rows (no retraining). RAM ≈ D/16 + 8 bytes
  per image (43 B at D = 512) plus the embeddings on disk (store them as float16: 2·D bytes).
- ``hnsw``: ``IndexIDMap(IndexHNSWFlat)`` (M = 32, efConstruction = 40): no training, RAM ≈ 4·D + 8·M
  + 8 bytes per image (2.3 KB at D = 512); ``remove`` rebuilds the graph (HNSW cannot delete).

Recall@10 against exact search, measured by ``bench/search.py`` on 1M x 512 clustered embeddings
(long-tailed classes around super-class centres, anisotropic like trained embeddings; 1,000 landmark
queries; 2 CPU threads of a shared machine; "vs exact" = queries/s relative to a raw
``faiss.IndexFlatIP`` on the same batch of 1,000 queries):

=====================================  =========  ========  ============  =========
type (defaults)                        recall@10  vs exact  RAM / image   build
=====================================  =========  ========  ============  =========
flat                                   1.000      0.99x     2,056 B       3 s
ivfpq nlist=1024, nprobe=128, refine   0.980      71x       43 B          40 s
ivfpq nprobe=64 / 256                  0.960 /    93x /     43 B
                                       0.989      50x
hnsw efSearch=192                      0.963      44x       2,328 B       177 s
hnsw efSearch=128 / 256                0.948 /    59x /     2,328 B
                                       0.971      32x
=====================================  =========  ========  ============  =========

Without the exact re-ranking the 4-bit codes alone reach recall@10 0.63; the re-ranking reads ~100
stored rows per query. Query-time parameters change with :meth:`LandmarkIndex.set_search_params`.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np

from landmarks import __version__
from landmarks.config import from_dict, to_dict
from landmarks.errors import IncompatibleArtifactError, LandmarksError
from landmarks.utils.io import atomic_save, read_json, write_json
from landmarks.whiten import (
    WhitenConfig,
    Whitening,
    apply_whitening,
    learn_whitening,
    load_whitening,
    save_whitening,
)

logger = logging.getLogger("landmarks")

#: Identifies an index folder's meta.json and its layout version.
INDEX_FORMAT = "landmarks-index"
INDEX_VERSION = 1
INDEX_TYPES = ("flat", "ivfpq", "hnsw")
#: Fewer images than this cannot train an IVF-PQ index (and would not need one).
MIN_IVFPQ_IMAGES = 1000
#: IVF-PQ re-ranks at least this many candidates exactly, whatever k.
MIN_REFINE_CANDIDATES = 100
_GEN_RE = re.compile(r"^data-(\d{6})$")


@dataclass
class IndexConfig:
    """How the FAISS index is built and searched (saved in meta.json)."""

    # "flat" (exact inner product), "ivfpq" (compressed, trained once) or "hnsw" (graph)
    type: Literal["flat", "ivfpq", "hnsw"] = "flat"
    # storage type of embeddings.npy (float16 halves the disk; search in flat/hnsw stays float32)
    dtype: Literal["float16", "float32"] = "float32"
    # IVF lists (None: about sqrt(N), a power of two, at least 1 and at most N / 39)
    nlist: int | None = None
    # PQ sub-quantizers of 4 bits, FAISS fast-scan layout (None: the largest even divisor of D <= D / 8)
    pq_m: int | None = None
    # IVF lists visited per query
    nprobe: int = 128
    # IVF-PQ: re-rank max(k * refine_factor, 100) candidates exactly with the stored embeddings (1: none)
    refine_factor: int = 10
    # IVF-PQ: training rows drawn from the index (seeded)
    max_train_points: int = 65_536
    # HNSW: links per node
    hnsw_m: int = 32
    # HNSW: candidate list size while building
    ef_construction: int = 40
    # HNSW: candidate list size while searching
    ef_search: int = 192
    # non-landmark neighbours averaged into each index image's out-of-domain penalty
    ood_top_k: int = 5
    # seed of the IVF-PQ training sample and k-means
    seed: int = 0

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise LandmarksError(f"unknown index type {self.type!r} (known: {', '.join(INDEX_TYPES)})")
        if self.dtype not in ("float16", "float32"):
            raise LandmarksError(f"unknown embeddings dtype {self.dtype!r} (float16 or float32)")
        if self.refine_factor < 1 or self.nprobe < 1 or self.ef_search < 1 or self.ood_top_k < 1:
            raise LandmarksError("refine_factor, nprobe, ef_search and ood_top_k must be >= 1")


# --- pure helpers -----------------------------------------------------------------------------------


def as_xq(x: np.ndarray, d: int | None = None, name: str = "xq") -> np.ndarray:
    """Check and convert embeddings to a C-contiguous ``(n, d)`` float32 array."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2:
        raise LandmarksError(f"{name}: expected an (n, d) array, got shape {x.shape}")
    if d is not None and x.shape[1] != d:
        raise LandmarksError(f"{name}: expected width {d}, got {x.shape[1]}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise LandmarksError(f"{name}: contains NaN or infinite values")
    return x


def mean_topk_similarity(xq: np.ndarray, xb: np.ndarray, k: int, batch: int = 65_536) -> np.ndarray:
    """Mean of the ``k`` largest inner products of each row of ``xq`` with the rows of ``xb`` (exact).

    Args:
        xq: ``(nq, d)`` float32, L2-normalised.
        xb: ``(nb, d)`` float32, L2-normalised (``k`` is capped at ``nb``).

    Returns:
        ``(nq,)`` float32; zeros when ``xb`` is empty.
    """
    xq = as_xq(xq)
    if len(xb) == 0 or len(xq) == 0:
        return np.zeros(len(xq), dtype=np.float32)
    xb = as_xq(xb, xq.shape[1], "xb")
    k = min(k, len(xb))
    index = faiss.IndexFlatIP(xb.shape[1])
    index.add(xb)
    out = np.empty(len(xq), dtype=np.float32)
    for s in range(0, len(xq), batch):
        D, _ = index.search(xq[s : s + batch], k)
        out[s : s + batch] = D.mean(axis=1)
    return out


def auto_nlist(n: int) -> int:
    """IVF lists for ``n`` rows: about sqrt(n), a power of two, at most n / 39 (FAISS's minimum per list)."""
    if n <= 0:
        return 1
    target = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return int(max(1, min(target, n // 39)))


def auto_pq_m(d: int) -> int:
    """PQ sub-quantizers for width ``d``: the largest divisor of ``d`` that is at most ``d / 8``, even if possible."""
    divisors = [m for m in range(max(1, d // 8), 0, -1) if d % m == 0]
    return next((m for m in divisors if m % 2 == 0), divisors[0])


def _labels_to_rows(labels: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Map FAISS ids (``-1`` = none) to row positions given the ascending ``labels`` of the rows."""
    rows = np.searchsorted(labels, found)
    rows = np.minimum(rows, max(0, len(labels) - 1))
    ok = (found >= 0) & (len(labels) > 0)
    if len(labels):
        ok &= labels[rows] == found
    return np.where(ok, rows, -1).astype(np.int64)


def index_memory_bytes(index: faiss.Index) -> int:
    """Size of the FAISS index once serialised (close to its RAM use), in bytes."""
    return int(faiss.serialize_index(index).nbytes)


# --- the index --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexInfo:
    """What :meth:`LandmarkIndex.info` reports (JSON-ready with :meth:`to_dict`)."""

    path: str | None  # the index folder (None: not saved yet)
    size: int  # indexed images
    landmarks: int  # distinct landmark ids (unlabelled images not counted)
    non_landmarks: int  # images of the non-landmark set (0: no out-of-domain penalties)
    type: str  # FAISS index type: flat, ivfpq or hnsw
    embedding_dim: int  # D
    dtype: str  # storage type of embeddings.npy
    index_bytes: int  # estimated RAM of the FAISS index
    model_fingerprint: str  # fingerprint of the model the index was built with
    model_name: str | None  # its name (e.g. the backbone), when recorded
    views: dict[str, Any]  # extraction views ({"scales", "flip"})
    created: str | None  # ISO time of the build
    updated: str | None  # ISO time of the last save
    generation: int  # committed generation (increases with every add/remove)
    local_features: str | None  # "sift" or "model" when the index stores local features, else None
    whitening: dict[str, Any] | None = None  # the PCA-whitening learned on the index images (meta.json entry)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


class LandmarkIndex:
    """Labelled embeddings with a FAISS index and the out-of-domain penalties.

    Rows are the indexed images, in insertion order; ``search`` returns row positions. Use
    :meth:`build` or :meth:`load`, then :meth:`add`, :meth:`remove`, :meth:`save`.
    """

    def __init__(
        self,
        *,
        ids: list[str],
        landmarks: list[str | None],
        paths: list[str | None],
        labels: np.ndarray,
        embeddings: np.ndarray,
        faiss_index: faiss.Index,
        penalty: np.ndarray,
        non_landmarks: np.ndarray | None,
        non_landmark_ids: list[str],
        meta: dict[str, Any],
        conf: IndexConfig,
        path: Path | None = None,
        whitening: Whitening | None = None,
        raw_embeddings: np.ndarray | None = None,
    ):
        self.ids = ids
        self.whitening = whitening
        self.landmarks = landmarks
        self.paths = paths
        self.labels = labels
        self.embeddings = embeddings
        self.faiss_index = faiss_index
        self.penalty = penalty
        self.non_landmarks = non_landmarks
        self.non_landmark_ids = non_landmark_ids
        self.meta = meta
        self.conf = conf
        self.path = path
        # (N, D) embeddings before DBA (None: no DBA; then ``embeddings`` are the raw ones)
        self.raw_embeddings = raw_embeddings
        self._row_of: dict[str, int] | None = None
        self._codes: tuple[np.ndarray, list[str]] | None = None
        self._nl_index: faiss.Index | None = None
        self.set_search_params()

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str],
        landmarks: Sequence[str | None],
        *,
        model: dict[str, Any],
        paths: Sequence[str | Path | None] | None = None,
        conf: IndexConfig | None = None,
        views: dict[str, Any] | None = None,
        non_landmarks: np.ndarray | None = None,
        non_landmark_ids: Sequence[str] | None = None,
        whiten: WhitenConfig | None = None,
    ) -> LandmarkIndex:
        """Build an index.

        Args:
            embeddings: ``(N, D)`` float32, L2-normalised (``xb``).
            ids: N unique image ids. landmarks: N landmark ids (None: an unlabelled image, found by
                retrieval but never voted for). paths: N image paths (or None).
            model: the embedder's ``describe()`` (must hold ``fingerprint``).
            conf: index type and parameters. views: extraction views (``{"scales", "flip"}``).
            non_landmarks: ``(M, D)`` float32 embeddings of the non-landmark set N (None: no penalties).
            whiten: learn PCA-whitening on ``embeddings`` (and ``non_landmarks``, unless
                ``whiten.with_non_landmarks`` is off; no labels used) and store everything whitened
                (``(N, dim)``); queries are whitened by :meth:`project`. None: no whitening.
        """
        conf = conf or IndexConfig()
        if "fingerprint" not in model:
            raise LandmarksError("model description lacks a 'fingerprint'")
        xb = as_xq(embeddings, None, "embeddings")
        d = xb.shape[1]
        if "embedding_dim" in model and int(model["embedding_dim"]) != d:
            raise LandmarksError(f"embeddings have width {d} but the model's is {model['embedding_dim']}")
        ids, landmarks = list(ids), list(landmarks)
        paths_list: list[str | None] = (
            [None if p is None else str(p) for p in paths] if paths is not None else [None] * len(ids)
        )
        _check_rows(ids, landmarks, paths_list, len(xb))
        whitening = None
        if whiten is not None:
            train = xb
            if whiten.with_non_landmarks and non_landmarks is not None and len(non_landmarks):
                train = np.concatenate([xb, as_xq(non_landmarks, d, "non-landmark embeddings")])
            whitening = learn_whitening(train, whiten.dim, whiten.shrinkage)
            xb = apply_whitening(xb, whitening)
            d = whitening.dim
        labels = np.arange(len(xb), dtype=np.int64)
        findex = _new_index(conf, d, xb)
        if len(xb):
            findex.add_with_ids(xb, labels)
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "model": dict(model),
            "embedding_dim": d,
            "views": dict(views or {"scales": [1.0], "flip": False}),
            "index": to_dict(conf),
            "created": _now(),
        }
        if whitening is not None:
            meta["whitening"] = whitening.describe()
        idx = cls(
            ids=ids,
            landmarks=landmarks,
            paths=paths_list,
            labels=labels,
            embeddings=np.asarray(xb, dtype=conf.dtype),
            faiss_index=findex,
            penalty=np.zeros(len(xb), np.float32),
            non_landmarks=None,
            non_landmark_ids=[],
            meta=meta,
            conf=conf,
            whitening=whitening,
        )
        if non_landmarks is not None:
            idx.set_non_landmarks(non_landmarks, non_landmark_ids)
        return idx

    # -- properties --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def d(self) -> int:
        """Width of the stored (index-space) embeddings: the model's D, or the whitening's dim."""
        return int(self.meta["embedding_dim"])

    @property
    def model_d(self) -> int:
        """Width of the model's embeddings, which :meth:`project` takes."""
        return self.whitening.in_dim if self.whitening is not None else self.d

    def project(self, x: np.ndarray, name: str = "embeddings") -> np.ndarray:
        """Model-space embeddings ``(n, model_d)`` -> index space ``(n, d)`` float32, L2-normalised.

        The one place where the index's whitening (if any) is applied: to what is stored (index images,
        non-landmarks) and to every query batch.
        """
        x = as_xq(x, self.model_d, name)
        return x if self.whitening is None else apply_whitening(x, self.whitening)

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the model the index was built with."""
        return str(self.meta["model"]["fingerprint"])

    @property
    def views(self) -> dict[str, Any]:
        """Extraction views of the index images (queries should be embedded the same way)."""
        return dict(self.meta.get("views", {"scales": [1.0], "flip": False}))

    @property
    def has_non_landmarks(self) -> bool:
        """True when a non-landmark set is stored (out-of-domain penalties available)."""
        return self.non_landmarks is not None and len(self.non_landmarks) > 0

    def row_of(self, image_id: str) -> int | None:
        """Row of an image id, or None."""
        if self._row_of is None:
            self._row_of = {i: r for r, i in enumerate(self.ids)}
        return self._row_of.get(image_id)

    def landmark_codes(self) -> tuple[np.ndarray, list[str]]:
        """``(codes (N,) int64, names)``: each row's landmark as an integer (``-1``: unlabelled), ``names[code]`` its id."""
        if self._codes is None:
            names = sorted({lm for lm in self.landmarks if lm is not None})
            code_of = {lm: c for c, lm in enumerate(names)}
            codes = np.fromiter(
                (-1 if lm is None else code_of[lm] for lm in self.landmarks), np.int64, len(self)
            )
            self._codes = (codes, names)
        return self._codes

    @property
    def num_landmarks(self) -> int:
        """Distinct landmark ids among the rows (unlabelled rows not counted)."""
        return len(self.landmark_codes()[1])

    @property
    def generation(self) -> int:
        """The generation of this index on disk (its ``data-NNNNNN`` number; 0 before the first save)."""
        return generation_of(self.meta)

    def info(self) -> IndexInfo:
        """Size, landmarks, non-landmarks, type, memory, the model's fingerprint and name, generation."""
        model = self.meta["model"]
        return IndexInfo(
            path=str(self.path) if self.path else None,
            size=len(self),
            landmarks=self.num_landmarks,
            non_landmarks=0 if self.non_landmarks is None else len(self.non_landmarks),
            type=self.conf.type,
            embedding_dim=self.d,
            dtype=self.conf.dtype,
            index_bytes=self.memory_bytes(),
            model_fingerprint=str(model["fingerprint"]),
            model_name=model.get("name"),
            views=self.views,
            created=self.meta.get("created"),
            updated=self.meta.get("updated"),
            generation=self.generation,
            local_features=(self.meta.get("local") or {}).get("features"),
            whitening=self.meta.get("whitening"),
        )

    def memory_bytes(self) -> int:
        """An estimate of the FAISS index's RAM (codes, vectors, links, ids; not the memory-mapped embeddings)."""
        n, d = len(self), self.d
        if self.conf.type == "flat":
            return n * (4 * d + 8)
        if self.conf.type == "hnsw":
            return n * (4 * d + 8 + int(8 * self.conf.hnsw_m * 1.05) + 4)
        ivf: Any = faiss.extract_index_ivf(self.faiss_index)
        return n * (int(ivf.code_size) + 8) + int(ivf.nlist) * d * 4

    def check_model(self, fingerprint: str, name: str | None = None) -> None:
        """Raise :class:`IncompatibleArtifactError` unless ``fingerprint`` is the index's model's."""
        if fingerprint != self.fingerprint:
            model = self.meta["model"]
            built = f"{self.fingerprint[:12]}" + (f" ({model.get('name')})" if model.get("name") else "")
            given = f"{fingerprint[:12]}" + (f" ({name})" if name else "")
            where = f"index {self.path}" if self.path else "this index"
            raise IncompatibleArtifactError(
                f"{where} was built with model {built}, not with the model given, {given}: embeddings of "
                f"different models are not comparable. Use the model the index was built with "
                f"({model.get('source') or 'see meta.json'}) or rebuild the index with `landmarks index`."
            )

    # -- search ------------------------------------------------------------------------------------

    def set_search_params(
        self, nprobe: int | None = None, ef_search: int | None = None, refine_factor: int | None = None
    ) -> None:
        """Change query-time parameters (IVF ``nprobe``, HNSW ``efSearch``, IVF-PQ re-ranking)."""
        if nprobe is not None:
            self.conf.nprobe = nprobe
        if ef_search is not None:
            self.conf.ef_search = ef_search
        if refine_factor is not None:
            self.conf.refine_factor = refine_factor
        if self.conf.type == "ivfpq":
            faiss.extract_index_ivf(self.faiss_index).nprobe = self.conf.nprobe
        elif self.conf.type == "hnsw":
            idmap: Any = self.faiss_index
            inner: Any = faiss.downcast_index(idmap.index)
            inner.hnsw.efSearch = max(self.conf.ef_search, 1)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest index images of each query by inner product.

        Args:
            xq: ``(nq, D)`` float32, L2-normalised.

        Returns:
            ``(D, I)``: ``D (nq, k)`` float32 similarities, descending; ``I (nq, k)`` int64 rows of the
            index (``-1`` and ``D = -inf`` where fewer than ``k`` images exist).
        """
        xq = as_xq(xq, self.d)
        nq = len(xq)
        if k < 1:
            raise LandmarksError(f"k must be >= 1, got {k}")
        if len(self) == 0 or nq == 0:
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        if self.conf.type == "ivfpq" and self.conf.refine_factor > 1:
            kk = min(len(self), max(k * self.conf.refine_factor, MIN_REFINE_CANDIDATES))
            _, L = self.faiss_index.search(xq, kk)
            return self._refine(xq, _labels_to_rows(self.labels, L), k)
        D, L = self.faiss_index.search(xq, k)
        rows = _labels_to_rows(self.labels, L)
        D = np.where(rows >= 0, D, -np.inf).astype(np.float32)
        return D, rows

    def _refine(
        self, xq: np.ndarray, cand: np.ndarray, k: int, block: int = 256
    ) -> tuple[np.ndarray, np.ndarray]:
        nq = len(xq)
        D_out = np.full((nq, k), -np.inf, np.float32)
        I_out = np.full((nq, k), -1, np.int64)
        for s in range(0, nq, block):
            c = cand[s : s + block]
            vec = np.asarray(self.embeddings[np.maximum(c, 0).reshape(-1)], dtype=np.float32)
            sims = np.einsum("qd,qkd->qk", xq[s : s + block], vec.reshape(c.shape[0], c.shape[1], -1))
            sims = np.where(c >= 0, sims, -np.inf)
            kk = min(k, c.shape[1])
            order = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
            D_out[s : s + block, :kk] = np.take_along_axis(sims, order, axis=1)
            I_out[s : s + block, :kk] = np.where(
                np.isfinite(D_out[s : s + block, :kk]), np.take_along_axis(c, order, axis=1), -1
            )
        return D_out, I_out

    def query_ood(self, xq: np.ndarray, k: int = 10) -> np.ndarray:
        """Mean of the top-``k`` similarities of each query to the non-landmark set; ``(nq,)`` float32 (0 without N)."""
        xq = as_xq(xq, self.d)
        if not self.has_non_landmarks:
            return np.zeros(len(xq), np.float32)
        assert self.non_landmarks is not None
        if self._nl_index is None:
            self._nl_index = faiss.IndexFlatIP(self.d)
            self._nl_index.add(np.ascontiguousarray(self.non_landmarks, dtype=np.float32))
        D, _ = self._nl_index.search(xq, min(k, len(self.non_landmarks)))
        return D.mean(axis=1).astype(np.float32)

    # -- changes -----------------------------------------------------------------------------------

    def set_non_landmarks(self, embeddings: np.ndarray | None, ids: Sequence[str] | None = None) -> None:
        """Store the non-landmark set N (``(M, model_d)`` float32 model embeddings, projected here) and
        recompute every index image's penalty."""
        self._nl_index = None
        if embeddings is None or len(embeddings) == 0:
            self.non_landmarks, self.non_landmark_ids = None, []
            self.penalty = np.zeros(len(self), np.float32)
            return
        xn = self.project(embeddings, "non-landmark embeddings")
        self.non_landmarks = xn
        self.non_landmark_ids = list(ids) if ids is not None else [str(i) for i in range(len(xn))]
        if len(self.non_landmark_ids) != len(xn):
            raise LandmarksError("non-landmark ids and embeddings differ in length")
        self.penalty = self._penalty_of(np.asarray(self.embeddings, dtype=np.float32))

    def _penalty_of(self, xb: np.ndarray) -> np.ndarray:
        if not self.has_non_landmarks:
            return np.zeros(len(xb), np.float32)
        assert self.non_landmarks is not None
        return mean_topk_similarity(xb, self.non_landmarks, self.conf.ood_top_k)

    def add(
        self,
        embeddings: np.ndarray,
        ids: Sequence[str],
        landmarks: Sequence[str | None],
        paths: Sequence[str | Path | None] | None = None,
    ) -> int:
        """Append images (new images of known landmarks or whole new landmarks); no retraining.

        Args:
            embeddings: ``(n, model_d)`` float32, L2-normalised, from the index's model (projected here).

        Returns:
            The number of rows added. Raises on ids already in the index.
        """
        xb = self.project(embeddings)
        ids, landmarks = list(ids), list(landmarks)
        paths_list: list[str | None] = (
            [None if p is None else str(p) for p in paths] if paths is not None else [None] * len(ids)
        )
        _check_rows(ids, landmarks, paths_list, len(xb))
        clash = [i for i in ids if self.row_of(i) is not None]
        if clash:
            raise LandmarksError(f"{len(clash)} image id(s) already in the index: {', '.join(clash[:5])}")
        if not len(xb):
            return 0
        start = int(self.labels[-1]) + 1 if len(self.labels) else 0
        new_labels = np.arange(start, start + len(xb), dtype=np.int64)
        self.faiss_index.add_with_ids(xb, new_labels)
        self.labels = np.concatenate([self.labels, new_labels])
        self.embeddings = np.concatenate([np.asarray(self.embeddings), xb.astype(self.conf.dtype)])
        self.penalty = np.concatenate([self.penalty, self._penalty_of(xb)]).astype(np.float32)
        self.ids.extend(ids)
        self.landmarks.extend(landmarks)
        self.paths.extend(paths_list)
        self._row_of, self._codes = None, None
        if self.raw_embeddings is not None:  # DBA: new rows change their neighbours' sums (see expansion)
            self.raw_embeddings = np.concatenate(
                [np.asarray(self.raw_embeddings), xb.astype(self.conf.dtype)]
            )
            self._refresh_dba()
        return len(xb)

    def remove(self, ids: Sequence[str]) -> int:
        """Remove images by id; unknown ids raise :class:`LandmarksError` naming them. Returns the count removed."""
        missing = [i for i in ids if self.row_of(i) is None]
        if missing:
            raise LandmarksError(f"{len(missing)} id(s) not in the index: {', '.join(missing[:5])}")
        rows = np.unique(np.asarray([self.row_of(i) for i in ids], dtype=np.int64))
        if not len(rows):
            return 0
        keep = np.ones(len(self), bool)
        keep[rows] = False
        if self.conf.type == "hnsw":  # HNSW cannot delete: rebuild the graph
            remaining = np.asarray(self.embeddings[keep], dtype=np.float32)
            self.faiss_index = _new_index(self.conf, self.d, remaining)
            if len(remaining):
                self.faiss_index.add_with_ids(remaining, self.labels[keep])
        elif (
            self.conf.type == "ivfpq"
        ):  # fast-scan lists: re-encode the rest (FAISS's in-place delete is unsafe)
            findex: Any = self.faiss_index
            findex.reset()
            rest = np.flatnonzero(keep)
            for s in range(0, len(rest), 262_144):
                part = rest[s : s + 262_144]
                findex.add_with_ids(np.asarray(self.embeddings[part], dtype=np.float32), self.labels[part])
        else:
            flat: Any = self.faiss_index
            flat.remove_ids(np.ascontiguousarray(self.labels[rows]))
        self.labels = self.labels[keep]
        self.embeddings = np.asarray(self.embeddings)[keep]
        self.penalty = self.penalty[keep]
        keep_list = keep.tolist()
        self.ids = [x for x, k in zip(self.ids, keep_list) if k]
        self.landmarks = [x for x, k in zip(self.landmarks, keep_list) if k]
        self.paths = [x for x, k in zip(self.paths, keep_list) if k]
        self._row_of, self._codes = None, None
        self.set_search_params()
        if self.raw_embeddings is not None:  # DBA: rows that had a removed neighbour change (see expansion)
            self.raw_embeddings = np.asarray(self.raw_embeddings)[keep]
            self._refresh_dba()
        return len(rows)

    # -- database-side augmentation --------------------------------------------------------------------

    @property
    def dba(self) -> dict[str, Any] | None:
        """``{"n", "alpha"}`` of the database-side augmentation the rows carry, or None."""
        dba = self.meta.get("dba")
        return dict(dba) if dba else None

    def replace_vectors(self, xb: np.ndarray) -> None:
        """Replace every row's vector (``(N, D)`` float32, L2-normalised; ids and order unchanged).

        FAISS is refilled (IVF-PQ keeps its trained quantizer) and the out-of-domain penalties recomputed.
        """
        xb = as_xq(xb, self.d, "vectors")
        if len(xb) != len(self):
            raise LandmarksError(f"{len(xb)} vectors for an index of {len(self)} rows")
        if self.conf.type == "ivfpq":
            findex: Any = self.faiss_index
            findex.reset()
        else:
            findex = _new_index(self.conf, self.d, xb)
        for s in range(0, len(xb), 262_144):
            findex.add_with_ids(xb[s : s + 262_144], self.labels[s : s + 262_144])
        self.faiss_index = findex
        self.embeddings = xb.astype(self.conf.dtype)
        self.penalty = self._penalty_of(xb)
        self.set_search_params()

    def _refresh_dba(self) -> None:
        """Recompute the DBA of every row from ``raw_embeddings`` (the simplest correct rule after add/remove)."""
        from landmarks.expansion import ExpansionConfig, apply_dba

        dba = self.dba
        assert dba is not None and self.raw_embeddings is not None
        apply_dba(self, ExpansionConfig(n=int(dba["n"]), alpha=float(dba["alpha"])))

    # -- files -------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the index folder atomically (new data folder, then meta.json, then old data removed)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        existing = [int(m.group(1)) for p in path.iterdir() if (m := _GEN_RE.match(p.name))]
        gen = f"data-{max(existing, default=0) + 1:06d}"
        tmp = path / f".{gen}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_json(tmp / "images.json", {"ids": self.ids, "landmarks": self.landmarks, "paths": self.paths})
        atomic_save(tmp / "labels.npy", lambda p: np.save(p, self.labels))
        atomic_save(
            tmp / "embeddings.npy", lambda p: np.save(p, np.asarray(self.embeddings, dtype=self.conf.dtype))
        )
        atomic_save(tmp / "penalty.npy", lambda p: np.save(p, self.penalty.astype(np.float32)))
        atomic_save(tmp / "faiss.index", lambda p: faiss.write_index(self.faiss_index, p))
        if self.non_landmarks is not None:
            nl = self.non_landmarks
            atomic_save(tmp / "nonlandmarks.npy", lambda p: np.save(p, nl))
            write_json(tmp / "nonlandmarks.json", {"ids": self.non_landmark_ids})
        if self.whitening is not None:
            save_whitening(tmp / "whitening.safetensors", self.whitening)
        if self.raw_embeddings is not None:
            raw = self.raw_embeddings
            atomic_save(
                tmp / "raw_embeddings.npy", lambda p: np.save(p, np.asarray(raw, dtype=self.conf.dtype))
            )
        os.replace(tmp, path / gen)
        self.meta.update(
            {
                "generation": gen,
                "count": len(self),
                "landmarks_count": self.num_landmarks,
                "non_landmarks_count": 0 if self.non_landmarks is None else len(self.non_landmarks),
                "index": to_dict(self.conf),
                "updated": _now(),
                "landmarks_version": __version__,
            }
        )
        write_json(path / "meta.json", self.meta)
        for p in path.iterdir():
            if p.name != gen and (
                _GEN_RE.match(p.name) or (p.name.startswith(".data-") and p.name.endswith(".tmp"))
            ):
                shutil.rmtree(p, ignore_errors=True)
        self.path = path
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        fingerprint: str | None = None,
        model_name: str | None = None,
        mmap: bool = True,
    ) -> LandmarkIndex:
        """Open an index folder; with ``fingerprint``, refuse an index built with another model.

        ``embeddings.npy`` is memory-mapped unless ``mmap`` is False.
        """
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.exists():
            if (path / "work").exists():
                raise LandmarksError(
                    f"{path}: the index was not finished (run `landmarks index` again to resume)"
                )
            raise LandmarksError(f"{path}: not an index folder (no meta.json)")
        meta = _read(meta_path, read_json)
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise IncompatibleArtifactError(f"{meta_path}: not a landmarks index")
        try:
            version = int(meta.get("version", 0))
            conf = from_dict(IndexConfig, meta["index"])
            data = path / str(meta["generation"])
            str(meta["model"]["fingerprint"])
            int(meta["embedding_dim"])
        except (KeyError, TypeError, ValueError) as e:
            raise IncompatibleArtifactError(
                f"{meta_path}: incomplete or invalid index metadata ({type(e).__name__}: "
                f"{e}); rebuild the index"
            ) from None
        if version > INDEX_VERSION:
            raise IncompatibleArtifactError(
                f"{path}: index format version {version} is newer than this software's "
                f"({INDEX_VERSION}); upgrade landmarks"
            )
        images = _read(data / "images.json", read_json)
        try:
            ids, landmarks, paths = list(images["ids"]), list(images["landmarks"]), list(images["paths"])
        except (KeyError, TypeError) as e:
            raise IncompatibleArtifactError(
                f"{data / 'images.json'}: missing or invalid {e}; rebuild the index"
            ) from None
        emb = _read(
            data / "embeddings.npy", lambda p: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
        )
        has_nl = (data / "nonlandmarks.npy").exists()
        nl = _read(data / "nonlandmarks.npy", lambda p: np.load(p, allow_pickle=False)) if has_nl else None
        nl_ids = list(_read(data / "nonlandmarks.json", read_json)["ids"]) if nl is not None else []
        labels = _read(data / "labels.npy", lambda p: np.load(p, allow_pickle=False))
        findex = _read(data / "faiss.index", lambda p: faiss.read_index(str(p)))
        penalty = _read(data / "penalty.npy", lambda p: np.load(p, allow_pickle=False))
        n = len(ids)
        if not (
            len(landmarks) == len(paths) == n
            and labels.shape == (n,)
            and penalty.shape == (n,)
            and emb.ndim == 2
            and emb.shape == (n, int(meta["embedding_dim"]))
            and findex.ntotal == n
            and (nl is None or (nl.ndim == 2 and nl.shape[1] == emb.shape[1] and len(nl_ids) == len(nl)))
        ):
            raise IncompatibleArtifactError(f"{data}: the index files disagree in size; rebuild the index")
        whitening = None
        if meta.get("whitening"):
            whitening = _read(
                data / "whitening.safetensors",
                lambda p: load_whitening(p, expect_sha256=meta["whitening"].get("sha256")),
            )
        raw = None
        if meta.get("dba") and (data / "raw_embeddings.npy").exists():
            raw = _read(
                data / "raw_embeddings.npy",
                lambda p: np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False),
            )
            if raw.shape != emb.shape:
                raise IncompatibleArtifactError(
                    f"{data}: raw_embeddings.npy disagrees with embeddings.npy; rebuild the index"
                )
        idx = cls(
            ids=ids,
            landmarks=landmarks,
            paths=paths,
            labels=labels,
            embeddings=emb,
            faiss_index=findex,
            penalty=penalty,
            non_landmarks=nl,
            non_landmark_ids=nl_ids,
            meta=meta,
            conf=conf,
            path=path,
            whitening=whitening,
            raw_embeddings=raw,
        )
        if fingerprint is not None:
            idx.check_model(fingerprint, model_name)
        return idx


def generation_of(meta: dict[str, Any]) -> int:
    """The generation recorded in an index's meta.json: its data folder's number (0 before the first save)."""
    m = _GEN_RE.match(str(meta.get("generation", "")))
    return int(m.group(1)) if m else 0


def _read(path: Path, reader: Any) -> Any:
    """``reader(path)``, turning a missing, truncated or foreign file into one error naming it."""
    try:
        return reader(path)
    except FileNotFoundError:
        raise IncompatibleArtifactError(f"{path}: missing from the index folder; rebuild the index") from None
    except (OSError, ValueError, EOFError, RuntimeError, TypeError, KeyError) as e:  # RuntimeError: FAISS
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise IncompatibleArtifactError(
            f"{path}: unreadable or corrupt ({reason}); rebuild the index"
        ) from None


def _check_rows(ids: list[str], landmarks: list[str | None], paths: list[str | None], n: int) -> None:
    if not (len(ids) == len(landmarks) == len(paths) == n):
        raise LandmarksError(
            f"{n} embeddings but {len(ids)} ids, {len(landmarks)} landmarks, {len(paths)} paths"
        )
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        raise LandmarksError(f"duplicate image ids: {', '.join(dup[:5])}")
    bad = [
        i
        for i, lm in zip(ids, landmarks)
        if lm is not None and (not isinstance(lm, str) or not lm.strip() or any(c.isspace() for c in lm))
    ]
    if bad:
        raise LandmarksError(f"images with an empty landmark id or one with whitespace: {', '.join(bad[:5])}")


def _factory_string(conf: IndexConfig, d: int, n: int) -> str:
    """The ``faiss.index_factory`` description of an empty index of type ``conf.type`` for ``n`` rows of width ``d``."""
    if conf.type == "flat":
        return "IDMap,Flat"
    if conf.type == "hnsw":
        return f"IDMap,HNSW{conf.hnsw_m},Flat"
    nlist = conf.nlist or auto_nlist(n)
    m = conf.pq_m or auto_pq_m(d)
    if d % m:
        raise LandmarksError(f"pq_m = {m} does not divide the embedding width {d}")
    need = max(nlist, MIN_IVFPQ_IMAGES)
    if n < need:
        raise LandmarksError(
            f"an IVF-PQ index needs at least {need} images to train ({nlist} lists); this one has {n}: "
            f"use the exact 'flat' index (best below ~100k images)"
        )
    return f"IVF{nlist},PQ{m}x4fs"  # IndexIVFPQFastScan: m sub-quantizers of 4 bits


def _new_index(conf: IndexConfig, d: int, xtrain: np.ndarray) -> faiss.Index:
    """An empty FAISS index with id mapping (IVF-PQ trained on a seeded sample of ``xtrain``).

    Built by ``faiss.index_factory`` from :func:`_factory_string`; the type's own parameters are set
    on the result (HNSW search depths, IVF-PQ k-means seeds and ``nprobe``).
    """
    # index_factory returns the concrete class (IndexIDMap, IndexIVFPQFastScan); this object owns it.
    index: Any = faiss.index_factory(d, _factory_string(conf, d, len(xtrain)), faiss.METRIC_INNER_PRODUCT)
    if conf.type == "hnsw":
        inner: Any = faiss.downcast_index(index.index)  # owned by the IDMap, which we return
        inner.hnsw.efConstruction = conf.ef_construction
        inner.hnsw.efSearch = conf.ef_search
    elif conf.type == "ivfpq":
        index.cp.seed = conf.seed
        index.pq.cp.seed = conf.seed
        n = len(xtrain)
        rng = np.random.default_rng(conf.seed)
        sample = (
            xtrain
            if n <= conf.max_train_points
            else xtrain[np.sort(rng.choice(n, conf.max_train_points, replace=False))]
        )
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        index.nprobe = conf.nprobe
    return index


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
