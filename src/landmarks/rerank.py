"""Local-feature re-ranking: scoring, candidate selection, the worker pool, the index's feature store.

An index built with ``landmarks index --local sift|model`` holds the local features of every indexed
image in ``INDEX/local/`` (a :class:`~landmarks.local_features.LocalFeatureStore`) and records the
extractor in ``INDEX/meta.json``::

    "local": {"features": "sift" | "model", "dir": "local", "extractor": {... extractor.to_info() ...}}

Whoever reads the index rebuilds that extractor (:func:`index_extractor`): recognition, the report,
the service's match drawing and ``landmarks match --index`` see the same features.

:class:`LocalReranker` (a :class:`Reranker`) extracts a query's local features with that extractor,
verifies the query against its top-K global candidates (:class:`PairVerifier`: matching + seeded
RANSAC of :mod:`landmarks.verify`) in worker processes that read the candidates' features from the
store themselves (memory-mapped: only the query's features travel), and re-scores them. The scoring
is pure (:func:`local_scores`): ``score = s + min(inliers, c) / c`` with ``s`` the candidate's voting
score (the cosine similarity, or its out-of-domain-penalised version) and inlier counts below
``min_inliers`` counted as none; :mod:`landmarks.recognize` then votes with these scores. Retrieval
lists verified candidates first, by inliers (:func:`retrieval_order`).

Parallelism: one pool of spawned workers (:func:`worker_pool`) serves both extraction (decoding, and
SIFT) and verification. While re-ranking, the main process extracts query features (the model's
forward pass for DELG) while the workers verify earlier queries; a batch smaller than the pool splits
each query's candidates over the workers instead. Every pair is verified with the same seed whichever
process runs it, so the results equal the serial ones.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from landmarks.data.collection import ImageRecord
from landmarks.errors import ConfigError, ImageDecodeError, IncompatibleArtifactError, LandmarksError
from landmarks.local_features import (
    EXTRACTORS,
    LOCAL_FEATURES,
    LocalExtractor,
    LocalFeatures,
    LocalFeatureStore,
    extractor_from_info,
    make_local_extractor,
)
from landmarks.utils.dist import default_workers
from landmarks.verify import Verification, verify

logger = logging.getLogger("landmarks")

#: Sub-folder of an index that holds its local features.
LOCAL_DIR = "local"
#: Values of ``landmarks index --local``: RootSIFT, or the run's own DELG-style local head.
LOCAL_CHOICES = tuple(LOCAL_FEATURES)
#: Geometric model of re-ranking: landmarks are 3-D scenes.
RERANK_MODEL = "fundamental"
#: RANSAC iterations at most per pair (most candidates are unrelated and run to the limit; 2,000 vs
#: 10,000 changed no inlier count on 400 synthetic pairs and costs 0.56 instead of 0.81 ms per pair).
RERANK_MAX_ITERS = 2000


# --- pure scoring -----------------------------------------------------------------------------------


def local_scores(
    base: np.ndarray, inliers: np.ndarray, c: float = 70.0, min_inliers: int = 0, weight: float = 1.0
) -> np.ndarray:
    """Re-ranked candidate scores ``base + weight * min(inliers, c) / c``; counts below ``min_inliers`` count as 0.

    Args:
        base: ``(nq, K)`` float32 global scores of the candidates (``-inf`` = no candidate).
        inliers: ``(nq, K)`` int inlier counts (negative = not verified, no bonus).
        c: inlier count at which the bonus saturates at 1 (70 in the GLR-2019 solutions).
        min_inliers: smaller counts earn nothing (unrelated pairs always fit a few matches).
        weight: the saturated bonus, in units of the global score (1: a verified candidate outranks any
            unverified one; smaller: the global similarity keeps a say, for strong global descriptors).

    Returns:
        ``(nq, K)`` float32; ``-inf`` stays ``-inf``.
    """
    if c <= 0:
        raise ValueError(f"c must be positive, got {c}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    base = np.asarray(base, dtype=np.float32)
    n = np.asarray(inliers, dtype=np.float64)
    if n.shape != base.shape:
        raise ValueError(f"scores {base.shape} and inliers {n.shape} differ in shape")
    n = np.where(n >= max(min_inliers, 0), np.maximum(n, 0.0), 0.0)
    return (base + weight * (np.minimum(n, c) / c)).astype(np.float32)


def rerank_order(scores: np.ndarray) -> np.ndarray:
    """``(nq, K)`` int64: each row's candidates by decreasing score (stable: ties keep the global order)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=1, kind="stable").astype(np.int64)


