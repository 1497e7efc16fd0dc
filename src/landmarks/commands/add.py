"""``landmarks add INDEX SRC``: embed images (new images of known landmarks or whole new landmarks) and add them.

No retraining: the images are embedded with the index's model and appended; the index is saved
atomically (:func:`landmarks.maintenance.add_to_index`, under the index's writer lock: a second writer
is refused, or waits with ``--wait SECONDS``). Ids already in the index under the same landmark are left
alone, an id indexed under another landmark is refused (remove it first), unreadable images go to
``INDEX/skipped.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from landmarks.commands._index_common import (
    add_extraction_arguments,
    add_wait_argument,
    resolve_device,
    setup_threads,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks add``."""
    parser.add_argument("index", metavar="INDEX", help="index folder")
    parser.add_argument(
        "src", metavar="SRC", help="labelled images: folder-per-landmark, GLDv2 CSV or list file"
    )
    parser.add_argument(
        "--image-dir", default=None, help="where a CSV's images are (default: beside the CSV)"
    )
    parser.add_argument(
        "--model", default=None, help="the model run (default: the one recorded in the index)"
    )
    add_extraction_arguments(parser)
    add_wait_argument(parser)


def run(args: argparse.Namespace) -> int:
    """Add and save; returns 0."""
    from landmarks.data.collection import load_collection
    from landmarks.maintenance import command_line
    from landmarks.recognize import RecognizeConfig, Recognizer

    records = load_collection(args.src, args.image_dir)
    device = resolve_device(args.device)
    setup_threads(device, args.threads, args.workers)
    rec = Recognizer.load(
        args.index, RecognizeConfig(batch_size=args.batch_size), device=device, model=args.model
    )
    res = rec.add(records, num_workers=args.workers, wait_s=args.wait, command=command_line())
    print(
        f"added {len(res.added)} images ({res.new_landmarks} new landmarks) to {Path(args.index)}; it now holds "
        f"{len(res.index)} images of {res.index.num_landmarks} landmarks"
    )
    return 0
