"""``landmarks index``: embed a labelled collection and build the index folder (resumable, torchrun-aware).

    landmarks index --model runs/r50 --images data/train.csv --out index/ \\
        [--non-landmarks data/nonlandmarks/] [--type flat|ivfpq|hnsw] [--multiscale] [--flip]

A killed run started again with the same arguments resumes from its finished chunks (``OUT/work/``).
Under ``torchrun`` every rank embeds its share of the chunks and rank 0 builds and saves the index.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from landmarks.commands._index_common import (
    add_extraction_arguments,
    rank_world,
    resolve_device,
    setup_threads,
)
from landmarks.errors import LandmarksError

logger = logging.getLogger("landmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks index``."""
    parser.add_argument("--model", required=True, help="trained run folder (or checkpoint file)")
    parser.add_argument("--images", required=True,
                        help="labelled collection: folder-per-landmark, GLDv2 CSV (images in train/ beside "
                             "train.csv) or a list file with 'path landmark' lines")
    parser.add_argument("--image-dir", default=None, help="where a CSV's images are (default: beside the CSV)")
    parser.add_argument("--unlabelled", action="store_true",
                        help="the images carry no landmark ids (e.g. GLDv2 index.csv): a retrieval-only index for "
                             "`recognize --retrieval` (mAP@100); recognition against it finds no landmark")
    parser.add_argument("--out", required=True, help="index folder to write")
    parser.add_argument("--non-landmarks", nargs="+", default=None, metavar="SRC",
                        help="non-landmark images (folders, list files, CSVs, files) for the out-of-domain penalties")
    parser.add_argument("--type", choices=("flat", "ivfpq", "hnsw"), default="flat",
                        help="flat: exact (default); ivfpq / hnsw: approximate, for millions of images")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float32",
                        help="storage type of the embeddings (default float32)")
    parser.add_argument("--multiscale", action="store_true", help="average the embeddings at scales 0.707, 1, 1.414")
    parser.add_argument("--flip", action="store_true", help="add the embeddings of horizontally flipped images")
    parser.add_argument("--chunk-size", type=int, default=2048, help="images per resumable chunk (default 2048)")
    add_extraction_arguments(parser)
    parser.add_argument("--overwrite", action="store_true", help="rebuild even when OUT holds an index")
    # Local features for re-ranking (``--local``) are extracted by the verification stage into OUT/local/;
    # the flag is added there (landmarks.local_features.LocalFeatureStore) and wired in here.


def _clear(out: Path) -> None:
    """Remove what an earlier index left in ``out`` (only the index's own files)."""
    for name in ("meta.json", "skipped.csv", "work"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    if out.is_dir():
        for p in out.iterdir():
            if p.is_dir() and (p.name.startswith("data-") or p.name.startswith(".data-")):
                shutil.rmtree(p)


def run(args: argparse.Namespace) -> int:
    """Embed, build, save; returns 0."""
    from landmarks import extract
    from landmarks.data.collection import ImageRecord, load_collection, load_images
    from landmarks.index import IndexConfig, LandmarkIndex

    out = Path(args.out)
    rank, world = rank_world()
    if rank == 0:
        if (out / "meta.json").exists():
            if not args.overwrite:
                raise LandmarksError(f"{out} already holds an index: grow it with `landmarks add {out} SRC` "
                                     "or rebuild it with --overwrite")
            _clear(out)
        elif args.overwrite:
            _clear(out)
    conf = IndexConfig(type=args.type, dtype=args.dtype)
    if args.unlabelled:
        records = [ImageRecord(r.id, r.path, None) for r in load_images([args.images], args.image_dir)]
    else:
        try:
            records = load_collection(args.images, args.image_dir)
        except LandmarksError as e:
            raise LandmarksError(f"{e} (images without landmark ids: pass --unlabelled)") from e
    unlabelled = [r.id for r in records if not r.landmark]
    if unlabelled and not args.unlabelled:
        raise LandmarksError(f"{args.images}: {len(unlabelled)} image(s) have no landmark id "
                             f"(e.g. {unlabelled[0]}); an index needs a labelled collection (or --unlabelled for "
                             "a retrieval-only index)")
    if not records:
        raise LandmarksError(f"{args.images}: no images")
    device = resolve_device(args.device)
    setup_threads(device, args.threads, args.workers)
    embedder = extract.load_embedder(args.model, device=device)
    ext_conf = extract.ExtractConfig(batch_size=args.batch_size, num_workers=args.workers,
                                     scales=extract.MULTISCALE if args.multiscale else (1.0,), flip=args.flip,
                                     chunk_size=args.chunk_size)
    logger.info("indexing %d images of %d landmarks with model %s (%s)", len(records),
                len({r.landmark for r in records if r.landmark}), embedder.describe().get("name"),
                embedder.fingerprint[:12])
    res = extract.extract_embeddings(embedder, records, out / "work" / "images", ext_conf,
                                     skipped_csv=out / "skipped.csv", desc="index")
    nl_emb, nl_ids = None, None
    if args.non_landmarks:
        nl_records = load_images(args.non_landmarks)
        if not nl_records:
            raise LandmarksError(f"no images found in {' '.join(args.non_landmarks)}")
        nl = extract.extract_embeddings(embedder, nl_records, out / "work" / "non-landmarks", ext_conf,
                                        skipped_csv=out / "skipped.csv", desc="non-landmarks")
        nl_emb, nl_ids = nl.embeddings, nl.ids
    extract.finish_distributed()
    if rank != 0:
        return 0
    if not res.ids:
        raise LandmarksError(f"{args.images}: none of the {len(records)} images could be read (see {out}/skipped.csv)")
    kept = [records[i] for i in res.rows]
    index = LandmarkIndex.build(res.embeddings, res.ids, [r.landmark for r in kept],
                                paths=[str(Path(r.path).absolute()) for r in kept], model=embedder.describe(),
                                conf=conf, views=ext_conf.views(), non_landmarks=nl_emb, non_landmark_ids=nl_ids)
    index.save(out)
    shutil.rmtree(out / "work", ignore_errors=True)
    skipped = len(res.skipped)
    print(f"indexed {len(index)} images of {index.num_landmarks} landmarks into {out} "
          f"({conf.type}, {index.d}-d" + (f", {len(nl_ids or [])} non-landmarks" if nl_ids else "")
          + f"); skipped {skipped}" + (f" (see {out / 'skipped.csv'})" if skipped else ""))
    return 0
