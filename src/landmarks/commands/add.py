"""``landmarks add INDEX SRC``: embed images (new images of known landmarks or whole new landmarks) and add them.

No retraining: the images are embedded with the index's model and appended; the index is saved
atomically. Ids already in the index are left alone, unreadable images go to ``INDEX/skipped.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from landmarks.commands._index_common import add_extraction_arguments, resolve_device, setup_threads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks add``."""
    parser.add_argument("index", metavar="INDEX", help="index folder")
    parser.add_argument("src", metavar="SRC", help="labelled images: folder-per-landmark, GLDv2 CSV or list file")
    parser.add_argument("--image-dir", default=None, help="where a CSV's images are (default: beside the CSV)")
    parser.add_argument("--model", default=None, help="the model run (default: the one recorded in the index)")
    add_extraction_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Add and save; returns 0."""
    from landmarks.data.collection import load_collection
    from landmarks.recognize import RecognizeConfig, Recognizer

    records = load_collection(args.src, args.image_dir)
    device = resolve_device(args.device)
    setup_threads(device, args.threads, args.workers)
    rec = Recognizer.load(args.index, RecognizeConfig(batch_size=args.batch_size),
                          device=device, model=args.model)
    before = rec.index.num_landmarks
    n = rec.add(records, num_workers=args.workers)
    new = rec.index.num_landmarks - before
    print(f"added {n} images ({new} new landmarks) to {Path(args.index)}; it now holds "
          f"{len(rec.index)} images of {rec.index.num_landmarks} landmarks")
    return 0
