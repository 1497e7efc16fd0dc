"""``landmarks recognize --index INDEX QUERIES... --out predictions.csv``: Kaggle recognition CSV and more.

QUERIES are image files, folders (id = file name without extension), list files or GLDv2 CSVs such as
``test.csv`` (images in ``test/`` beside it; ids = the CSV's ids). Writes:

- ``--out``: ``id,landmarks`` with ``<landmark> <confidence>`` (empty = no landmark), one row per query,
  unreadable queries included (empty);
- ``--neighbours``: JSON lines ``{"id", "path", "landmark", "confidence", "neighbours": [...]}``;
- ``--retrieval``: ``id,images`` with the ``--retrieval-k`` most similar index images (for mAP@100).

Unreadable queries are listed in ``skipped.csv`` beside ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from landmarks.commands._index_common import add_extraction_arguments, resolve_device, setup_threads

if TYPE_CHECKING:
    from landmarks.recognize import RecognizeConfig

logger = logging.getLogger("landmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks recognize``."""
    parser.add_argument("--index", required=True, help="index folder")
    parser.add_argument("queries", metavar="QUERIES", nargs="+",
                        help="image files, folders, list files or a GLDv2 CSV (test.csv with test/ beside it)")
    parser.add_argument("--image-dir", default=None, help="where a CSV's images are (default: beside the CSV)")
    parser.add_argument("--out", required=True, help="recognition CSV to write (id,landmarks)")
    parser.add_argument("--neighbours", default=None, metavar="JSONL", help="also write the neighbours as JSON lines")
    parser.add_argument("--retrieval", default=None, metavar="CSV", help="also write the retrieval CSV (id,images)")
    parser.add_argument("--retrieval-k", type=int, default=100, help="images per query in --retrieval (default 100)")
    parser.add_argument("--k", type=int, default=None, help="neighbours that vote (default 3)")
    parser.add_argument("--no-ood", action="store_true", help="ignore the index's non-landmark set")
    parser.add_argument("--ood-weight", type=float, default=None, help="weight w of the query-side penalty (default 1)")
    parser.add_argument("--threshold", type=float, default=None, help="no landmark below this confidence")
    parser.add_argument("--demote-above", type=int, default=None, metavar="T",
                        help="demote a landmark predicted for more than T queries")
    parser.add_argument("--demote-penalty", type=float, default=None,
                        help="taken off the confidence of demoted predictions (default 1)")
    parser.add_argument("--rerank", choices=("none", "local"), default="none",
                        help="re-rank the top candidates with local features and RANSAC (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-ranking's RANSAC (default 0)")
    parser.add_argument("--model", default=None, help="the model run (default: the one recorded in the index)")
    add_extraction_arguments(parser)


def _config(args: argparse.Namespace) -> RecognizeConfig:
    from landmarks.recognize import RecognizeConfig

    conf = RecognizeConfig(batch_size=args.batch_size, ood=not args.no_ood, threshold=args.threshold,
                           demote_above=args.demote_above, rerank=args.rerank, seed=args.seed)
    if args.k is not None:
        conf.k = args.k
    if args.ood_weight is not None:
        conf.ood_weight = args.ood_weight
    if args.demote_penalty is not None:
        conf.demote_penalty = args.demote_penalty
    conf.__post_init__()
    return conf


def run(args: argparse.Namespace) -> int:
    """Recognize the queries and write the outputs; returns 0."""
    from landmarks import extract
    from landmarks.data.collection import load_images
    from landmarks.errors import LandmarksError
    from landmarks.recognize import Recognizer, neighbours_row
    from landmarks.submission import write_recognition_csv, write_retrieval_csv
    from landmarks.utils.io import atomic_write

    records = load_images(args.queries, args.image_dir)
    if not records:
        raise LandmarksError(f"no query images found in {' '.join(args.queries)}")
    conf = _config(args)
    device = resolve_device(args.device)
    setup_threads(device, args.threads, args.workers)
    rec = Recognizer.load(args.index, conf, device=device, model=args.model)
    out = Path(args.out)
    work = out.parent / f".{out.name}.work"
    ext_conf = extract.ExtractConfig(batch_size=args.batch_size, num_workers=args.workers,
                                     scales=rec.extract_conf.scales, flip=rec.extract_conf.flip)
    res = extract.extract_resumable(rec.embedder, records, work, ext_conf, skipped_csv=out.parent / "skipped.csv",
                                    desc="queries")
    done = [records[i] for i in res.rows]
    recs = rec.recognize_embeddings(res.embeddings, queries=[r.path for r in done])
    predictions: dict[str, tuple[str, float] | None] = {
        r.id: ((str(x.landmark), x.confidence) if x.is_landmark and x.landmark is not None else None)
        for r, x in zip(done, recs)}
    write_recognition_csv(out, predictions, ids=[r.id for r in records])
    if args.neighbours:
        with atomic_write(args.neighbours) as f:
            for r, x in zip(done, recs):
                f.write(json.dumps(neighbours_row(r.id, str(r.path), x)) + "\n")
    if args.retrieval:
        ranked: dict[str, list[str]] = {r.id: [] for r in records}
        ranked.update(zip((r.id for r in done), rec.retrieve(res.embeddings, args.retrieval_k)))
        write_retrieval_csv(args.retrieval, ranked)
    shutil.rmtree(work, ignore_errors=True)
    n_pred = sum(v is not None for v in predictions.values())
    info = rec.info()
    ood = (f"OOD handling on ({info['non_landmarks']} non-landmarks)" if info["ood_active"]
           else "no OOD handling")
    print(f"recognized {len(done)} of {len(records)} queries ({n_pred} with a landmark, "
          f"{len(res.skipped)} unreadable) -> {out}; {ood}")
    return 0
