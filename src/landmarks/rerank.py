"""Local-feature re-ranking wired to an index: the index's feature store, query extraction, verification.

An index built with ``landmarks index --local sift|model`` holds the local features of every indexed
image in ``INDEX/local/`` (a :class:`~landmarks.local_features.LocalFeatureStore`) and records the
extractor in ``INDEX/meta.json``::

    "local": {"features": "sift" | "model", "dir": "local", "extractor": {... extractor.info() ...}}

:class:`LocalReranker` extracts a query's local features with the same extractor, verifies the
query against its top-K global candidates (:func:`landmarks.verify.verify_candidates`, seeded RANSAC)
in worker processes that read the candidates' features from the store themselves (memory-mapped: only
the query's features travel), and returns the inlier counts. The scoring is pure
(:func:`local_scores`): ``score = s + min(inliers, c) / c`` with ``s`` the candidate's global score
(the cosine similarity, or its out-of-domain-penalised version) and inlier counts below
``min_inliers`` counted as none; :mod:`landmarks.recognize` then votes with these scores.

Parallelism: the main process extracts query features (the model's forward pass for DELG) while the
workers verify earlier queries; a batch smaller than the pool splits each query's candidates over
the workers instead. Every pair is verified with the same seed whichever process runs it, so the
results equal the serial ones.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from landmarks.data.collection import ImageRecord
from landmarks.errors import ConfigError, ImageDecodeError, IncompatibleArtifactError, LandmarksError
from landmarks.local_features import LocalExtractor, LocalFeatures, LocalFeatureStore

logger = logging.getLogger("landmarks")

#: Sub-folder of an index that holds its local features.
LOCAL_DIR = "local"
#: Values of ``landmarks index --local``: RootSIFT, or the run's own DELG-style local head.
LOCAL_CHOICES = ("sift", "model")
#: RootSIFT settings of ``--local sift``. A contrast threshold of 0.02 (OpenCV's default: 0.04) doubles
#: the keypoints on small, low-contrast images (median 107 -> 229 on the 256 px synthetic set) and
#: lets more true pairs pass verification; on large photos ``max_features`` caps the count anyway.
SIFT_DEFAULTS: dict[str, Any] = {"max_features": 1000, "max_side_px": 1024, "contrast_threshold": 0.02}
#: DELG settings of ``--local model`` (the DelgExtractor defaults: scales 0.25 ... 2, top 1000).
DELG_DEFAULTS: dict[str, Any] = {}


# --- pure scoring -----------------------------------------------------------------------------------

def local_scores(base: np.ndarray, inliers: np.ndarray, c: float = 70.0, min_inliers: int = 0,
                 weight: float = 1.0) -> np.ndarray:
    """Re-ranked candidate scores ``base + weight * min(inliers, c) / c``; counts below ``min_inliers`` count as 0.

    Args:
        base: ``(nq, K)`` float32 global scores of the candidates (``-inf`` = no candidate).
        inliers: ``(nq, K)`` int inlier counts (negative = not verified, no bonus).
        c: inlier count at which the bonus saturates.
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


# --- extractors -------------------------------------------------------------------------------------

def _loaded_model(embedder: Any) -> Any:
    """The ``LoadedModel`` behind an embedder (``CheckpointEmbedder.loaded``), or None."""
    return getattr(embedder, "loaded", None)


def make_local_extractor(features: str, embedder: Any = None, **kwargs: Any) -> LocalExtractor:
    """The extractor of ``landmarks index --local FEATURES``.

    Args:
        features: ``"sift"`` (RootSIFT, :data:`SIFT_DEFAULTS`) or ``"model"`` (the DELG-style local
            head of the index's own model run, :data:`DELG_DEFAULTS`).
        embedder: the index's embedder (``"model"`` needs the run behind it).
        kwargs: override the defaults (passed to ``SiftExtractor`` / ``DelgExtractor``).

    Raises :class:`LandmarksError` when ``"model"`` is asked of a run without a local head.
    """
    from landmarks.local_features import DelgExtractor, SiftExtractor

    if features == "sift":
        return SiftExtractor(**{**SIFT_DEFAULTS, **kwargs})
    if features != "model":
        raise ConfigError(f"unknown local features {features!r} (known: {', '.join(LOCAL_CHOICES)})")
    loaded = _loaded_model(embedder)
    model = getattr(loaded, "model", None)
    source = (embedder.describe().get("source") if embedder is not None else None) or "the model"
    if loaded is None or not getattr(model, "has_local_head", False):
        raise LandmarksError(
            f"--local model: {source} has no local-feature head; train one (`landmarks train --init RUN "
            "--local-only --out RUN2`, or `landmarks train --local`) or use --local sift")
    return DelgExtractor(loaded, **{**DELG_DEFAULTS, **kwargs})