def retrieval_order(similarities: np.ndarray, inliers: np.ndarray, min_inliers: int = 15) -> np.ndarray:
    """``(K,)`` int64 order of one query's candidates for retrieval.

    Candidates with ``inliers >= min_inliers`` come first by decreasing inliers, then the rest by
    decreasing ``similarities`` (``(K,)``); ties keep the input order.
    """
    s = np.asarray(similarities, dtype=np.float64).reshape(-1)
    n = np.asarray(inliers, dtype=np.int64).reshape(-1)
    if s.shape != n.shape:
        raise ValueError(f"{len(s)} similarities but {len(n)} inlier counts")
    verified = n >= max(1, min_inliers)
    idx = np.arange(len(s))
    # lexsort: last key is primary.
    key_inl = np.where(verified, -n, 0)
    key_sim = np.where(verified, 0.0, -s)
    return np.lexsort((idx, key_sim, key_inl, ~verified)).astype(np.int64)


# --- the re-ranking contract ------------------------------------------------------------------------


@dataclass
class Candidates:
    """The top-K global candidates of a batch of queries, in global order (what a re-ranker sees)."""

    ids: list[list[str]]  # nq lists of K_q <= K index image ids (missing neighbours left out)
    similarities: np.ndarray  # (nq, K) float32 cosine similarities; -inf past K_q
    scores: (
        np.ndarray
    )  # (nq, K) float32 voting scores (recognize.neighbour_scores: OOD-penalised); -inf past K_q

    @classmethod
    def select(
        cls, similarities: np.ndarray, rows: np.ndarray, ids: Sequence[str], scores: np.ndarray, k: int
    ) -> Candidates:
        """The first ``k`` columns of a search result ``(nq, >= k)`` (``rows`` ``-1`` = no neighbour)."""
        rows = np.asarray(rows)[:, :k]
        return cls(
            ids=[[ids[r] for r in row if r >= 0] for row in rows],
            similarities=np.asarray(similarities, dtype=np.float32)[:, :k],
            scores=np.asarray(scores, dtype=np.float32)[:, :k],
        )


@dataclass
class Reranked:
    """What a :class:`Reranker` returns for :class:`Candidates` (columns in the candidates' order)."""

    scores: np.ndarray  # (nq, K) float32 new voting scores; recognition sorts and votes with them
    inliers: np.ndarray  # (nq, K) int64 verified inlier counts; -1 = not verified
    retrieval: list[np.ndarray]  # per query, (K_q,) int64 positions into ids[q]: the retrieval order


class Reranker(Protocol):
    """Re-ranks the top global candidates of a batch of queries (e.g. by geometric verification)."""

    def rerank(self, queries: Sequence[np.ndarray | str | Path], candidates: Candidates) -> Reranked:
        """Re-score ``candidates`` of ``queries`` (``(H, W, 3)`` uint8 images or paths)."""
        ...

    def close(self) -> None:
        """Release workers (the re-ranker stays usable)."""
        ...


# --- extractors -------------------------------------------------------------------------------------


def _loaded_model(embedder: Any) -> Any:
    """The ``LoadedModel`` behind an embedder (``CheckpointEmbedder.loaded``), or None."""
    return getattr(embedder, "loaded", None)


def index_extractor(features: str, embedder: Any = None, **kwargs: Any) -> LocalExtractor:
    """A new extractor for ``landmarks index --local FEATURES`` (``"sift"`` or ``"model"``).

    Args:
        features: a key of :data:`~landmarks.local_features.LOCAL_FEATURES`.
        embedder: the index's embedder (``"model"`` uses the local head of the run behind it).
        kwargs: override the extractor's defaults.

    Raises :class:`LandmarksError` when ``"model"`` is asked of a run without a local head.
    """
    if features not in LOCAL_FEATURES:
        raise ConfigError(f"unknown local features {features!r} (known: {', '.join(LOCAL_CHOICES)})")
    loaded = _loaded_model(embedder)
    if LOCAL_FEATURES[features].needs_model and not getattr(
        getattr(loaded, "model", None), "has_local_head", False
    ):
        source = (embedder.describe().get("source") if embedder is not None else None) or "the model"
        raise LandmarksError(
            f"--local model: {source} has no local-feature head; train one (`landmarks train --init RUN "
            "--local-only --out RUN2`, or `landmarks train --local`) or use --local sift"
        )
    return make_local_extractor(features, loaded, **kwargs)


