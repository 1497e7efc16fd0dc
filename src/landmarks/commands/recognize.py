"""``landmarks recognize --index INDEX QUERIES... --out predictions.csv``: Kaggle recognition CSV and more.

QUERIES are image files, folders (id = file name without extension), list files or GLDv2 CSVs such as
``test.csv`` (images in ``test/`` beside it; ids = the CSV's ids). Writes:

- ``--out``: ``id,landmarks`` with ``<landmark> <confidence>`` (empty = no landmark), one row per query,
  unreadable queries included (empty);
- ``--neighbours``: JSON lines ``{"id", "path", "landmark", "confidence", "neighbours": [...]}``;
- ``--retrieval``: ``id,images`` with the ``--retrieval-k`` most similar index images (for mAP@100).

``--rerank local`` verifies the top ``--rerank-candidates`` global candidates of each query with the
index's local features (``landmarks index --local``) and seeded RANSAC in ``--rerank-workers``
processes; neighbours then carry their inlier counts. Unreadable queries are listed in ``skipped.csv``
beside ``--out``. The work is done by :func:`landmarks.pipeline.recognize_queries`.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

from landmarks.commands._index_common import add_extraction_arguments, resolve_device, setup_threads

if TYPE_CHECKING:
    from landmarks.recognize import RecognizeConfig

logger = logging.getLogger("landmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks recognize``."""
    parser.add_argument("--index", required=True, help="index folder")
    parser.add_argument(
        "queries",
        metavar="QUERIES",
        nargs="+",
        help="image files, folders, list files or a GLDv2 CSV (test.csv with test/ beside it)",
    )
    parser.add_argument(
        "--image-dir", default=None, help="where a CSV's images are (default: beside the CSV)"
    )
    parser.add_argument("--out", required=True, help="recognition CSV to write (id,landmarks)")
    parser.add_argument(
        "--neighbours", default=None, metavar="JSONL", help="also write the neighbours as JSON lines"
    )
    parser.add_argument(
        "--retrieval", default=None, metavar="CSV", help="also write the retrieval CSV (id,images)"
    )
    parser.add_argument(
        "--retrieval-k", type=int, default=100, help="images per query in --retrieval (default 100)"
    )
    parser.add_argument("--k", type=int, default=None, help="neighbours that vote (default 3)")
    parser.add_argument("--no-ood", action="store_true", help="ignore the index's non-landmark set")
    parser.add_argument(
        "--ood-weight", type=float, default=None, help="weight w of the query-side penalty (default 1)"
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="no landmark below this confidence (in the CSV too; default: every voted landmark is "
        "written, ranked by confidence, and is_landmark in --neighbours follows the threshold "
        "calibrated by `landmarks index`)",
    )
    parser.add_argument(
        "--demote-above",
        type=int,
        default=None,
        metavar="T",
        help="demote a landmark predicted for more than T queries",
    )
    parser.add_argument(
        "--demote-penalty",
        type=float,
        default=None,
        help="taken off the confidence of demoted predictions (default 1)",
    )
    parser.add_argument(
        "--rerank",
        choices=("none", "local"),
        default="none",
        help="re-rank the top candidates with local features and RANSAC (default: none)",
    )
    parser.add_argument(
        "--rerank-candidates",
        type=int,
        default=None,
        metavar="K",
        help="top global candidates verified by --rerank local (default 20)",
    )
    parser.add_argument(
        "--rerank-c",
        type=float,
        default=None,
        metavar="C",
        help="inlier count at which the re-ranking bonus saturates (default 70)",
    )
    parser.add_argument(
        "--rerank-min-inliers",
        type=int,
        default=None,
        metavar="N",
        help="fewer inliers earn no bonus (default 10)",
    )
    parser.add_argument(
        "--rerank-weight",
        type=float,
        default=None,
        metavar="W",
        help="the saturated bonus in units of the global score: score = s + W min(inliers, C) / C "
        "(default 1)",
    )
    parser.add_argument(
        "--rerank-workers",
        type=int,
        default=None,
        metavar="N",
        help="verification processes of --rerank local (default: CPUs - 1, at most 8; 0: none)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-ranking's RANSAC (default 0)")
    parser.add_argument(
        "--qe",
        type=int,
        default=None,
        metavar="N",
        help="alpha query expansion of the --retrieval list: add each query's N nearest index "
        "images (weighted by similarity^alpha) and search again (default 5; 0: off)",
    )
    parser.add_argument("--qe-alpha", type=float, default=None, metavar="A", help="alpha of --qe (default 3)")
    parser.add_argument(
        "--qe-vote",
        action="store_true",
        help="let the expanded queries vote too (default: voting uses the plain query)",
    )
    parser.add_argument(
        "--model", default=None, help="the model run (default: the one recorded in the index)"
    )
    add_extraction_arguments(parser)


