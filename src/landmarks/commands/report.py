"""``landmarks report``: a self-contained HTML report of recognition predictions against a solution."""

from __future__ import annotations

import argparse
from pathlib import Path

from landmarks.report import ReportConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks report``."""
    d = ReportConfig()
    parser.add_argument(
        "--predictions",
        required=True,
        type=Path,
        metavar="P.csv",
        help="Kaggle recognition predictions (id,landmarks with '<landmark> <score>')",
    )
    parser.add_argument(
        "--solution",
        required=True,
        type=Path,
        metavar="S.csv",
        help="the solution (id,landmarks[,Usage]); empty landmarks = non-landmark query",
    )
    parser.add_argument(
        "--out", required=True, type=Path, metavar="report.html", help="the HTML file to write"
    )
    parser.add_argument(
        "--neighbours",
        type=Path,
        default=None,
        metavar="N.jsonl",
        help="neighbours written by `landmarks recognize --neighbours` "
        "(default: <predictions stem>.neighbours.jsonl beside the predictions, if present)",
    )
    parser.add_argument(
        "--index",
        type=Path,
        default=None,
        metavar="INDEX",
        help="index folder: image paths the neighbours file lacks, and the local-feature settings "
        "the match drawings verify with",
    )
    parser.add_argument(
        "--retrieval",
        type=Path,
        default=None,
        metavar="R.csv",
        help="retrieval predictions (id,images: `landmarks recognize --retrieval`); with "
        "--retrieval-solution the page shows mAP@100 and each query's first correct image",
    )
    parser.add_argument(
        "--retrieval-solution",
        type=Path,
        default=None,
        metavar="RS.csv",
        help="the retrieval solution (id,images[,Usage])",
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=d.max_rows,
        help=f"query rows shown, worst first (default {d.max_rows}); the page says how many were omitted",
    )
    parser.add_argument(
        "--top-k", type=int, default=d.top_k, help=f"neighbours shown per query (default {d.top_k})"
    )
    parser.add_argument(
        "--thumb-px",
        type=int,
        default=d.thumb_px,
        help=f"longer side of query thumbnails in pixels (default {d.thumb_px})",
    )
    parser.add_argument(
        "--max-match-drawings",
        type=int,
        default=d.max_match_drawings,
        help="rows whose top verified neighbour gets its inlier matches recomputed and drawn "
        f"(default {d.max_match_drawings}; 0: none)",
    )
    parser.add_argument("--title", default=d.title, help="page title")


def run(args: argparse.Namespace) -> int:
    """Write the report and print its path."""
    from landmarks.report import write_report

    conf = ReportConfig(
        max_rows=args.max_rows,
        top_k=args.top_k,
        thumb_px=args.thumb_px,
        max_match_drawings=args.max_match_drawings,
        title=args.title,
    )
    out = write_report(
        args.predictions,
        args.solution,
        args.out,
        neighbours_jsonl=args.neighbours,
        index_dir=args.index,
        conf=conf,
        retrieval_csv=args.retrieval,
        retrieval_solution_csv=args.retrieval_solution,
    )
    print(out)
    return 0
