"""``landmarks scan SRC``: images per landmark, sizes, formats, duplicates and unreadable files of a collection."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks scan``."""
    parser.add_argument(
        "src",
        metavar="SRC",
        help="a GLDv2 CSV (or a folder holding train.csv), a folder per landmark, a list file, "
        "or a folder of unlabelled images",
    )
    parser.add_argument(
        "--image-dir",
        default=None,
        help="where a CSV's images are (default: the split folder beside the CSV)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all CPUs)")
    parser.add_argument(
        "--skipped",
        default=None,
        metavar="CSV",
        help="append unreadable files to this skipped.csv (path,reason)",
    )
    parser.add_argument(
        "--max-groups", type=int, default=100, help="duplicate groups listed in full (default 100)"
    )


def run(args: argparse.Namespace) -> int:
    """Scan and print the report."""
    from landmarks.data.scan import format_report, scan

    report = scan(
        args.src,
        workers=args.workers,
        skipped=args.skipped,
        image_dir=args.image_dir,
        max_groups=args.max_groups,
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
    return 0