def _config(args: argparse.Namespace) -> RecognizeConfig:
    from landmarks.recognize import RecognizeConfig

    conf = RecognizeConfig(
        batch_size=args.batch_size,
        ood=not args.no_ood,
        threshold=args.threshold,
        demote_above=args.demote_above,
        rerank=args.rerank,
        seed=args.seed,
    )
    if args.k is not None:
        conf.k = args.k
    if args.ood_weight is not None:
        conf.ood_weight = args.ood_weight
    if args.demote_penalty is not None:
        conf.demote_penalty = args.demote_penalty
    if args.rerank_candidates is not None:
        conf.rerank_candidates = args.rerank_candidates
    for key in ("rerank_c", "rerank_min_inliers", "rerank_weight"):
        if getattr(args, key) is not None:
            setattr(conf, key, getattr(args, key))
    conf.rerank_workers = args.rerank_workers
    if args.qe is not None:
        conf.qe_n = args.qe
    if args.qe_alpha is not None:
        conf.qe_alpha = args.qe_alpha
    if args.qe_vote:
        conf.qe_vote = True
    conf.__post_init__()
    return conf


def run(args: argparse.Namespace) -> int:
    """Recognize the queries and write the outputs (:func:`landmarks.pipeline.recognize_queries`); returns 0."""
    from landmarks.pipeline import recognize_queries

    conf = _config(args)
    device = resolve_device(args.device)
    if conf.rerank == "local" and conf.rerank_workers == 0:  # pairs verified here, one at a time
        from landmarks.rerank import limit_blas_threads

        limit_blas_threads(1)  # first: an OpenMP OpenBLAS sets OpenMP's (torch's) thread count too
    setup_threads(device, args.threads, args.workers)  # the forward pass's threads, whatever re-ranks
    stats = recognize_queries(
        args.index,
        args.queries,
        args.out,
        conf=conf,
        neighbours_jsonl=args.neighbours,
        retrieval_csv=args.retrieval,
        retrieval_k=args.retrieval_k,
        device=device,
        model=args.model,
        image_dir=args.image_dir,
        num_workers=args.workers,
    )
    ood = f"OOD handling on ({stats.non_landmarks} non-landmarks)" if stats.ood_active else "no OOD handling"
    rerank = ""
    if stats.rerank != "none":
        per_query = stats.timings_ms.get("rerank", 0.0) / max(1, stats.recognized)
        rerank = f"; re-ranked ({stats.rerank}, {per_query:.1f} ms/query)"
    thr = stats.is_landmark_threshold
    yes = (
        f"; is_landmark for {stats.is_landmark} (confidence >= {thr['value']:.4f}, {thr['source']})"
        if thr.get("value") is not None
        else ""
    )
    print(
        f"recognized {stats.recognized} of {stats.queries} queries ({stats.with_landmark} with a landmark, "
        f"{stats.unreadable} unreadable) -> {args.out}; {ood}{rerank}{yes}"
    )
    return 0
