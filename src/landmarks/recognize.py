"""Recognition: k nearest index images, voting, and the GLR-2020 out-of-domain handling.

For a query q with neighbours j_1..j_k (cosine similarities c_1..c_k), each neighbour scores

- without a non-landmark set N: s(q, j) = cos(q, j);
- with N (index side): s'(q, j) = clip(cos(q, j), 0, 1) − mean of the top-5 cos(j, N) (precomputed
  per index image, :attr:`LandmarkIndex.penalty`).

A landmark's score is the sum of the scores of its neighbours among the k; the prediction is the best
landmark (ties: the one of the nearer neighbour) and its confidence that sum, minus (query side)
w · mean of the top-10 cos(q, N). Optionally, a landmark predicted for more than T queries of a batch
has ``demote_penalty`` taken off those confidences (a "hub" that attracts out-of-domain queries), and a
query whose confidence stays below ``threshold`` is reported as no landmark.

The scoring functions (:func:`neighbour_scores`, :func:`vote`, :func:`query_confidence`,
:func:`demote`) are pure and vectorised; tests compare them with loop versions. :class:`Recognizer`
wraps embedding, search, an optional re-ranking hook and voting for in-memory images::

    rec = Recognizer.load("index/")                  # the model is the one recorded in the index
    out = rec.recognize([img])                       # img: (H, W, 3) uint8 RGB
    out[0].landmark, out[0].confidence, out[0].neighbours
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landmarks.data.collection import ImageRecord
from landmarks.errors import ConfigError, LandmarksError
from landmarks.local_features import LocalFeatures
from landmarks.rerank import (
    RERANK_MAX_ITERS,
    RERANK_MODEL,
    Candidates,
    LocalReranker,
    PairVerifier,
    Reranker,
    rerank_order,
)
from landmarks.verify import Verification

if TYPE_CHECKING:
    from landmarks.index import IndexInfo
    from landmarks.maintenance import AddResult

logger = logging.getLogger("landmarks")

#: Values accepted by ``RecognizeConfig.rerank``: "local" verifies the top candidates with the index's local
#: features (:class:`~landmarks.rerank.LocalReranker`); any other :class:`~landmarks.rerank.Reranker`
#: is passed to :class:`Recognizer`.
RERANK_CHOICES = ("none", "local")
__all__ = [
    "RERANK_CHOICES",
    "Neighbour",
    "RecognizeConfig",
    "Recognition",
    "Recognizer",
    "Reranker",
    "demote",
    "neighbour_scores",
    "neighbours_row",
    "query_confidence",
    "vote",
]


@dataclass
class RecognizeConfig:
    """Voting and out-of-domain settings."""

    # neighbours that vote
    k: int = 3
    # use the non-landmark set (index-side penalty and query-side penalty) when the index has one
    ood: bool = True
    # w: weight of the query-side penalty (mean of the top-10 similarities to the non-landmark set)
    ood_weight: float = 1.0
    # non-landmark neighbours averaged into the query-side penalty
    ood_query_k: int = 10
    # a landmark predicted for more than this many queries of one batch is demoted (None: never)
    demote_above: int | None = None
    # taken off the confidence of each demoted prediction
    demote_penalty: float = 1.0
    # below this confidence a query gets no landmark (None: always predict the best landmark; is_landmark
    # then follows the index's calibrated threshold, see `calibrated`)
    threshold: float | None = None
    # without `threshold`: is_landmark = confidence >= the threshold calibrated at index time
    # (landmarks.calibrate; only when the index has one made with the same k / ood settings)
    calibrated: bool = True
    # re-ranking of the top candidates: "none", or "local" (local features + RANSAC; the index needs
    # local features: `landmarks index --local`); a custom Reranker can be passed to Recognizer
    rerank: str = "none"
    # K: top global candidates verified and re-scored (GLR practice: 10-20)
    rerank_candidates: int = 20
    # c: the inlier bonus min(inliers, c) / c saturates at c inliers
    rerank_c: float = 70.0
    # the saturated bonus in units of the global score: score = s + weight * min(inliers, c) / c
    rerank_weight: float = 1.0
    # fewer inliers earn no bonus: a fundamental matrix always fits a few matches of unrelated images
    # (RootSIFT on the synthetic set: 2% of unrelated pairs reach 10, max 12; tuned there, see landmarks.rerank)
    rerank_min_inliers: int = 10
    # geometric model of the verification: "fundamental" (3-D scenes), "homography" or "affine"
    rerank_model: str = RERANK_MODEL
    # RANSAC iterations at most per pair (landmarks.rerank.RERANK_MAX_ITERS: why 2,000)
    rerank_max_iters: int = RERANK_MAX_ITERS
    # verification worker processes (None: CPUs - 1, at most 8; 0: in the calling process)
    rerank_workers: int | None = None
    # seed of the re-ranker's RANSAC (results are deterministic given it)
    seed: int = 0
    # images per forward pass when embedding queries
    batch_size: int = 32
    # alpha-QE of the retrieval list (``retrieval_k``): the nearest index rows added to each query before
    # a second search (0: off; landmarks.expansion). 5 with alpha 3: the best of a sweep on the real photos
    # of bench/retrieval.py (mAP@100 57.2 -> 60.1; on top of DBA 62.8 -> 64.4)
    qe_n: int = 5
    # alpha-QE: exponent of the similarity weight (0: plain average)
    qe_alpha: float = 3.0
    # also vote with the expanded query (off: on bench/retrieval's real photos QE raised retrieval mAP@100
    # but lowered the kNN top-1)
    qe_vote: bool = False

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k must be >= 1, got {self.k}")
        if self.ood_query_k < 1:
            raise ConfigError(f"ood_query_k must be >= 1, got {self.ood_query_k}")
        if self.demote_above is not None and self.demote_above < 0:
            raise ConfigError(f"demote_above must be >= 0, got {self.demote_above}")
        if self.rerank not in RERANK_CHOICES:
            raise ConfigError(f"unknown rerank {self.rerank!r} (known: {', '.join(RERANK_CHOICES)})")
        if self.rerank_candidates < 1 or self.rerank_c <= 0 or self.rerank_max_iters < 1:
            raise ConfigError("rerank_candidates, rerank_c and rerank_max_iters must be positive")
        if self.rerank_weight < 0:
            raise ConfigError(f"rerank_weight must be >= 0, got {self.rerank_weight}")
        if self.rerank_model not in ("fundamental", "homography", "affine"):
            raise ConfigError(
                f"unknown rerank_model {self.rerank_model!r} (fundamental, homography or affine)"
            )
        from landmarks.expansion import ExpansionConfig

        ExpansionConfig(self.qe_n, self.qe_alpha)  # validates


@dataclass
class Neighbour:
    """An index image near a query: ``score`` is the cosine similarity (or the re-ranker's score).

    ``landmark`` is ``""`` for an image of an unlabelled (retrieval-only) index.
    """

    id: str
    landmark: str
    score: float
    inliers: int | None = None
    path: str | None = None


@dataclass
class Recognition:
    """The answer for one query.

    ``landmark`` is the best-voted landmark (None only when the index is empty); ``is_landmark`` says
    whether ``confidence`` reaches the threshold (always True without one). ``timings_ms`` holds the
    stage times of the batch the query was in (embed, search, ood, rerank, vote, total).
    """

    landmark: str | None
    confidence: float
    is_landmark: bool
    neighbours: list[Neighbour]
    timings_ms: dict[str, float] = field(default_factory=dict)
    # ids of the nearest index images when asked for (``retrieval_k``); re-ranked: verified first, by inliers
    retrieval: list[str] | None = None


@dataclass
class RecognizerInfo:
    """What :meth:`Recognizer.info` reports."""

    index: IndexInfo  # the index being searched
    recognize: dict[str, Any]  # the RecognizeConfig in use
    ood_active: bool  # the out-of-domain handling is on and the index has a non-landmark set
    #: is_landmark means confidence >= ``value``: {"value", "source": "configured" | "calibrated" | "none",
    #: "calibration": the index's calibration entry when calibrated}
    is_landmark_threshold: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the index's fields at the top level, plus ``recognize``, ``ood_active`` and
        ``is_landmark_threshold``."""
        return {
            **self.index.to_dict(),
            "recognize": dict(self.recognize),
            "ood_active": self.ood_active,
            "is_landmark_threshold": dict(self.is_landmark_threshold),
        }


# --- pure scoring -----------------------------------------------------------------------------------


def neighbour_scores(sims: np.ndarray, penalties: np.ndarray | None = None) -> np.ndarray:
    """Per-neighbour voting scores.

    Args:
        sims: ``(nq, k)`` float32 cosine similarities (``-inf`` for missing neighbours).
        penalties: ``(nq, k)`` float32 index-side penalties (mean top-5 cos(j, N)), or None.

    Returns:
        ``(nq, k)`` float32: ``sims`` without penalties, else ``clip(sims, 0, 1) - penalties``;
        missing neighbours stay ``-inf``.
    """
    sims = np.asarray(sims, dtype=np.float32)
    if penalties is None:
        return sims.copy()
    out = np.clip(sims, 0.0, 1.0) - np.asarray(penalties, dtype=np.float32)
    return np.where(np.isfinite(sims), out, -np.inf).astype(np.float32)


def vote(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the scores of each landmark among a query's neighbours and pick the best.

    Args:
        scores: ``(nq, k)`` float32 neighbour scores (``-inf`` or label ``-1`` = no neighbour).
        labels: ``(nq, k)`` int64 landmark codes of the neighbours (``-1`` = no neighbour).

    Returns:
        ``(best (nq,) int64, confidence (nq,) float32)``: the landmark with the largest sum (ties go to
        the landmark of the nearer neighbour); ``-1`` and ``-inf`` when a query has no neighbour.
    """
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    valid = (labels >= 0) & np.isfinite(scores)
    s = np.where(valid, scores, 0.0).astype(np.float32)
    same = (labels[:, :, None] == labels[:, None, :]) & valid[:, None, :]
    totals = np.einsum("qij,qj->qi", same.astype(np.float32), s)
    totals = np.where(valid, totals, -np.inf)
    if totals.shape[1] == 0:
        return np.full(len(scores), -1, np.int64), np.full(len(scores), -np.inf, np.float32)
    pos = np.argmax(totals, axis=1)
    conf = totals[np.arange(len(totals)), pos].astype(np.float32)
    best = np.where(np.isfinite(conf), labels[np.arange(len(labels)), pos], -1).astype(np.int64)
    return best, conf


def query_confidence(conf: np.ndarray, query_ood: np.ndarray | None, weight: float = 1.0) -> np.ndarray:
    """Query-side penalty: ``conf - weight * query_ood`` (``query_ood`` = mean top-10 cos(q, N)); ``(nq,)`` float32."""
    conf = np.asarray(conf, dtype=np.float32)
    if query_ood is None:
        return conf.copy()
    return (conf - np.float32(weight) * np.asarray(query_ood, dtype=np.float32)).astype(np.float32)


def demote(best: np.ndarray, conf: np.ndarray, above: int | None, penalty: float = 1.0) -> np.ndarray:
    """Lower the confidence of every query whose landmark is predicted for more than ``above`` queries.

    Args:
        best: ``(nq,)`` int64 predicted landmark codes (``-1`` = none, never demoted).
        conf: ``(nq,)`` float32 confidences.

    Returns:
        ``(nq,)`` float32: ``conf - penalty`` for the demoted queries, ``conf`` elsewhere.
    """
    conf = np.asarray(conf, dtype=np.float32).copy()
    if above is None or len(best) == 0:
        return conf
    best = np.asarray(best, dtype=np.int64)
    valid = best >= 0
    if not valid.any():
        return conf
    uniq, counts = np.unique(best[valid], return_counts=True)
    hubs = uniq[counts > above]
    mask = valid & np.isin(best, hubs)
    conf[mask] -= np.float32(penalty)
    return conf


# --- the recognizer ---------------------------------------------------------------------------------


class Recognizer:
    """Recognize in-memory images against a :class:`~landmarks.index.LandmarkIndex`."""

    def __init__(
        self,
        index: Any,
        embedder: Any,
        conf: RecognizeConfig | None = None,
        reranker: Reranker | None = None,
        index_dir: str | Path | None = None,
    ):
        from landmarks.extract import ExtractConfig

        self.index = index
        self.embedder = embedder
        self.conf = conf or RecognizeConfig()
        self.reranker = reranker
        self.index_dir = Path(index_dir) if index_dir is not None else getattr(index, "path", None)
        self._meta_stamp: tuple[int, int, int] | None = None
        if self.conf.rerank not in RERANK_CHOICES and reranker is None:
            raise ConfigError(f"unknown rerank {self.conf.rerank!r} (known: {', '.join(RERANK_CHOICES)})")
        index.check_model(embedder.fingerprint, embedder.describe().get("name"))
        self._verifier: PairVerifier | None = None  # pair_verification without a LocalReranker
        # local-feature verification of the top candidates (landmarks.rerank), when asked and no re-ranker is given
        if self.conf.rerank == "local" and reranker is None:
            self.reranker = LocalReranker.for_index(
                index,
                embedder,
                self.index_dir or "this index",
                workers=self.conf.rerank_workers,
                seed=self.conf.seed,
                model=self.conf.rerank_model,
                max_iters=self.conf.rerank_max_iters,
                c=self.conf.rerank_c,
                min_inliers=self.conf.rerank_min_inliers,
                weight=self.conf.rerank_weight,
            )
        #: is_landmark means confidence >= this (None: a landmark was voted); and where it comes from
        self.is_landmark_threshold, self.threshold_source = self._is_landmark_threshold()
        views = index.views
        self.extract_conf = ExtractConfig(
            batch_size=self.conf.batch_size,
            scales=tuple(views.get("scales", [1.0])),
            flip=bool(views.get("flip")),
        )

    @property
    def local(self) -> LocalReranker | None:
        """The re-ranker when it verifies with the index's local features (its store, its extractor)."""
        return self.reranker if isinstance(self.reranker, LocalReranker) else None

    @classmethod
    def load(
        cls,
        index_dir: str | Path,
        conf: RecognizeConfig | None = None,
        device: str = "cpu",
        *,
        model: str | Path | None = None,
        embedder: Any = None,
        reranker: Reranker | None = None,
    ) -> Recognizer:
        """Open an index and its model.

        The model is ``embedder`` when given, else the run ``model``, else the run recorded in the
        index's meta.json. Raises :class:`IncompatibleArtifactError` when the model is not the index's.
        """
        from landmarks import extract
        from landmarks.index import LandmarkIndex

        index = LandmarkIndex.load(index_dir)
        if embedder is None:
            source = model or index.meta["model"].get("source")
            if not source:
                raise LandmarksError(f"{index_dir}: meta.json names no model; pass the model run explicitly")
            if not Path(source).exists():
                raise LandmarksError(
                    f"model {source} (recorded in {index_dir}/meta.json) not found; pass --model"
                )
            embedder = extract.load_embedder(source, device=device)
        return cls(index, embedder, conf, reranker=reranker, index_dir=index_dir)

    def _is_landmark_threshold(self) -> tuple[float | None, str]:
        from landmarks.calibrate import voting_matches

        c = self.conf
        if c.threshold is not None:
            return float(c.threshold), "configured"
        entry = (getattr(self.index, "meta", None) or {}).get("calibration")
        if not c.calibrated or not entry:
            return None, "none"
        if not voting_matches(
            entry, c.k, c.ood and self.index.has_non_landmarks, c.ood_weight, c.ood_query_k
        ):
            logger.warning(
                "the index's is_landmark calibration was made with other voting settings (%s); "
                "is_landmark is not thresholded",
                entry.get("voting"),
            )
            return None, "none"
        return float(entry["threshold"]), "calibrated"

    def info(self) -> RecognizerInfo:
        """The index's :class:`~landmarks.index.IndexInfo`, the recognition settings, OOD availability."""
        thr: dict[str, Any] = {"value": self.is_landmark_threshold, "source": self.threshold_source}
        if self.threshold_source == "calibrated":
            thr["calibration"] = self.index.meta["calibration"]
        return RecognizerInfo(
            index=self.index.info(),
            recognize=asdict(self.conf),
            ood_active=bool(self.conf.ood and self.index.has_non_landmarks),
            is_landmark_threshold=thr,
        )

    # -- following the index on disk ------------------------------------------------------------------

    @property
    def generation(self) -> int:
        """The generation of the index in memory (see :func:`landmarks.maintenance.index_generation`)."""
        return int(self.index.generation)

    def load_newer(self) -> Any:
        """The committed index of ``index_dir`` when it is newer than the one in memory, else None.

        Cheap when nothing changed (one ``stat`` of meta.json). Does not change this recognizer: pass
        the result to :meth:`replace_index` (a server does that under its write lock).
        """
        from landmarks.index import LandmarkIndex
        from landmarks.maintenance import index_generation

        if self.index_dir is None:
            return None
        try:
            st = (self.index_dir / "meta.json").stat()
        except OSError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp == self._meta_stamp:
            return None
        if index_generation(self.index_dir) <= self.generation:
            self._meta_stamp = stamp
            return None
        index = LandmarkIndex.load(self.index_dir)
        index.check_model(self.embedder.fingerprint, self.embedder.describe().get("name"))
        return index

    def replace_index(self, index: Any) -> bool:
        """Use ``index`` (a newer generation of the same folder) from now on; False when it is not newer.

        The local re-ranker follows the new index's local-feature store. Not thread-safe against
        concurrent :meth:`recognize` calls: callers serialise (the service holds its write lock).
        """
        if index.generation <= self.generation:
            return False
        index.check_model(self.embedder.fingerprint, self.embedder.describe().get("name"))
        self.index = index
        if self.local is not None:
            self.local.follow(index.meta.get("local") or {})
        self.is_landmark_threshold, self.threshold_source = self._is_landmark_threshold()
        return True

    # -- embedding + recognition --------------------------------------------------------------------

    def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``(H, W, 3)`` uint8 images -> ``(n, D)`` float32 L2-normalised, with the index's views."""
        from landmarks.extract import embed_images

        return embed_images(self.embedder, images, self.extract_conf)

    def recognize(self, images: Sequence[np.ndarray], ids: Sequence[str] | None = None) -> list[Recognition]:
        """Recognize in-memory images (``(H, W, 3)`` uint8 RGB); one :class:`Recognition` per image.

        ``ids`` only name the images in log messages. Demotion (when configured) counts over this batch.
        """
        if ids is not None and len(ids) != len(images):
            raise LandmarksError(f"{len(images)} images but {len(ids)} ids")
        t0 = time.perf_counter()
        xq = self.embed(images) if len(images) else np.zeros((0, self.index.model_d), np.float32)
        t_embed = (time.perf_counter() - t0) * 1000.0
        return self.recognize_embeddings(
            xq, queries=list(images), extra_timings={"embed": t_embed}, t_start=t0
        )

    def recognize_embeddings(
        self,
        xq: np.ndarray,
        queries: Sequence[np.ndarray | str | Path] | None = None,
        extra_timings: dict[str, float] | None = None,
        t_start: float | None = None,
        retrieval_k: int = 0,
    ) -> list[Recognition]:
        """Recognize from the model's query embeddings ``xq (nq, D)`` float32 L2-normalised (mapped to the
        index's space, e.g. whitened, by :meth:`LandmarkIndex.project`).

        ``queries`` (images or paths) are handed to the re-ranker when one is configured. With
        ``retrieval_k`` each :class:`Recognition` also lists the ids of the ``retrieval_k`` nearest
        index images (``retrieval``; with local re-ranking the verified candidates come first, by inliers).

        Local re-ranking (``rerank="local"``): the top ``rerank_candidates`` candidates are verified;
        each scores ``s + min(inliers, c) / c`` (inlier counts below ``rerank_min_inliers`` count as
        0), where ``s`` is the neighbour's voting score (the cosine similarity, or with the
        non-landmark set its index-side penalised value); the candidates are re-ordered by that score,
        the first ``k`` vote, and the query-side penalty and demotion apply to the sum as without
        re-ranking. The neighbours then carry that score and their inlier counts.
        """
        t0 = time.perf_counter() if t_start is None else t_start
        timings = dict(extra_timings or {})
        conf = self.conf
        nq = len(xq)
        k_rerank = conf.rerank_candidates if self.reranker is not None else 0
        k_search = max(conf.k, k_rerank, retrieval_k)
        t = time.perf_counter()
        xq = self.index.project(xq, "query embeddings")
        xq_qe = None
        if conf.qe_n > 0 and (retrieval_k or conf.qe_vote):  # alpha-QE with the index's rows (DBA'd if any)
            from landmarks.expansion import ExpansionConfig, query_expansion

            xq_qe = query_expansion(
                xq, self.index.embeddings, self.index.search, ExpansionConfig(conf.qe_n, conf.qe_alpha)
            )
        sims, rows = self.index.search(xq_qe if xq_qe is not None and conf.qe_vote else xq, k_search)
        ret_rows = rows
        if xq_qe is not None and retrieval_k and not conf.qe_vote:
            _, ret_rows = self.index.search(xq_qe, retrieval_k)
        timings["search"] = (time.perf_counter() - t) * 1000.0

        t = time.perf_counter()
        use_ood = conf.ood and self.index.has_non_landmarks
        q_ood = self.index.query_ood(xq, conf.ood_query_k) if use_ood else None
        timings["ood"] = (time.perf_counter() - t) * 1000.0

        t = time.perf_counter()
        scores = None
        retrieval = (
            [[self.index.ids[r] for r in row[:retrieval_k] if r >= 0] for row in ret_rows]
            if retrieval_k
            else None
        )
        inliers = None
        if self.reranker is not None:
            if queries is None or len(queries) != nq:
                raise LandmarksError("re-ranking needs the query images or paths")
            sims, rows, inliers, scores, retrieval = self._rerank(queries, sims, rows, retrieval)
        timings["rerank"] = (time.perf_counter() - t) * 1000.0

        t = time.perf_counter()
        best, confidence, names = self.vote(
            sims[:, : conf.k],
            rows[:, : conf.k],
            q_ood,
            scores=None if scores is None else scores[:, : conf.k],
        )
        timings["vote"] = (time.perf_counter() - t) * 1000.0
        timings["total"] = (time.perf_counter() - t0) * 1000.0

        out = []
        shown = sims if scores is None else scores  # re-ranked: the score that ordered the candidates
        for q in range(nq):
            nbrs = self._neighbours(
                shown[q, : conf.k], rows[q, : conf.k], None if inliers is None else inliers[q, : conf.k]
            )
            lm = names[best[q]] if best[q] >= 0 else None
            c = float(confidence[q]) if np.isfinite(confidence[q]) else 0.0
            is_lm = lm is not None and (self.is_landmark_threshold is None or c >= self.is_landmark_threshold)
            out.append(
                Recognition(
                    landmark=lm,
                    confidence=c,
                    is_landmark=is_lm,
                    neighbours=nbrs,
                    timings_ms=dict(timings),
                    retrieval=None if retrieval is None else retrieval[q],
                )
            )
        return out

    def vote(
        self,
        sims: np.ndarray,
        rows: np.ndarray,
        query_ood: np.ndarray | None,
        scores: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Voting for a batch: ``sims``/``rows`` ``(nq, k)`` from :meth:`LandmarkIndex.search`.

        ``scores``: ``(nq, k)`` neighbour scores already computed (local re-ranking), else
        :func:`neighbour_scores` of ``sims``. Returns ``(best (nq,) int64 codes, confidence (nq,)
        float32, names)``; ``names[code]`` is the landmark.
        """
        codes, names = self.index.landmark_codes()
        labels = np.where(rows >= 0, codes[np.maximum(rows, 0)] if len(codes) else -1, -1)
        use_ood = self.conf.ood and self.index.has_non_landmarks
        if scores is None:
            scores = self._neighbour_scores(sims, rows)
        best, conf = vote(scores, labels)
        conf = query_confidence(conf, query_ood if use_ood else None, self.conf.ood_weight)
        conf = demote(best, conf, self.conf.demote_above, self.conf.demote_penalty)
        return best, conf, names

    def retrieve(self, xq: np.ndarray, k: int = 100) -> list[list[str]]:
        """Ids of the ``k`` most similar index images of each query (model embeddings; cosine, no voting)."""
        _, rows = self.index.search(self.index.project(xq, "query embeddings"), k)
        return [[self.index.ids[r] for r in row if r >= 0] for row in rows]

    def _neighbours(self, sims: np.ndarray, rows: np.ndarray, inliers: np.ndarray | None) -> list[Neighbour]:
        out = []
        for j, (s, r) in enumerate(zip(sims, rows)):
            if r < 0:
                continue
            n_in = None if inliers is None or inliers[j] < 0 else int(inliers[j])
            out.append(
                Neighbour(
                    id=self.index.ids[r],
                    landmark=self.index.landmarks[r] or "",
                    score=float(s),
                    inliers=n_in,
                    path=self.index.paths[r],
                )
            )
        return out

    def _neighbour_scores(self, sims: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``(nq, k)`` voting scores of search results (:func:`neighbour_scores`, penalised with the
        non-landmark set when it is used)."""
        use_ood = self.conf.ood and self.index.has_non_landmarks
        pen = self.index.penalty[np.maximum(rows, 0)] if use_ood and len(self.index.ids) else None
        return neighbour_scores(sims, pen)

    def _rerank(
        self,
        queries: Sequence[np.ndarray | str | Path],
        sims: np.ndarray,
        rows: np.ndarray,
        retrieval: list[list[str]] | None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[list[str]] | None]:
        """Re-rank the top-K candidates with :attr:`reranker` (see :meth:`recognize_embeddings`).

        Returns ``(sims, rows, inliers, scores, retrieval)``, the first four ``(nq, K')`` with
        ``K' = max(k, K)`` columns sorted by the new scores (``inliers`` ``-1`` where not verified);
        in ``retrieval`` the candidates come first, in the re-ranker's retrieval order.
        """
        assert self.reranker is not None
        conf = self.conf
        kk = min(sims.shape[1], max(conf.k, conf.rerank_candidates))
        K = min(kk, conf.rerank_candidates)
        sims, rows = sims[:, :kk].copy(), rows[:, :kk].copy()
        scores = self._neighbour_scores(sims, rows)
        cands = Candidates.select(sims, rows, self.index.ids, scores, K)
        res = self.reranker.rerank(queries, cands)
        if res.scores.shape != cands.scores.shape or res.inliers.shape != cands.scores.shape:
            raise LandmarksError(
                f"the re-ranker returned scores {res.scores.shape} and inliers {res.inliers.shape} "
                f"for candidates {cands.scores.shape}"
            )
        scores[:, :K] = res.scores
        inl = np.full(rows.shape, -1, np.int64)
        inl[:, :K] = res.inliers
        if retrieval is not None:  # the candidates in the re-ranker's order, then the rest in global order
            for q, ids in enumerate(cands.ids):
                head = [ids[i] for i in res.retrieval[q]]
                seen = set(head)
                retrieval[q] = (head + [x for x in retrieval[q] if x not in seen])[: len(retrieval[q])]
        order = rerank_order(scores)
        sims, rows, inl, scores = (np.take_along_axis(x, order, axis=1) for x in (sims, rows, inl, scores))
        return sims, rows, inl, scores, retrieval

    def pair_verification(
        self, query: np.ndarray, image_id: str, image: np.ndarray | str | Path
    ) -> tuple[LocalFeatures, LocalFeatures, Verification]:
        """``(query features, image features, Verification)`` of a query and index image ``image_id``.

        The verification re-ranking runs: the stored features and the re-ranker's settings when it
        verifies with them, else the index's recorded extractor (default SIFT) on ``image`` (an
        ``(H, W, 3)`` uint8 array or a path) with the configured RANSAC settings.
        """
        local = self.local
        got = local.verification(query, image_id) if local is not None else None
        if got is not None:
            return got
        if self._verifier is None:
            self._verifier = PairVerifier.for_index(
                self.index.meta,
                self.embedder,
                model=self.conf.rerank_model,
                seed=self.conf.seed,
                max_iters=self.conf.rerank_max_iters,
            )
        fa, fb = self._verifier.features(query), self._verifier.features(image)
        return fa, fb, self._verifier.verify(fa, fb)

    def close(self) -> None:
        """End the re-ranking worker processes (if any); the recognizer stays usable (they restart)."""
        if self.reranker is not None:
            self.reranker.close()

    def __enter__(self) -> Recognizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- growing the index ---------------------------------------------------------------------------

    def add(
        self,
        records: Sequence[ImageRecord],
        *,
        num_workers: int | None = None,
        wait_s: float = 0.0,
        command: str = "add",
        swap: bool = True,
        show_progress: bool = True,
    ) -> AddResult:
        """Add labelled ``records`` to the index on disk (:func:`landmarks.maintenance.add_to_index`).

        The stage holds the folder's writer lock and starts from the committed index (never from this
        recognizer's copy). With ``swap`` the committed index then replaces the one in memory; a server
        passes ``swap=False`` and calls :meth:`replace_index` under its own write lock.
        """
        from landmarks.maintenance import add_to_index

        if self.index_dir is None:
            raise LandmarksError("this recognizer's index has no folder to save to")
        res = add_to_index(
            self.index_dir,
            records,
            self.embedder,
            batch_size=self.conf.batch_size,
            num_workers=num_workers,
            wait_s=wait_s,
            command=command,
            show_progress=show_progress,
        )
        if swap:
            self.replace_index(res.index)
        return res


def neighbours_row(query_id: str, path: str | None, rec: Recognition) -> dict[str, Any]:
    """The ``--neighbours`` JSON-lines row of one query."""
    return {
        "id": query_id,
        "path": path,
        "landmark": rec.landmark if rec.is_landmark else None,
        "confidence": rec.confidence,
        "neighbours": [
            {"id": n.id, "landmark": n.landmark, "score": n.score, "inliers": n.inliers, "path": n.path}
            for n in rec.neighbours
        ],
    }
