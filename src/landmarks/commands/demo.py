"""``landmarks demo [--out DIR]``: synthesize, train, index, recognize, evaluate and report, end to end.

Runs offline on a CPU in about 10 minutes with the defaults; a killed demo resumes where it stopped
(``--overwrite`` starts afresh). Prints the summary table (GAP, GAP ignoring non-landmarks, top-1,
mAP@100 and the time of each stage) and writes ``DIR/report.html``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks demo``."""
    parser.add_argument("--out", default="demo", help="output folder (default: ./demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the dataset, training and RANSAC")
    parser.add_argument("--train-minutes", type=float, default=None, help="training time budget (default 4)")
    parser.add_argument("--landmarks", type=int, default=None, help="synthetic landmarks (default 100)")
    parser.add_argument("--queries", type=int, default=None, help="test queries (default 1000)")
    parser.add_argument(
        "--preset",
        default=None,
        help="training preset (default cpu: Lite0 fine-tuned from ImageNet weights; cpu-scratch: random init)",
    )
    parser.add_argument(
        "--local-features",
        choices=("sift", "model"),
        default=None,
        help="local features for re-ranking (default sift)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--overwrite", action="store_true", help="delete --out first")


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its summary; returns 0."""
    from landmarks.demo import DemoConfig, print_summary, run_demo
    from landmarks.errors import LandmarksError

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise LandmarksError(f"--out {out}: is a file, not a folder")
    if args.overwrite and out.exists():
        shutil.rmtree(out)
    conf = DemoConfig(seed=args.seed, device=args.device)
    for name, value in (
        ("train_minutes", args.train_minutes),
        ("landmarks", args.landmarks),
        ("queries", args.queries),
        ("preset", args.preset),
        ("local_features", args.local_features),
    ):
        if value is not None:
            setattr(conf, name, value)
    print_summary(run_demo(out, conf))
    return 0
