"""``landmarks index``: embed a labelled collection and build the index folder (resumable, torchrun-aware).

    landmarks index --model runs/r50 --images data/train.csv --out index/ \\
        [--non-landmarks data/nonlandmarks/] [--type flat|ivfpq|hnsw] [--multiscale] [--flip] \\
        [--local sift|model] [--unlabelled] [--whiten [DIM]] [--precision 0.9]

A killed run started again with the same arguments resumes from its finished chunks (``OUT/work/``,
``OUT/local/``). Under ``torchrun`` every rank embeds its share of the chunks and rank 0 extracts the
local features, builds and saves the index. The work is done by :func:`landmarks.pipeline.build_index`.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from landmarks.commands._index_common import (
    add_extraction_arguments,
    add_wait_argument,
    rank_world,
    resolve_device,
    setup_threads,
)

logger = logging.getLogger("landmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks index``."""
    parser.add_argument("--model", required=True, help="trained run folder (or checkpoint file)")
    parser.add_argument(
        "--images",
        required=True,
        help="labelled collection: folder-per-landmark, GLDv2 CSV (images in train/ beside "
        "train.csv) or a list file with 'path landmark' lines",
    )
    parser.add_argument(
        "--image-dir", default=None, help="where a CSV's images are (default: beside the CSV)"
    )
    parser.add_argument(
        "--unlabelled",
        action="store_true",
        help="the images carry no landmark ids (e.g. GLDv2 index.csv): a retrieval-only index for "
        "`recognize --retrieval` (mAP@100); recognition against it finds no landmark",
    )
    parser.add_argument("--out", required=True, help="index folder to write")
    parser.add_argument(
        "--non-landmarks",
        nargs="+",
        default=None,
        metavar="SRC",
        help="non-landmark images (folders, list files, CSVs, files) for the out-of-domain penalties",
    )
    parser.add_argument(
        "--type",
        choices=("flat", "ivfpq", "hnsw"),
        default="flat",
        help="flat: exact (default); ivfpq / hnsw: approximate, for millions of images",
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "float32"),
        default="float32",
        help="storage type of the embeddings (default float32)",
    )
    parser.add_argument(
        "--multiscale", action="store_true", help="average the embeddings at scales 0.707, 1, 1.414"
    )
    parser.add_argument(
        "--flip", action="store_true", help="add the embeddings of horizontally flipped images"
    )
    parser.add_argument(
        "--chunk-size", type=int, default=2048, help="images per resumable chunk (default 2048)"
    )
    add_extraction_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="rebuild even when OUT holds an index")
    parser.add_argument(
        "--local",
        choices=("sift", "model"),
        default=None,
        help="also store every image's local features in OUT/local/ for `recognize --rerank local`: "
        "sift (RootSIFT, weight-free) or model (the run's DELG-style local head)",
    )
    parser.add_argument(
        "--whiten",
        nargs="?",
        type=int,
        const=0,
        default=None,
        metavar="DIM",
        help="learn PCA-whitening on the indexed images themselves (index and non-landmark images, "
        "no labels) and apply it to index, non-landmark and query embeddings; DIM components "
        "(default: min(256, images - 1)). "
        "Helps a model that was not trained on landmarks (`landmarks init`)",
    )
    parser.add_argument(
        "--whiten-shrinkage",
        type=float,
        default=1.0,
        metavar="S",
        help="whitening divides by sqrt(eigenvalue + S * mean eigenvalue) (default 1; 0: full)",
    )
    parser.add_argument(
        "--precision",
        type=float,
        default=0.9,
        help="calibrate is_landmark (needs --non-landmarks) so that a 'yes' names the right landmark "
        "with this precision, from leave-one-out queries of the index images (default 0.9)",
    )
    parser.add_argument(
        "--ood-share",
        type=float,
        default=0.5,
        help="share of queries expected to show no landmark, the prior behind --precision (default 0.5)",
    )
    parser.add_argument("--no-calibrate", action="store_true", help="do not calibrate is_landmark")
    parser.add_argument(
        "--dba",
        type=int,
        default=0,
        metavar="N",
        help="database-side augmentation: replace every index image's embedding by the "
        "similarity^alpha-weighted sum of itself and its N nearest index images, once, "
        "stored with the index (default 0: off)",
    )
    parser.add_argument(
        "--dba-alpha", type=float, default=3.0, metavar="A", help="alpha of --dba (default 3)"
    )
    parser.add_argument(
        "--local-workers",
        type=int,
        default=None,
        help="processes decoding (and running SIFT) for --local (default: CPUs - 1, at most 8)",
    )
    add_wait_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Embed, build, save (:func:`landmarks.pipeline.build_index`); returns 0."""
    from landmarks import extract
    from landmarks.calibrate import CalibrationConfig
    from landmarks.expansion import ExpansionConfig
    from landmarks.index import IndexConfig, LandmarkIndex
    from landmarks.maintenance import command_line
    from landmarks.pipeline import build_index
    from landmarks.whiten import WhitenConfig

    whiten = (
        None
        if args.whiten is None
        else WhitenConfig(dim=args.whiten or None, shrinkage=args.whiten_shrinkage)
    )
    calibration = CalibrationConfig(
        enabled=not args.no_calibrate, precision=args.precision, ood_share=args.ood_share
    )
    rank, _ = rank_world()
    device = resolve_device(args.device)
    setup_threads(device, args.threads, args.workers)
    ext_conf = extract.ExtractConfig(
        batch_size=args.batch_size,
        num_workers=args.workers,
        scales=extract.MULTISCALE if args.multiscale else (1.0,),
        flip=args.flip,
        chunk_size=args.chunk_size,
    )
    out = build_index(
        args.model,
        args.images,
        args.out,
        non_landmarks=args.non_landmarks,
        unlabelled=args.unlabelled,
        local=args.local,
        index_conf=IndexConfig(type=args.type, dtype=args.dtype),
        extract_conf=ext_conf,
        device=device,
        overwrite=args.overwrite,
        image_dir=args.image_dir,
        local_workers=args.local_workers,
        whiten=whiten,
        calibration=calibration,
        dba=ExpansionConfig(args.dba, args.dba_alpha),
        wait_s=args.wait,
        command=command_line(),
    )
    if rank != 0:
        return 0
    index = LandmarkIndex.load(out)
    skipped = _count_rows(out / "skipped.csv")
    n_nl = len(index.non_landmark_ids)
    local = index.meta.get("local")
    print(
        f"indexed {len(index)} images of {index.num_landmarks} landmarks into {out} "
        f"({index.conf.type}, {index.d}-d"
        + (f", {n_nl} non-landmarks" if n_nl else "")
        + (f", local features: {local['features']}" if local else "")
        + (
            f", whitened {index.whitening.in_dim} -> {index.whitening.dim}"
            if index.whitening is not None
            else ""
        )
        + (f", DBA n={index.dba['n']} alpha={index.dba['alpha']:g}" if index.dba else "")
        + f"); skipped {skipped}"
        + (f" (see {out / 'skipped.csv'})" if skipped else "")
    )
    cal = index.meta.get("calibration")
    if cal:
        print(
            f"is_landmark: confidence >= {cal['threshold']:.4f} (precision {cal['precision']:.3f}"
            + ("" if cal["reached"] else f", target {cal['precision_target']:g} not reached")
            + f" at {cal['ood_share']:.0%} non-landmark queries; leave-one-out: {cal['landmark_recall']:.1%} of "
            f"{cal['landmark_queries']} landmark images recognised above it, {cal['nonlandmark_yes']:.1%} of "
            f"{cal['nonlandmark_queries']} non-landmarks above it)"
        )
    elif not args.no_calibrate:
        print("is_landmark: not calibrated (needs --non-landmarks and a landmark with 2+ images)")
    return 0


def _count_rows(csv_path: Path) -> int:
    """Rows of a ``skipped.csv`` (0 when there is none)."""
    if not csv_path.exists():
        return 0
    with open(csv_path, encoding="utf-8") as f:
        return max(0, sum(1 for line in f if line.strip()) - 1)
