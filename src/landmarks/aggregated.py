"""Aggregated local features for retrieval: ASMK (Tolias, Avrithis and Jégou, ECCV 2014) over stored features.

The local features an index already stores for re-ranking (RootSIFT, or the DELG-style head; see
:mod:`landmarks.local_features`) become a first-stage retriever: a visual codebook is learned by k-means
on the user's own index images (no training data, weight-free with RootSIFT), every image's descriptors
are aggregated per visual word (residual sums, binarised: ASMK*) into the ``asmk`` package's inverted
file, and a query scores every database image by the selective match kernel (monomial, ``alpha``, with
a similarity threshold and idf)::

    codebook = train_codebook(descriptor_sample, AsmkConfig(codebook_size=1024))   # (K, 128) float32
    asmk = AsmkIndex.build(codebook, [f.descriptors for f in db_features], AsmkConfig())
    rows, scores = asmk.search(query.descriptors, topk=100)                         # best first

:func:`fuse_scores` combines its scores with the global descriptor's cosine similarities. Nothing is
pickled: the codebook is a float32 array (the caller saves it as it saves any array) and the inverted
file is rebuilt from the stored features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from landmarks.errors import ConfigError, LandmarksError


@dataclass
class AsmkConfig:
    """Codebook, aggregation and matching settings of ASMK."""

    # visual words (k-means centroids) learned on the index images' descriptors
    codebook_size: int = 1024
    # descriptors sampled (seeded) for k-means
    train_points: int = 200_000
    # k-means iterations
    kmeans_iters: int = 15
    # visual words each query descriptor is assigned to (multiple assignment, query side only)
    query_assignment: int = 5
    # binarise the aggregated residuals (ASMK*: 16x less memory; similarity from Hamming distance)
    binary: bool = True
    # exponent of the selective kernel (sim ** alpha)
    alpha: float = 3.0
    # word matches below this similarity count nothing
    similarity_threshold: float = 0.0
    # weigh words by inverse document frequency
    use_idf: bool = True
    # seed of the sampling and of k-means
    seed: int = 0

    def __post_init__(self) -> None:
        if self.codebook_size < 2 or self.train_points < self.codebook_size:
            raise ConfigError("codebook_size must be >= 2 and train_points >= codebook_size")
        if self.query_assignment < 1 or self.kmeans_iters < 1:
            raise ConfigError("query_assignment and kmeans_iters must be >= 1")


def train_codebook(descriptors: np.ndarray, conf: AsmkConfig) -> np.ndarray:
    """k-means visual codebook of a descriptor sample.

    Args:
        descriptors: ``(M, d)`` float32 local descriptors (e.g. RootSIFT, L2-normalised) of the index images;
            at most ``conf.train_points`` of them are used (seeded sample).

    Returns:
        ``(K, d)`` float32 centroids, ``K = min(codebook_size, M)``.
    """
    import faiss

    x = np.asarray(descriptors, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise LandmarksError(f"no descriptors to learn a codebook from (shape {x.shape})")
    rng = np.random.default_rng(conf.seed)
    if len(x) > conf.train_points:
        x = x[np.sort(rng.choice(len(x), conf.train_points, replace=False))]
    k = min(conf.codebook_size, len(x))
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=conf.kmeans_iters,
        seed=conf.seed,
        verbose=False,
        max_points_per_centroid=max(256, len(x) // k + 1),
    )
    km.train(np.ascontiguousarray(x))
    return np.asarray(km.centroids, dtype=np.float32)


class AsmkIndex:
    """An ASMK inverted file over database images (rows ``0..N-1`` in the order given)."""

    def __init__(self, codebook: np.ndarray, conf: AsmkConfig, kernel: object, ivf: object, cdb: object):
        self.codebook = codebook
        self.conf = conf
        self._kernel = kernel
        self._ivf = ivf
        self._cdb = cdb

    @classmethod
    def build(
        cls,
        codebook: np.ndarray,
        descriptors: Sequence[np.ndarray],
        conf: AsmkConfig | None = None,
    ) -> AsmkIndex:
        """Quantize (one word per descriptor), aggregate and index every database image.

        Args:
            codebook: ``(K, d)`` float32 centroids from :func:`train_codebook`.
            descriptors: N arrays ``(n_i, d)`` float32, one per database image (an empty one is allowed:
                that image never scores).
        """
        try:
            from asmk import codebook as cdb_pkg
            from asmk import index as idx_pkg
            from asmk import inverted_file as ivf_pkg
            from asmk import kernel as kern_pkg
        except ImportError as e:
            raise LandmarksError(
                f"ASMK needs the asmk package ({e}): pip install 'landmarks[retrieval]' (or pip install asmk)"
            ) from None

        conf = conf or AsmkConfig()
        codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        cdb = cdb_pkg.Codebook(idx_pkg.initialize_index(None), size=len(codebook))
        cdb.index(codebook)
        kernel = kern_pkg.ASMKKernel(cdb, binary=conf.binary)
        ivf = ivf_pkg.IVF.initialize_empty(codebook_size=len(codebook), use_idf=conf.use_idf)
        agg_des, agg_words, agg_ids = [], [], []
        for i, d in enumerate(descriptors):
            d = np.asarray(d, dtype=np.float32)
            if len(d) == 0:
                continue
            _, words = cdb.quantize(d, multiple_assignment=1)[:2]
            ades, uwords = kernel.aggregate_image(d, words)
            agg_des.append(ades)
            agg_words.append(uwords)
            agg_ids.append(np.full(len(uwords), i, np.int64))
        if agg_des:
            ivf.add(np.vstack(agg_des), np.concatenate(agg_words), np.concatenate(agg_ids))
        # the IVF counts images up to the last one with features: make it cover every row
        missing = len(descriptors) - int(ivf.n_images)
        if missing > 0:
            ivf.norm_factor = np.concatenate([ivf.norm_factor, np.zeros(missing)])
            ivf.n_images = len(descriptors)
        ivf.norm_factor = np.maximum(np.asarray(ivf.norm_factor, dtype=np.float64), 1e-12)
        return cls(codebook, conf, kernel, ivf, cdb)

    def __len__(self) -> int:
        return int(self._ivf.n_images)  # type: ignore[attr-defined]

    def scores(self, descriptors: np.ndarray) -> np.ndarray:
        """``(N,)`` float64 ASMK similarity of one query (``(n, d)`` float32 descriptors) to every database row."""
        d = np.asarray(descriptors, dtype=np.float32)
        n = len(self)
        if len(d) == 0 or n == 0:
            return np.zeros(n, np.float64)
        cdb, kernel, ivf, conf = self._cdb, self._kernel, self._ivf, self.conf
        _, words = cdb.quantize(d, multiple_assignment=conf.query_assignment)[:2]  # type: ignore[attr-defined]
        ades, uwords = kernel.aggregate_image(d, words)  # type: ignore[attr-defined]

        def sim(*x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            out: tuple[np.ndarray, np.ndarray] = kernel.similarity(  # type: ignore[attr-defined]
                *x, alpha=conf.alpha, similarity_threshold=conf.similarity_threshold
            )
            return out

        rows, scores = ivf.search(ades, uwords, similarity_func=sim, topk=n)  # type: ignore[attr-defined]
        out = np.zeros(n, np.float64)
        out[np.asarray(rows, dtype=np.int64)] = scores
        return out

    def search(self, descriptors: np.ndarray, topk: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows (k,) int64, scores (k,) float64)`` of the ``topk`` best database rows, best first (ties: lower row)."""
        s = self.scores(descriptors)
        order = np.argsort(-s, kind="stable")[:topk]
        return order.astype(np.int64), s[order]


def fuse_scores(global_sims: np.ndarray, asmk_scores: np.ndarray, weight: float = 0.5) -> np.ndarray:
    """Late fusion of the two similarities of the same database rows.

    Args:
        global_sims: ``(..., N)`` cosine similarities of the global descriptor, in [-1, 1].
        asmk_scores: ``(..., N)`` ASMK similarities (in [0, 1] with the normalised kernel).
        weight: share of ASMK (0: global only; 1: ASMK only).

    Returns:
        ``(..., N)`` float64: ``(1 - weight) * global + weight * asmk``.
    """
    if not 0.0 <= weight <= 1.0:
        raise ConfigError(f"fusion weight must be in [0, 1], got {weight}")
    return (1.0 - weight) * np.asarray(global_sims, np.float64) + weight * np.asarray(asmk_scores, np.float64)