def extractor_from_meta(local_meta: dict[str, Any], embedder: Any = None) -> LocalExtractor:
    """Rebuild the extractor recorded in an index's ``meta["local"]`` (same settings, same features).

    Raises :class:`IncompatibleArtifactError` when the model's local head differs from the one the
    index's features were extracted with.
    """
    return extractor_from_info(dict(local_meta.get("extractor") or {}), _loaded_model(embedder))


def index_extractor_from_dir(index_dir: str | Path, device: str = "cpu") -> LocalExtractor | None:
    """The local-feature extractor an index folder recorded (None when it has no local features).

    For model features the run named in the index's ``meta.json`` is loaded on ``device``. Raises
    :class:`LandmarksError` when the index or its run cannot be read.
    """
    from landmarks.utils.io import read_json

    meta_path = Path(index_dir) / "meta.json"
    if not meta_path.exists():
        raise LandmarksError(f"{index_dir}: not an index folder (no meta.json)")
    meta = read_json(meta_path)
    local = meta.get("local")
    if not local:
        return None
    info = dict(local.get("extractor") or {})
    loaded = None
    cls = EXTRACTORS.get(str(info.get("name")))
    if cls is not None and cls.needs_model:
        from landmarks.checkpoint import load_model

        source = (meta.get("model") or {}).get("source")
        if not source or not Path(source).exists():
            raise LandmarksError(
                f"{index_dir}: its local features come from model {source}, which is not found"
            )
        loaded = load_model(Path(source), device=device)
    return extractor_from_info(info, loaded)


def local_meta(extractor: LocalExtractor) -> dict[str, Any]:
    """The ``meta["local"]`` entry of an index whose features ``extractor`` made."""
    return {"features": extractor.features, "dir": LOCAL_DIR, "extractor": extractor.to_info()}


# --- pair verification as re-ranking runs it --------------------------------------------------------


