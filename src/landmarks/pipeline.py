"""The stages as library calls (hloc-style): build an index, recognize queries. The CLI verbs wrap them.

::

    from landmarks import pipeline
    from landmarks.recognize import RecognizeConfig

    index = pipeline.build_index("runs/cpu", "data/train.csv", "out/index",
                                 non_landmarks="data/nonlandmarks", local="sift")
    stats = pipeline.recognize_queries(index, "data/test.csv", "out/predictions.csv",
                                       conf=RecognizeConfig(rerank="local"),
                                       neighbours_jsonl="out/neighbours.jsonl")
    retrieval = pipeline.build_index("runs/cpu", "data/index.csv", "out/retrieval-index", unlabelled=True)
    pipeline.recognize_queries(retrieval, "data/test.csv", "out/r.csv", retrieval_csv="out/retrieval.csv")

Each stage meets the next at files on disk. :func:`build_index` resumes a killed run from its
finished chunks (embeddings in ``OUT/work/``, local features in ``OUT/local/``) and refuses to replace
a finished index unless ``overwrite``; :func:`recognize_queries` writes its outputs atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from landmarks.data.collection import ImageRecord
from landmarks.errors import LandmarksError
from landmarks.utils.dist import dist_env, resolve_device
from landmarks.utils.io import remove_entries

logger = logging.getLogger("landmarks")

#: Files and folders of an index folder that :func:`build_index` owns (removed by ``overwrite``).
_INDEX_FILES = ("meta.json", "skipped.csv", "work", "local")

Source = str | Path


def _embedder(model: Any, device: str) -> Any:
    """A run folder / checkpoint -> its embedder; an embedder object is used as it is."""
    from landmarks import extract

    if isinstance(model, (str, Path)):
        return extract.load_embedder(Path(model), device=resolve_device(device))
    return model


def _as_sources(src: Source | Sequence[Source]) -> list[str | Path]:
    if isinstance(src, (str, Path)):
        return [Path(src)]
    return [Path(s) for s in src]


def _clear_index(out: Path) -> None:
    """Remove what an earlier index left in ``out`` (only the index's own files)."""
    remove_entries(out, _INDEX_FILES)
    if out.is_dir():
        for p in out.iterdir():
            if p.is_dir() and (p.name.startswith(("data-", ".data-")) or re.match(r"^local-\d{6}$", p.name)):
                shutil.rmtree(p)


def load_index_records(
    images: Source | Sequence[ImageRecord], *, unlabelled: bool = False, image_dir: Source | None = None
) -> list[ImageRecord]:
    """The images of an index: a collection (labelled) or, with ``unlabelled``, any image source.

    Raises :class:`LandmarksError` when a labelled index is asked of images without landmark ids.
    """
    from landmarks.data.collection import load_collection, load_images

    if not isinstance(images, (str, Path)):
        records = list(images)
    elif unlabelled:
        records = load_images([Path(images)], image_dir)
    else:
        try:
            records = load_collection(Path(images), image_dir)
        except LandmarksError as e:
            raise LandmarksError(f"{e} (images without landmark ids: pass --unlabelled)") from e
    if unlabelled:
        records = [ImageRecord(r.id, r.path, None) for r in records]
    missing = [r.id for r in records if not r.landmark]
    if missing and not unlabelled:
        raise LandmarksError(
            f"{images if isinstance(images, (str, Path)) else 'images'}: {len(missing)} "
            f"image(s) have no landmark id (e.g. {missing[0]}); an index needs a labelled "
            "collection (or --unlabelled for a retrieval-only index)"
        )
    if not records:
        raise LandmarksError(f"{images if isinstance(images, (str, Path)) else 'images'}: no images")
    return records


def build_index(
    model: Any,
    images: Source | Sequence[ImageRecord],
    out: Source,
    *,
    non_landmarks: Source | Sequence[Source] | None = None,
    unlabelled: bool = False,
    local: str | None = None,
    index_conf: Any = None,
    extract_conf: Any = None,
    device: str = "cpu",
    overwrite: bool = False,
    image_dir: Source | None = None,
    local_workers: int | None = None,
    show_progress: bool = True,
    whiten: Any = None,
    calibration: Any = None,
    dba: Any = None,
    wait_s: float = 0.0,
    command: str = "index",
) -> Path:
    """Embed a collection and write an index folder; returns ``out``.

    Args:
        model: a trained run folder or checkpoint file (or an :class:`~landmarks.extract.Embedder`).
        images: a collection (folder-per-landmark, GLDv2 CSV with its images beside it, list file) or
            :class:`ImageRecord` s; with ``unlabelled`` any image source (e.g. GLDv2 ``index.csv``).
        out: the index folder.
        non_landmarks: non-landmark images (folders, list files, CSVs, files) for the out-of-domain
            penalties.
        unlabelled: a retrieval-only index (landmark ids empty): recognition against it finds no landmark.
        local: ``"sift"`` or ``"model"`` (the run's DELG-style head): also store every image's local
            features in ``out/local/`` for ``rerank="local"`` (:mod:`landmarks.rerank`).
        index_conf: :class:`~landmarks.index.IndexConfig` (default: exact ``flat``).
        extract_conf: :class:`~landmarks.extract.ExtractConfig` (batch size, workers, views, chunk size).
        device: torch device (``auto``: CUDA when available).
        overwrite: replace an index already in ``out`` (else that is an error).
        local_workers: decoding/SIFT processes of the local-feature extraction (None: CPUs - 1).
        whiten: :class:`~landmarks.whiten.WhitenConfig`: learn PCA-whitening on the index images and
            store it in the index (applied to index, non-landmark and query embeddings). None: none.
        calibration: :class:`~landmarks.calibrate.CalibrationConfig` of the ``is_landmark`` threshold
            (default: calibrate when there is a non-landmark set); stored in ``meta.json["calibration"]``.
        dba: :class:`~landmarks.expansion.ExpansionConfig` of a database-side augmentation computed once
            here and stored with the index (resumable in ``out/work/dba``; None or ``n == 0``: none).
        wait_s: how long to wait when another process is writing ``out`` (0: refuse at once).
        command: what the writer lock says is writing (:func:`landmarks.maintenance.index_writer`).

    Unreadable images are skipped into ``out/skipped.csv``. Under ``torchrun`` every rank embeds its
    share and rank 0 extracts the local features and writes the index; rank 0 holds the folder's writer
    lock throughout. Raises :class:`LandmarksError`.
    """
    from landmarks.maintenance import index_writer

    rank = dist_env().rank
    lock = index_writer(out, command, wait_s) if rank == 0 else contextlib.nullcontext()
    with lock:
        return _build_index(
            model,
            images,
            Path(out),
            non_landmarks=non_landmarks,
            unlabelled=unlabelled,
            local=local,
            index_conf=index_conf,
            extract_conf=extract_conf,
            device=device,
            overwrite=overwrite,
            image_dir=image_dir,
            local_workers=local_workers,
            show_progress=show_progress,
            whiten=whiten,
            calibration=calibration,
            dba=dba,
        )


def _build_index(
    model: Any,
    images: Source | Sequence[ImageRecord],
    out: Path,
    *,
    non_landmarks: Source | Sequence[Source] | None,
    unlabelled: bool,
    local: str | None,
    index_conf: Any,
    extract_conf: Any,
    device: str,
    overwrite: bool,
    image_dir: Source | None,
    local_workers: int | None,
    show_progress: bool,
    whiten: Any,
    calibration: Any,
    dba: Any,
) -> Path:
    from landmarks import extract
    from landmarks.data.collection import load_images
    from landmarks.index import IndexConfig, LandmarkIndex

    out = Path(out)
    rank = dist_env().rank
    if local is not None and local not in ("sift", "model"):
        raise LandmarksError(f"unknown local features {local!r} (sift or model)")
    if rank == 0:
        if (out / "meta.json").exists():
            if not overwrite:
                raise LandmarksError(
                    f"{out} already holds an index: grow it with `landmarks add {out} SRC` "
                    "or rebuild it with --overwrite"
                )
            _clear_index(out)
        elif overwrite:
            _clear_index(out)
    conf = index_conf or IndexConfig()
    ext_conf = extract_conf or extract.ExtractConfig()
    records = load_index_records(images, unlabelled=unlabelled, image_dir=image_dir)
    embedder = _embedder(model, device)
    extractor = None
    if local is not None:  # fail before the long extraction when the run has no local head
        from landmarks.rerank import index_extractor

        extractor = index_extractor(local, embedder)
    logger.info(
        "indexing %d images of %d landmarks with model %s (%s)",
        len(records),
        len({r.landmark for r in records if r.landmark}),
        embedder.describe().get("name"),
        embedder.fingerprint[:12],
    )
    res = extract.extract_embeddings(
        embedder,
        records,
        out / "work" / "images",
        ext_conf,
        skipped_csv=out / "skipped.csv",
        desc="index",
        show_progress=show_progress,
    )
    nl_emb, nl_ids = None, None
    if non_landmarks:
        nl_records = load_images(_as_sources(non_landmarks))
        if not nl_records:
            raise LandmarksError(f"no images found in {non_landmarks}")
        nl = extract.extract_embeddings(
            embedder,
            nl_records,
            out / "work" / "non-landmarks",
            ext_conf,
            skipped_csv=out / "skipped.csv",
            desc="non-landmarks",
            show_progress=show_progress,
        )
        nl_emb, nl_ids = nl.embeddings, nl.ids
    extract.finish_distributed()
    if rank != 0:
        return out
    if not res.ids:
        raise LandmarksError(f"none of the {len(records)} images could be read (see {out}/skipped.csv)")
    kept = [records[i] for i in res.rows]
    local_entry = None
    if extractor is not None:
        from landmarks.rerank import extract_local_features, local_meta, open_or_create_store

        store = open_or_create_store(out, extractor)
        lres = extract_local_features(
            extractor,
            kept,
            store,
            skipped_csv=out / "skipped.csv",
            num_workers=local_workers,
            show_progress=show_progress,
        )
        local_entry = local_meta(extractor)
        logger.info(
            "local features (%s) of %d images in %s (%.1f MB); %d unreadable",
            extractor.name,
            len(store),
            store.root,
            store.nbytes() / 1e6,
            len(lres.skipped),
        )
    index = LandmarkIndex.build(
        res.embeddings,
        res.ids,
        [r.landmark for r in kept],
        paths=[str(Path(r.path).absolute()) for r in kept],
        model=embedder.describe(),
        conf=conf,
        views=ext_conf.views(),
        non_landmarks=nl_emb,
        non_landmark_ids=nl_ids,
        whiten=whiten,
    )
    if local_entry is not None:
        index.meta["local"] = local_entry
    if dba is not None and dba.active:
        from landmarks.expansion import apply_dba

        apply_dba(index, dba, work_dir=out / "work" / "dba", show_progress=show_progress)
    _calibrate(index, calibration)
    index.save(out)
    shutil.rmtree(out / "work", ignore_errors=True)
    logger.info(
        "indexed %d images of %d landmarks into %s; skipped %d",
        len(index),
        len({lm for lm in index.landmarks if lm}),
        out,
        len(res.skipped),
    )
    return out


def _calibrate(index: Any, calibration: Any) -> None:
    """Store the calibrated ``is_landmark`` threshold in ``index.meta`` (default voting settings)."""
    from landmarks.calibrate import CalibrationConfig, calibrate_index
    from landmarks.recognize import RecognizeConfig

    r = RecognizeConfig()
    entry = calibrate_index(
        index,
        calibration or CalibrationConfig(),
        k=r.k,
        ood=r.ood,
        ood_weight=r.ood_weight,
        ood_query_k=r.ood_query_k,
    )
    index.meta.pop("calibration", None)
    if entry is not None:
        index.meta["calibration"] = entry
        logger.info(
            "is_landmark threshold %.4f: precision %.3f (target %.2f), %.1f%% of landmark queries "
            "recognised above it, %.1f%% of non-landmarks above it",
            entry["threshold"],
            entry["precision"],
            entry["precision_target"],
            100 * entry["landmark_recall"],
            100 * entry["nonlandmark_yes"],
        )


def _query_records(
    queries: Source | Sequence[Source] | Sequence[ImageRecord], image_dir: Source | None
) -> list[ImageRecord]:
    from landmarks.data.collection import load_images

    if isinstance(queries, (str, Path)):
        return load_images([Path(queries)], image_dir)
    items = list(queries)
    if items and all(isinstance(q, ImageRecord) for q in items):
        return [q for q in items if isinstance(q, ImageRecord)]
    return load_images([Path(q) for q in items if isinstance(q, (str, Path))], image_dir)


@dataclass
class RecognizeStats:
    """What :func:`recognize_queries` did."""

    queries: int  # query records (unreadable ones included)
    recognized: int  # queries that decoded and were recognized
    with_landmark: int  # rows of the predictions CSV that name a landmark
    is_landmark: int  # queries whose confidence reaches the is_landmark threshold
    is_landmark_threshold: dict[str, Any]  # {"value", "source", ...} (see Recognizer.info)
    unreadable: int  # queries that could not be decoded (listed in skipped.csv)
    ood_active: bool  # the out-of-domain handling was on
    non_landmarks: int  # size of the index's non-landmark set
    rerank: str  # "none" or "local"
    seconds: float  # wall time of the call
    ms_per_query: float  # seconds / queries, in ms
    timings_ms: dict[str, float] = field(default_factory=dict)  # recognition stages summed over the batch

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def recognize_queries(
    index_dir: Source,
    queries: Source | Sequence[Source] | Sequence[ImageRecord],
    out_csv: Source,
    *,
    conf: Any = None,
    neighbours_jsonl: Source | None = None,
    retrieval_csv: Source | None = None,
    retrieval_k: int = 100,
    device: str = "cpu",
    model: Source | None = None,
    embedder: Any = None,
    image_dir: Source | None = None,
    num_workers: int | None = None,
    recognizer: Any = None,
) -> RecognizeStats:
    """Recognize query images against an index and write the Kaggle recognition CSV (and more).

    Args:
        index_dir: an index folder from :func:`build_index`.
        queries: image files, folders (id = file name without extension), list files or a GLDv2 CSV
            (``test.csv`` with ``test/`` beside it), or :class:`ImageRecord` s.
        out_csv: ``id,landmarks`` with ``<landmark> <confidence>`` (empty = no landmark), one row per
            query, unreadable ones included (empty; listed in ``skipped.csv`` beside it).
        conf: :class:`~landmarks.recognize.RecognizeConfig` (``rerank="local"`` for re-ranking).
        neighbours_jsonl: also write ``{"id", "path", "landmark", "confidence", "neighbours"}`` lines.
        retrieval_csv: also write ``id,images`` with the ``retrieval_k`` nearest index images (re-ranked:
            geometrically verified candidates first, by inliers).
        device: torch device; model / embedder: another model than the index's recorded run.
        num_workers: decoding processes of the query embedding (None: CPUs - 1).
        recognizer: an open :class:`~landmarks.recognize.Recognizer` to reuse (then ``index_dir``,
            ``conf``, ``device``, ``model``, ``embedder`` are ignored).

    Returns:
        :class:`RecognizeStats` (counts, the is_landmark threshold, OOD/re-ranking in use, timings).
    """
    from landmarks import extract
    from landmarks.recognize import Recognizer, neighbours_row
    from landmarks.submission import write_recognition_csv, write_retrieval_csv
    from landmarks.utils.io import atomic_write

    t0 = time.perf_counter()
    records = _query_records(queries, image_dir)
    if not records:
        raise LandmarksError(f"no query images found in {queries}")
    own = recognizer is None
    rec = recognizer or Recognizer.load(
        index_dir, conf, device=resolve_device(device), model=model, embedder=embedder
    )
    try:
        out = Path(out_csv)
        work = out.parent / f".{out.name}.work"
        ext_conf = extract.ExtractConfig(
            batch_size=rec.conf.batch_size,
            num_workers=num_workers,
            scales=rec.extract_conf.scales,
            flip=rec.extract_conf.flip,
        )
        res = extract.extract_resumable(
            rec.embedder, records, work, ext_conf, skipped_csv=out.parent / "skipped.csv", desc="queries"
        )
        done = [records[i] for i in res.rows]
        k_ret = retrieval_k if retrieval_csv else 0
        recs = rec.recognize_embeddings(res.embeddings, queries=[r.path for r in done], retrieval_k=k_ret)
        # GAP ranks every voted landmark by confidence: only an explicit threshold drops predictions (the
        # calibrated is_landmark answers the yes/no question of the service and the neighbours file)
        explicit = rec.conf.threshold
        predictions: dict[str, tuple[str, float] | None] = {
            r.id: (
                (str(x.landmark), x.confidence)
                if x.landmark and (explicit is None or x.confidence >= explicit)
                else None
            )
            for r, x in zip(done, recs)
        }
        write_recognition_csv(out, predictions, ids=[r.id for r in records])
        if neighbours_jsonl:
            with atomic_write(neighbours_jsonl) as f:
                for r, x in zip(done, recs):
                    f.write(json.dumps(neighbours_row(r.id, str(r.path), x)) + "\n")
        if retrieval_csv:
            ranked: dict[str, list[str]] = {r.id: [] for r in records}
            ranked.update((r.id, list(x.retrieval or [])) for r, x in zip(done, recs))
            write_retrieval_csv(retrieval_csv, ranked)
        shutil.rmtree(work, ignore_errors=True)
        info = rec.info()
    finally:
        if own:
            rec.close()
    timings = dict(recs[0].timings_ms) if recs else {}
    seconds = time.perf_counter() - t0
    return RecognizeStats(
        queries=len(records),
        recognized=len(done),
        with_landmark=sum(v is not None for v in predictions.values()),
        is_landmark=sum(bool(x.is_landmark) for x in recs),
        is_landmark_threshold=dict(info.is_landmark_threshold),
        unreadable=len(res.skipped),
        ood_active=bool(info.ood_active),
        non_landmarks=int(info.index.non_landmarks),
        rerank=str(rec.conf.rerank),
        seconds=round(seconds, 3),
        ms_per_query=round(1000 * seconds / max(1, len(records)), 3),
        timings_ms=timings,
    )