def extractor_from_meta(local_meta: dict[str, Any], embedder: Any = None) -> LocalExtractor:
    """Rebuild the extractor recorded in an index's ``meta["local"]`` (same settings, same features).

    Raises :class:`IncompatibleArtifactError` when the model's local head differs from the one the
    index's features were extracted with.
    """
    info = dict(local_meta.get("extractor") or {})
    features = local_meta.get("features")
    if features == "sift":
        sift_keys = ("max_features", "max_side_px", "contrast_threshold", "edge_threshold", "root")
        return make_local_extractor("sift", **{k: info[k] for k in sift_keys if k in info})
    if features == "model":
        delg_keys = ("scales", "max_side_px", "top_n", "threshold", "mean", "std", "ransac_threshold_px")
        ext = make_local_extractor("model", embedder, **{k: info[k] for k in delg_keys if k in info})
        got = getattr(ext, "fingerprint", "")
        if info.get("fingerprint") and got != info["fingerprint"]:
            raise IncompatibleArtifactError(
                f"the index's local features come from model {info['fingerprint'][:12]}, not {got[:12]}")
        return ext
    raise IncompatibleArtifactError(f"unknown local features {features!r} in the index's meta.json")


def local_meta(features: str, extractor: LocalExtractor) -> dict[str, Any]:
    """The ``meta["local"]`` entry of an index whose features ``extractor`` made."""
    return {"features": features, "dir": LOCAL_DIR, "extractor": extractor.info()}


# --- extraction into a store ------------------------------------------------------------------------

@dataclass
class LocalExtraction:
    """What :func:`extract_local_features` did."""

    done: int  # images extracted by this call (resumed ones not counted)
    resumed: int  # images already in the store
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of unreadable images


_WORKER_EXTRACTOR: LocalExtractor | None = None


def _init_local_worker(extractor: LocalExtractor | None) -> None:
    """Worker start: one OpenCV thread, and the extractor to run here (None: only decode)."""
    import cv2

    global _WORKER_EXTRACTOR
    cv2.setNumThreads(1)
    limit_blas_threads(1)
    _WORKER_EXTRACTOR = extractor


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


def extract_local_features(extractor: LocalExtractor, records: Sequence[ImageRecord], store: LocalFeatureStore, *,
                           skipped_csv: str | Path | None = None, chunk_size: int = 512,
                           num_workers: int | None = None, show_progress: bool = True,
                           desc: str = "local features") -> LocalExtraction:
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
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from landmarks.utils.io import SkippedLog
    from landmarks.utils.progress import Progress
    from landmarks.utils.seed import default_num_workers

    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    todo = [r for r in records if not store.has(r.id)]
    resumed = len(records) - len(todo)
    if resumed and todo:
        logger.info("%s: resuming, %d of %d images already have local features", store.root, resumed, len(records))
    out = LocalExtraction(done=0, resumed=resumed)
    if not todo:
        return out
    in_worker = getattr(extractor, "name", "") == "rootsift"  # weight-free: extract where we decode
    workers = default_num_workers() if num_workers is None else max(0, num_workers)
    pool = None
    if workers > 0:
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_local_worker, initargs=(extractor if in_worker else None,))
    log = SkippedLog(skipped_csv) if skipped_csv is not None else None
    bar = Progress(len(records), desc, "img", disable=not show_progress)
    bar.update(resumed)
    try:
        for start in range(0, len(todo), chunk_size):
            part = todo[start:start + chunk_size]
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
        return LocalFeatureStore.create(root, extractor.dim, extractor.info())
    except IncompatibleArtifactError as e:
        logger.info("starting the local features over: %s", e)
        shutil.rmtree(root, ignore_errors=True)
        return LocalFeatureStore.create(root, extractor.dim, extractor.info())


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


def verify_job(store_root: str, generation: int, query: LocalFeatures, candidate_ids: Sequence[str],
               verify_kwargs: dict[str, Any]) -> list[int]:
    """Inlier counts of ``query`` against each stored candidate (0 where none are stored).

    Runs in a worker process (or inline): reads the candidates from the store, then
    :func:`landmarks.verify.verify_candidates` serially.
    """
    from landmarks.verify import verify_candidates

    store = _store_in_worker(store_root, generation)
    cands = store.get_many(list(candidate_ids))
    return [int(v.num_inliers) for v in verify_candidates(query, cands, workers=0, **verify_kwargs)]


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
        for symbol in ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn(ctypes.c_int(n))
                done.append(path)
                break
    return done