@dataclass
class PairVerifier:
    """Matching + seeded RANSAC of two images' local features, with re-ranking's settings.

    The report, the service's match drawing and ``landmarks match --index`` use the same object as
    :class:`LocalReranker`, so they verify (and draw) what recognition verified.
    """

    extractor: LocalExtractor  # the index's extractor (index_extractor_from_dir / extractor_from_meta)
    model: str = RERANK_MODEL  # geometric model: "fundamental", "homography" or "affine"
    seed: int = 0  # RANSAC seed (results are deterministic given it)
    max_iters: int = RERANK_MAX_ITERS  # RANSAC iterations at most per pair

    @classmethod
    def for_index(
        cls, index_meta: dict[str, Any] | None = None, embedder: Any = None, **kwargs: Any
    ) -> PairVerifier:
        """The verifier of an index whose ``meta.json`` is ``index_meta``: its recorded extractor (the
        default SIFT one when it has no local features, or no meta is given); ``kwargs``: the fields."""
        local = (index_meta or {}).get("local")
        extractor = extractor_from_meta(local, embedder) if local else make_local_extractor("sift")
        return cls(extractor, **kwargs)

    @classmethod
    def for_index_dir(cls, index_dir: str | Path | None, device: str = "cpu", **kwargs: Any) -> PairVerifier:
        """:meth:`for_index` of an index folder (loads the run of model features on ``device``)."""
        extractor = index_extractor_from_dir(index_dir, device) if index_dir is not None else None
        return cls(extractor if extractor is not None else make_local_extractor("sift"), **kwargs)

    def verify_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`landmarks.verify.verify` (picklable: they travel to workers)."""
        return {
            "model": self.model,
            "seed": int(self.seed),
            "max_iters": int(self.max_iters),
            "threshold_px": self.extractor.ransac_threshold_px,
        }

    def features(self, image: np.ndarray | str | Path) -> LocalFeatures:
        """Local features of an ``(H, W, 3)`` uint8 image or an image path."""
        from landmarks.data.decode import decode_image

        return self.extractor(decode_image(image) if isinstance(image, (str, Path)) else image)

    def verify(self, feats_a: LocalFeatures, feats_b: LocalFeatures) -> Verification:
        """The :class:`~landmarks.verify.Verification` of one pair."""
        return verify(feats_a, feats_b, **self.verify_kwargs())


def verify_candidates(
    query: LocalFeatures, candidates: Sequence[LocalFeatures | None], **verify_kwargs: Any
) -> list[Verification]:
    """Verify a query against each of its K candidates in this process; results in candidate order.

    A candidate None (no features stored) gets an empty :class:`Verification` (0 inliers).
    """
    model = str(verify_kwargs.get("model", RERANK_MODEL))
    return [Verification.empty(model) if c is None else verify(query, c, **verify_kwargs) for c in candidates]


# --- the worker pool --------------------------------------------------------------------------------

_WORKER_EXTRACTOR: LocalExtractor | None = None


def limit_blas_threads(n: int = 1) -> list[str]:
    """Set the thread count of every OpenBLAS loaded in this process (NumPy's and OpenCV's own copy).

    ``cv2.gemm`` (descriptor matching) runs on the OpenBLAS bundled with OpenCV, whose thread pool
    ignores ``cv2.setNumThreads``; in worker processes that each verify one pair at a time, its
    threads only fight each other (a 230 x 250 x 128 product: 1.8-8 ms with the default threads,
    0.2-0.4 ms with one, on 2 busy cores). Linux only (reads ``/proc/self/maps``); elsewhere a no-op.
    Returns the libraries changed.
    """
    import ctypes

    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            libs = sorted({line.split()[-1] for line in f if "openblas" in line.split()[-1].lower()})
    except OSError:
        return []
    done = []
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for symbol in (
            "openblas_set_num_threads",
            "scipy_openblas_set_num_threads64_",
            "openblas_set_num_threads64_",
        ):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done.append(path)
                break
    return done


def _init_worker(extractor: LocalExtractor | None) -> None:
    """Worker start: one OpenCV and BLAS thread, Ctrl-C left to the parent (it shuts the pool down),
    and the extractor that :func:`_worker_item` runs here (None: only decode)."""
    import signal

    import cv2

    global _WORKER_EXTRACTOR
    cv2.setNumThreads(1)
    limit_blas_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER_EXTRACTOR = extractor


def worker_pool(workers: int, extractor: LocalExtractor | None = None) -> ProcessPoolExecutor:
    """The pool of local-feature work: ``workers`` spawned processes (a fork of a threaded server or of
    OpenCV's thread pool can deadlock), one OpenCV/BLAS thread each.

    ``extractor``: a weight-free extractor (``needs_model`` False) the workers run on the images they
    decode (:func:`_worker_item`); verification jobs (:func:`verify_job`) need none.
    """
    import multiprocessing

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    return ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(extractor,),
    )


def default_rerank_workers() -> int:
    """Verification processes by default: the CPUs minus one (the main process extracts), at most 8."""
    return default_workers(8)


# --- extraction into a store ------------------------------------------------------------------------


@dataclass
class LocalExtraction:
    """What :func:`extract_local_features` did."""

    done: int  # images extracted by this call (resumed ones not counted)
    resumed: int  # images already in the store
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images


def _worker_item(path: str) -> tuple[Any, str | None]:
    """:func:`_decode_and_extract` in a worker, with the extractor it was started with."""
    return _decode_and_extract(path, _WORKER_EXTRACTOR)


def _decode_and_extract(path: str, extractor: LocalExtractor | None) -> tuple[Any, str | None]:
    """``(LocalFeatures, None)``, ``(image, None)`` (no ``extractor``) or ``(None, reason)``."""
    from landmarks.data.decode import decode_image

    try:
        img = decode_image(path)
    except ImageDecodeError as e:
        return None, e.reason
    except Exception as e:  # one odd file must not stop the run
        return None, f"cannot decode ({type(e).__name__}: {e})"
    if extractor is None:
        return img, None
    try:
        return extractor(img), None
    except Exception as e:
        return None, f"local features failed: {type(e).__name__}: {e}"


def extract_local_features(
    extractor: LocalExtractor,
    records: Sequence[ImageRecord],
    store: LocalFeatureStore,
    *,
    skipped_csv: str | Path | None = None,
    chunk_size: int = 512,
    num_workers: int | None = None,
    show_progress: bool = True,
    desc: str = "local features",
) -> LocalExtraction:
    """Extract the local features of ``records`` into ``store``, resuming: ids already stored are skipped.

    Images are decoded (and, for extractors that need no model, e.g. SIFT, also extracted) in
    ``num_workers`` spawned worker processes (not forked: OpenCV's thread pool does not survive a
    fork); a model's extractor runs in this process. Every ``chunk_size`` images are committed as one
    store chunk, so a killed run redoes at most one chunk. An image that cannot be read is logged,
    listed in ``skipped_csv`` and stored with no features (a candidate without features verifies
    with 0 inliers).

    Args:
        extractor: the local-feature extractor (its ``info()`` must match the store's).
        records: the images (ids unique).
        num_workers: worker processes (None: CPUs - 1, at most 8; 0: all in this process).

    Returns:
        :class:`LocalExtraction`.
    """
    from landmarks.utils.io import SkippedLog
    from landmarks.utils.progress import Progress

    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    todo = [r for r in records if not store.has(r.id)]
    resumed = len(records) - len(todo)
    if resumed and todo:
        logger.info(
            "%s: resuming, %d of %d images already have local features", store.root, resumed, len(records)
        )
    out = LocalExtraction(done=0, resumed=resumed)
    if not todo:
        return out
    in_worker = not extractor.needs_model  # weight-free: extract where we decode
    workers = default_workers(8) if num_workers is None else max(0, num_workers)
    pool = worker_pool(workers, extractor if in_worker else None) if workers > 0 else None
    log = SkippedLog(skipped_csv) if skipped_csv is not None else None
    bar = Progress(len(records), desc, "img", disable=not show_progress)
    bar.update(resumed)
    try:
        for start in range(0, len(todo), chunk_size):
            part = todo[start : start + chunk_size]
            paths = [str(r.path) for r in part]
            if pool is not None:
                items = pool.map(_worker_item, paths, chunksize=max(1, min(16, len(part) // (4 * workers))))
            else:
                items = (_decode_and_extract(p, extractor if in_worker else None) for p in paths)
            feats: list[LocalFeatures] = []
            for rec, (item, reason) in zip(part, items):
                if item is not None and not in_worker:
                    try:
                        item = extractor(item)
                    except Exception as e:  # e.g. an image too small for the model
                        item, reason = None, f"local features failed: {type(e).__name__}: {e}"
                if item is None:
                    logger.warning("skipped %s: %s", rec.path, reason)
                    out.skipped.append((str(rec.path), str(reason)))
                    if log is not None:
                        log.add(rec.path, f"local features: {reason}")
                    item = LocalFeatures.empty(store.dim, (0, 0))
                feats.append(item)
                bar.update(1, skipped=len(out.skipped))
            store.write_chunk([r.id for r in part], feats)
            out.done += len(part)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return out


def open_or_create_store(index_dir: Path, extractor: LocalExtractor) -> LocalFeatureStore:
    """The index's store for ``extractor``; a store of another extractor is replaced (started over)."""
    import shutil

    root = index_dir / LOCAL_DIR
    try:
        return LocalFeatureStore.create(root, extractor.dim, extractor.to_info())
    except IncompatibleArtifactError as e:
        logger.info("starting the local features over: %s", e)
        shutil.rmtree(root, ignore_errors=True)
        return LocalFeatureStore.create(root, extractor.dim, extractor.to_info())


# --- verification in workers ------------------------------------------------------------------------

_STORES: dict[str, tuple[int, LocalFeatureStore]] = {}
_STORES_LOCK = threading.Lock()


def _store_in_worker(root: str, generation: int) -> LocalFeatureStore:
    """The store at ``root`` opened once per process (re-opened when the index grew)."""
    with _STORES_LOCK:
        cached = _STORES.get(root)
        if cached is None or cached[0] != generation:
            cached = (generation, LocalFeatureStore.open(root))
            _STORES[root] = cached
        return cached[1]


def verify_job(
    store_root: str,
    generation: int,
    query: LocalFeatures,
    candidate_ids: Sequence[str],
    verify_kwargs: dict[str, Any],
) -> list[int]:
    """Inlier counts of ``query`` against each stored candidate (0 where none are stored).

    Runs in a worker process (or inline): reads the candidates from the store, then
    :func:`verify_candidates`.
    """
    store = _store_in_worker(store_root, generation)
    cands = store.get_many(list(candidate_ids))
    return [int(v.num_inliers) for v in verify_candidates(query, cands, **verify_kwargs)]


class LocalReranker:
    """A :class:`Reranker` by geometric verification with an index's local features.

    Args:
        index_dir: the index folder (``meta.json`` with a ``"local"`` entry, ``local/``).
        local_meta: the index's ``meta["local"]``.
        extractor: the extractor of the queries (:func:`extractor_from_meta`).
        workers: verification processes (0: in this process; None: :func:`default_rerank_workers`).
            The pool is created on first use and reused; :meth:`close` ends it.
        seed: RANSAC seed (results are deterministic given it).
        model: geometric model (``fundamental``, ``homography``, ``affine``).
        max_iters: RANSAC iterations at most per pair.
        c: the inlier bonus ``min(inliers, c) / c`` saturates at ``c`` inliers (:func:`local_scores`).
        min_inliers: fewer inliers earn no bonus and do not count as verified.
        weight: the saturated inlier bonus in units of the global score (:func:`local_scores`).
    """

    def __init__(
        self,
        index_dir: str | Path,
        local_meta: dict[str, Any],
        extractor: LocalExtractor,
        *,
        workers: int | None = None,
        seed: int = 0,
        model: str = RERANK_MODEL,
        max_iters: int = RERANK_MAX_ITERS,
        c: float = 70.0,
        min_inliers: int = 10,
        weight: float = 1.0,
    ):
        self.index_dir = Path(index_dir)
        self.meta = dict(local_meta)
        self.extractor = extractor
        self.verifier = PairVerifier(extractor, model=model, seed=int(seed), max_iters=int(max_iters))
        self.c = float(c)
        self.min_inliers = int(min_inliers)
        self.weight = float(weight)
        self.store_root = self.index_dir / str(self.meta.get("dir", LOCAL_DIR))
        self.store = LocalFeatureStore.open(self.store_root)
        self.workers = default_rerank_workers() if workers is None else max(0, int(workers))
        self.verify_kwargs: dict[str, Any] = self.verifier.verify_kwargs()
        self.generation = 0
        self._executor: Executor | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_index(cls, index: Any, embedder: Any, index_dir: str | Path, **kwargs: Any) -> LocalReranker:
        """The re-ranker of a loaded index; raises :class:`LandmarksError` when it has no local features."""
        meta = index.meta.get("local")
        if not meta:
            raise ConfigError(
                f"rerank='local' needs the index's local features for the re-ranker, and {index_dir} has none: "
                "rebuild it with `landmarks index ... --local sift` (or --local model)"
            )
        return cls(index_dir, meta, extractor_from_meta(meta, embedder), **kwargs)

    # -- pool -----------------------------------------------------------------------------------------

    def _pool(self) -> Executor | None:
        if self.workers <= 0:
            return None
        with self._lock:
            if self._executor is None:
                self._executor = worker_pool(self.workers)
            return self._executor

    def close(self) -> None:
        """End the worker processes (a later call starts them again)."""
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)

    # -- re-ranking -------------------------------------------------------------------------------------

    def rerank(self, queries: Sequence[np.ndarray | str | Path], candidates: Candidates) -> Reranked:
        """Verify each query against its candidates and re-score them (:func:`local_scores`).

        Returns :class:`Reranked`: ``scores`` = ``candidates.scores + min(inliers, c) / c``,
        ``inliers`` (-1 past a query's candidates), ``retrieval`` = :func:`retrieval_order`.
        """
        inl = np.full(candidates.scores.shape, -1, np.int64)
        for q, counts in enumerate(self.inliers(queries, candidates.ids)):
            inl[q, : len(counts)] = counts
        scores = local_scores(candidates.scores, inl, self.c, self.min_inliers, self.weight)
        retrieval = [
            retrieval_order(candidates.similarities[q, : len(ids)], inl[q, : len(ids)], self.min_inliers)
            for q, ids in enumerate(candidates.ids)
        ]
        return Reranked(scores=scores, inliers=inl, retrieval=retrieval)

    def verification(
        self, query: np.ndarray | str | Path, image_id: str
    ) -> tuple[LocalFeatures, LocalFeatures, Verification] | None:
        """``(query features, stored features, Verification)`` of a query and one index image, as
        :meth:`rerank` verifies it (None when the image has no stored features)."""
        if not self.store.has(image_id):
            return None
        fa, fb = self.query_features(query), self.store.get(image_id)
        return fa, fb, self.verifier.verify(fa, fb)

    # -- queries ----------------------------------------------------------------------------------------

    def query_features(self, query: np.ndarray | str | Path) -> LocalFeatures:
        """Local features of a query (an ``(H, W, 3)`` uint8 image or a path)."""
        return self.verifier.features(query)

    def inliers(
        self, queries: Sequence[np.ndarray | str | Path], candidates: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        """Inlier counts of each query against each of its candidates.

        Args:
            queries: nq images (``(H, W, 3)`` uint8) or paths.
            candidates: nq lists of index image ids.

        Returns:
            nq ``(K_q,)`` int64 arrays (0 where a candidate has no stored features; a query that
            cannot be read gets 0 everywhere, logged).
        """
        if len(queries) != len(candidates):
            raise LandmarksError(f"{len(queries)} queries but {len(candidates)} candidate lists")
        pool = self._pool()
        root = str(self.store_root)
        out: list[np.ndarray] = [np.zeros(len(c), np.int64) for c in candidates]
        pending: list[tuple[int, list[int], Future[list[int]]]] = []
        n_groups = 1 if pool is None else max(1, math.ceil(self.workers / max(1, len(queries))))
        for q, (query, cands) in enumerate(zip(queries, candidates)):
            if not len(cands):
                continue
            try:
                feats = self.query_features(query)
            except (ImageDecodeError, ValueError) as e:
                logger.warning(
                    "query %s: no local features (%s); not re-ranked",
                    query if isinstance(query, (str, Path)) else q,
                    e,
                )
                continue
            ids = list(cands)
            if pool is None:
                out[q][:] = verify_job(root, self.generation, feats, ids, self.verify_kwargs)
                continue
            g = min(n_groups, len(ids))
            for k in range(g):
                pos = list(range(k, len(ids), g))
                pending.append(
                    (
                        q,
                        pos,
                        pool.submit(
                            verify_job,
                            root,
                            self.generation,
                            feats,
                            [ids[p] for p in pos],
                            self.verify_kwargs,
                        ),
                    )
                )
        for q, pos, fut in pending:
            out[q][pos] = fut.result()
        return out

    # -- growing ------------------------------------------------------------------------------------------

    def follow(self, local_meta: dict[str, Any]) -> None:
        """Read the store a newer generation of the index names (``meta["local"]``) from now on.

        Worker processes re-open it on their next job (the store is keyed by folder and generation).
        """
        with self._lock:
            self.meta = dict(local_meta)
            self.store_root = self.index_dir / str(self.meta.get("dir", LOCAL_DIR))
            self.store = LocalFeatureStore.open(self.store_root)
            self.generation += 1

    def add(
        self,
        records: Sequence[ImageRecord],
        *,
        skipped_csv: str | Path | None = None,
        num_workers: int | None = None,
    ) -> LocalExtraction:
        """Extract and store the local features of images added to the index (workers then re-read the store)."""
        res = extract_local_features(
            self.extractor,
            records,
            self.store,
            skipped_csv=skipped_csv,
            num_workers=num_workers,
            desc="local features",
        )
        self.generation += 1
        return res


def add_local_features(
    index_dir: str | Path,
    index_meta: dict[str, Any],
    embedder: Any,
    records: Sequence[ImageRecord],
    *,
    skipped_csv: str | Path | None = None,
    num_workers: int | None = None,
) -> LocalExtraction | None:
    """Extract the local features of ``records`` into an index's store when it has one (else None)."""
    meta = index_meta.get("local")
    if not meta:
        return None
    extractor = extractor_from_meta(meta, embedder)
    store = LocalFeatureStore.create(
        Path(index_dir) / str(meta.get("dir", LOCAL_DIR)), extractor.dim, extractor.to_info()
    )
    return extract_local_features(extractor, records, store, skipped_csv=skipped_csv, num_workers=num_workers)
