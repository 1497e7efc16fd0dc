"""Retrieval as the field measures it: the Revisited Oxford/Paris protocol end to end.

:func:`evaluate_revisited` runs a model on a dataset in revisitop layout (:mod:`landmarks.data.revisited`)::

    ds = find_dataset("data/datasets", "roxford5k")
    res = evaluate_revisited(embedder, ds, "work/roxford5k", qe=ExpansionConfig(n=2), distractors="r1m/jpg")
    res.results["medium"]["map"], res.results["hard"]["mp@k"]

1. every query image is cropped to its bounding box (``work/queries/NNNNN.png``, lossless; a crop already
   there is reused) and embedded, like the database images (and the ``+R1M`` distractors when given),
   through :func:`landmarks.extract.extract_resumable` (chunked and resumable in ``work/embed-*``);
2. optional DBA over the database (distractors included) and αQE (:mod:`landmarks.expansion`);
3. exact inner-product ranking (FAISS ``IndexFlatIP``), the whole database, or its first ``depth`` rows
   when it is larger (``DEFAULT_DEPTH``: positives beyond it earn nothing, below 1e-4 mAP on R1M);
4. :func:`landmarks.metrics.revisited_map`: mAP and mP@{1,5,10} for Easy, Medium and Hard (junk per split).

Distractor rows come after the database rows, so the ground-truth indices keep their meaning. An
unreadable database image keeps its index with a zero vector (it ranks with similarity 0) and is logged;
an unreadable query is an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from landmarks import metrics
from landmarks.data.collection import ImageRecord
from landmarks.data.revisited import RevisitedDataset, crop_box
from landmarks.errors import DataFormatError, ImageDecodeError, LandmarksError
from landmarks.expansion import ExpansionConfig, database_side_augmentation, exact_search, query_expansion

logger = logging.getLogger("landmarks")

#: Rows of the ranking kept per query when the database (with distractors) is larger than this.
DEFAULT_DEPTH = 10_000
#: The ranks at which the Revisited protocol reports mean precision.
KAPPAS = (1, 5, 10)


@dataclass
class RevisitedResult:
    """The protocol's figures and what produced them."""

    dataset: str
    # {"easy" | "medium" | "hard": {"map": float, "mp@k": [float per KAPPAS]}}, fractions in [0, 1]
    results: dict[str, dict[str, Any]]
    queries: int
    database: int
    distractors: int
    # ranks kept per query
    depth: int
    # database images that could not be read (zero vectors)
    unreadable: list[str] = field(default_factory=list)
    # seconds per stage: crop, embed_queries, embed_database, embed_distractors, dba, qe, search, score
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    # (queries, depth) int64 database rows of each query, best first (rows >= database: distractors)
    ranks: np.ndarray | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dictionary (``nan`` becomes ``None``)."""

        def clean(x: Any) -> Any:
            if isinstance(x, float):
                return None if np.isnan(x) else x
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            if isinstance(x, list):
                return [clean(v) for v in x]
            return x

        return clean(
            {
                "dataset": self.dataset,
                "queries": self.queries,
                "database": self.database,
                "distractors": self.distractors,
                "depth": self.depth,
                "kappas": list(KAPPAS),
                "results": self.results,
                "unreadable": self.unreadable,
                "seconds": self.seconds,
                "settings": self.settings,
            }
        )


def crop_queries(dataset: RevisitedDataset, out_dir: str | Path) -> list[ImageRecord]:
    """Crop every query image to its box into ``out_dir/NNNNN.png`` (atomic; existing crops are kept).

    Returns one :class:`ImageRecord` per query (id ``qNNNNN``: a name may repeat). Raises :class:`DataFormatError`
    naming an unreadable query image.
    """
    from PIL import Image

    from landmarks.data.decode import decode_image
    from landmarks.utils.io import atomic_save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for i, (name, truth) in enumerate(zip(dataset.truth.qimlist, dataset.truth.gnd)):
        path = out_dir / f"{i:05d}.png"
        if not path.exists():
            src = dataset.image_path(name)
            try:
                img = decode_image(src)
            except ImageDecodeError as e:
                raise DataFormatError(f"query {name}: {e}") from None
            x1, y1, x2, y2 = crop_box(img.shape[1], img.shape[0], truth.bbx)
            crop = Image.fromarray(np.ascontiguousarray(img[y1:y2, x1:x2]))
            atomic_save(path, lambda p, c=crop: c.save(p, format="PNG"))
        records.append(ImageRecord(f"q{i:05d}", path))
    return records


def rank_database(xq: np.ndarray, xb: np.ndarray, depth: int) -> np.ndarray:
    """``(nq, min(depth, N))`` int64 database rows by descending inner product (exact, FAISS ``IndexFlatIP``).

    Args:
        xq: ``(nq, D)`` float32 L2-normalised queries. xb: ``(N, D)`` float32 L2-normalised database.
    """
    k = min(depth, len(xb))
    if k == 0 or len(xq) == 0:
        return np.zeros((len(xq), k), np.int64)
    _, rows = exact_search(xb)(xq, k)
    return rows.astype(np.int64)


def _embed(
    embedder: Any, records: Sequence[ImageRecord], work: Path, conf: Any, desc: str, show_progress: bool
) -> tuple[np.ndarray, list[str]]:
    """Embeddings in record order (zeros where unreadable) and the unreadable ids."""
    from landmarks.extract import extract_resumable

    res = extract_resumable(embedder, records, work, conf, desc=desc, show_progress=show_progress)
    out = np.zeros((len(records), embedder.embedding_dim), np.float32)
    out[res.rows] = res.embeddings
    done = set(res.rows.tolist())
    return out, [r.id for i, r in enumerate(records) if i not in done]


def load_features(path: str | Path, dim: int) -> np.ndarray:
    """Read extracted distractor features: a ``.npy`` of ``(M, dim)`` float32/float16 (no pickle)."""
    path = Path(path)
    try:
        x = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: not a readable .npy array ({e})") from None
    if x.ndim != 2 or x.shape[1] != dim:
        raise DataFormatError(f"{path}: expected ({'M'}, {dim}) features of this model, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def evaluate_revisited(
    embedder: Any,
    dataset: RevisitedDataset,
    work_dir: str | Path,
    *,
    extract_conf: Any = None,
    qe: ExpansionConfig | None = None,
    dba: ExpansionConfig | None = None,
    distractors: str | Path | Sequence[str | Path] | None = None,
    distractor_features: str | Path | None = None,
    depth: int = DEFAULT_DEPTH,
    project: Callable[[np.ndarray], np.ndarray] | None = None,
    show_progress: bool = True,
) -> RevisitedResult:
    """Run the Revisited protocol on ``dataset`` with ``embedder`` (see the module docstring).

    Args:
        embedder: an :class:`~landmarks.extract.Embedder` (a trained run via ``load_embedder``).
        dataset: from :func:`landmarks.data.revisited.find_dataset`.
        work_dir: crops and resumable embedding chunks (reused by a later run with the same model).
        extract_conf: :class:`~landmarks.extract.ExtractConfig` (views, batch size, workers).
        qe, dba: αQE and DBA settings (None or ``n = 0``: off).
        distractors: image folders / list files of the ``+R1M`` distractors; or
        distractor_features: their extracted features, an ``(M, D)`` ``.npy``.
        depth: ranks kept per query when the database is larger.
        project: maps model embeddings ``(n, D)`` to the space searched (e.g. an index's
            :meth:`~landmarks.index.LandmarkIndex.project`, its PCA-whitening), applied to the queries,
            the database and the distractors (features given as a file are model embeddings too).

    Returns:
        :class:`RevisitedResult` (figures as fractions).
    """
    from landmarks.data.collection import load_images
    from landmarks.extract import ExtractConfig

    if distractors is not None and distractor_features is not None:
        raise LandmarksError("give the distractors as images or as features, not both")
    conf = extract_conf or ExtractConfig()
    qe = qe or ExpansionConfig()
    dba = dba or ExpansionConfig()
    work = Path(work_dir)
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    qrecords = crop_queries(dataset, work / "queries")
    seconds["crop"] = time.perf_counter() - t
    t = time.perf_counter()
    xq, bad_q = _embed(embedder, qrecords, work / "embed-queries", conf, "queries", show_progress)
    if bad_q:
        name = dataset.truth.qimlist[int(bad_q[0][1:])]
        raise DataFormatError(f"query {name}: its crop could not be embedded (see {work / 'embed-queries'})")
    seconds["embed_queries"] = time.perf_counter() - t
    t = time.perf_counter()
    xb, unreadable = _embed(
        embedder, dataset.database_records(), work / "embed-database", conf, "database", show_progress
    )
    seconds["embed_database"] = time.perf_counter() - t
    if unreadable:
        logger.warning(
            "%d database image(s) could not be read and rank with similarity 0 (e.g. %s)",
            len(unreadable),
            unreadable[0],
        )
    xd = np.zeros((0, xb.shape[1]), np.float32)
    t = time.perf_counter()
    if distractors is not None:
        srcs = [distractors] if isinstance(distractors, (str, Path)) else list(distractors)
        drecords = load_images([Path(s) for s in srcs])
        if not drecords:
            raise LandmarksError(f"no distractor images found in {distractors}")
        xd, _ = _embed(embedder, drecords, work / "embed-distractors", conf, "distractors", show_progress)
    elif distractor_features is not None:
        xd = load_features(distractor_features, xb.shape[1])
    seconds["embed_distractors"] = time.perf_counter() - t
    if project is not None:
        bad = ~np.any(xb != 0, axis=1)  # unreadable images stay zero vectors
        xq, xb = project(xq), project(xb)
        xb[bad] = 0.0
        if len(xd):
            xd = project(xd)
    x_all = np.concatenate([xb, xd]) if len(xd) else xb
    t = time.perf_counter()
    if dba.active:
        x_all = database_side_augmentation(x_all, dba)
    seconds["dba"] = time.perf_counter() - t
    t = time.perf_counter()
    if qe.active:
        xq = query_expansion(xq, x_all, exact_search(x_all), qe)
    seconds["qe"] = time.perf_counter() - t
    t = time.perf_counter()
    ranks = rank_database(xq, x_all, depth)
    seconds["search"] = time.perf_counter() - t
    t = time.perf_counter()
    results = metrics.revisited_map(ranks, dataset.gnd_dicts(), KAPPAS)
    seconds["score"] = time.perf_counter() - t
    return RevisitedResult(
        dataset=dataset.name,
        results=results,
        queries=len(qrecords),
        database=len(xb),
        distractors=len(xd),
        depth=ranks.shape[1],
        unreadable=unreadable,
        seconds={k: round(v, 3) for k, v in seconds.items()},
        settings={
            "qe": {"n": qe.n, "alpha": qe.alpha},
            "dba": {"n": dba.n, "alpha": dba.alpha},
            "views": conf.views(),
            "model": embedder.describe().get("name"),
            "fingerprint": embedder.fingerprint,
            "gnd": str(dataset.gnd_path),
        },
        ranks=ranks,
    )