def _init_verify_worker() -> None:
    """Worker start: one OpenCV and BLAS thread; Ctrl-C is the parent's to handle (it shuts the pool down)."""
    import signal

    import cv2

    cv2.setNumThreads(1)
    limit_blas_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_rerank_workers() -> int:
    """Verification processes by default: the CPUs minus one (the main process extracts), at most 8."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, n - 1))


class LocalReranker:
    """Inlier counts of queries against their candidates, with an index's local features.

    Args:
        index_dir: the index folder (``meta.json`` with a ``"local"`` entry, ``local/``).
        local_meta: the index's ``meta["local"]``.
        extractor: the extractor of the queries (:func:`extractor_from_meta`).
        workers: verification processes (0: in this process; None: :func:`default_rerank_workers`).
            The pool is created on first use and reused; :meth:`close` ends it.
        seed: RANSAC seed (results are deterministic given it).
        model: geometric model (``fundamental``, ``homography``, ``affine``).
        max_iters: RANSAC iterations at most per pair.
    """

    def __init__(self, index_dir: str | Path, local_meta: dict[str, Any], extractor: LocalExtractor, *,
                 workers: int | None = None, seed: int = 0, model: str = "fundamental", max_iters: int = 2000):
        self.index_dir = Path(index_dir)
        self.meta = dict(local_meta)
        self.extractor = extractor
        self.store_root = self.index_dir / str(self.meta.get("dir", LOCAL_DIR))
        self.store = LocalFeatureStore.open(self.store_root)
        self.workers = default_rerank_workers() if workers is None else max(0, int(workers))
        self.verify_kwargs: dict[str, Any] = {"model": model, "seed": int(seed), "max_iters": int(max_iters),
                                              "threshold_px": extractor.ransac_threshold_px}
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
                "rebuild it with `landmarks index ... --local sift` (or --local model)")
        return cls(index_dir, meta, extractor_from_meta(meta, embedder), **kwargs)

    # -- pool -----------------------------------------------------------------------------------------

    def _pool(self) -> Executor | None:
        if self.workers <= 0:
            return None
        with self._lock:
            if self._executor is None:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor

                # spawned (a fork of a threaded server or of OpenCV's thread pool can deadlock)
                self._executor = ProcessPoolExecutor(max_workers=self.workers,
                                                     mp_context=multiprocessing.get_context("spawn"),
                                                     initializer=_init_verify_worker)
            return self._executor

    def close(self) -> None:
        """End the worker processes (a later call starts them again)."""
        with self._lock:
            ex, self._executor = self._executor, None
        if ex is not None:
            ex.shutdown(wait=True, cancel_futures=True)

    # -- queries ----------------------------------------------------------------------------------------

    def query_features(self, query: np.ndarray | str | Path) -> LocalFeatures:
        """Local features of a query (an ``(H, W, 3)`` uint8 image or a path)."""
        from landmarks.data.decode import decode_image

        img = decode_image(query) if isinstance(query, (str, Path)) else query
        return self.extractor(img)

    def inliers(self, queries: Sequence[np.ndarray | str | Path],
                candidates: Sequence[Sequence[str]]) -> list[np.ndarray]:
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
                logger.warning("query %s: no local features (%s); not re-ranked",
                               query if isinstance(query, (str, Path)) else q, e)
                continue
            ids = list(cands)
            if pool is None:
                out[q][:] = verify_job(root, self.generation, feats, ids, self.verify_kwargs)
                continue
            g = min(n_groups, len(ids))
            for k in range(g):
                pos = list(range(k, len(ids), g))
                pending.append((q, pos, pool.submit(verify_job, root, self.generation, feats,
                                                    [ids[p] for p in pos], self.verify_kwargs)))
        for q, pos, fut in pending:
            out[q][pos] = fut.result()
        return out

    # -- growing ------------------------------------------------------------------------------------------

    def add(self, records: Sequence[ImageRecord], *, skipped_csv: str | Path | None = None,
            num_workers: int | None = None) -> LocalExtraction:
        """Extract and store the local features of images added to the index (workers then re-read the store)."""
        res = extract_local_features(self.extractor, records, self.store, skipped_csv=skipped_csv,
                                     num_workers=num_workers, desc="local features")
        self.generation += 1
        return res


def add_local_features(index_dir: str | Path, index_meta: dict[str, Any], embedder: Any,
                       records: Sequence[ImageRecord], *, skipped_csv: str | Path | None = None,
                       num_workers: int | None = None) -> LocalExtraction | None:
    """Extract the local features of ``records`` into an index's store when it has one (else None)."""
    meta = index_meta.get("local")
    if not meta:
        return None
    extractor = extractor_from_meta(meta, embedder)
    store = LocalFeatureStore.create(Path(index_dir) / str(meta.get("dir", LOCAL_DIR)), extractor.dim,
                                     extractor.info())
    return extract_local_features(extractor, records, store, skipped_csv=skipped_csv, num_workers=num_workers)
