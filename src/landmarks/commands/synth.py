"""``landmarks synth OUT --seed S``: write a synthetic GLDv2-shaped dataset (see :mod:`landmarks.data.synth`)."""

from __future__ import annotations

import argparse
import json
import time

from landmarks.data.synth import SynthConfig, default_workers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks synth``."""
    d = SynthConfig()
    parser.add_argument("out", metavar="OUT", help="output folder (created; a re-run completes a killed run)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"master seed (default {d.seed})")
    parser.add_argument(
        "--landmarks",
        type=int,
        default=d.n_landmarks,
        help=f"number of landmarks; ~22 training images each on a long tail (default {d.n_landmarks})",
    )
    parser.add_argument(
        "--queries",
        type=int,
        default=d.n_queries,
        help=f"test queries, landmark and out-of-domain (default {d.n_queries})",
    )
    parser.add_argument(
        "--ood-fraction",
        type=float,
        default=d.ood_fraction,
        help=f"share of test queries showing no landmark of the set, 0-0.99 (default {d.ood_fraction})",
    )
    parser.add_argument(
        "--size", type=int, default=d.size, help=f"long side of the images, px (default {d.size})"
    )
    parser.add_argument(
        "--nonlandmarks",
        type=int,
        default=d.n_nonlandmarks,
        help=f"out-of-domain examples in OUT/nonlandmarks/ (default {d.n_nonlandmarks})",
    )
    parser.add_argument(
        "--index-per-landmark",
        type=float,
        default=d.index_per_landmark,
        help=f"mean index images per landmark (default {d.index_per_landmark})",
    )
    parser.add_argument(
        "--index-distractors",
        type=float,
        default=d.index_distractors,
        help="out-of-domain index images, as a fraction of the landmark index images "
        f"(default {d.index_distractors})",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help=f"processes (default: all CPUs, here {default_workers()})"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh, also when OUT holds a dataset made with other parameters",
    )
    parser.add_argument("--json", action="store_true", help="print synth.json's statistics as JSON")


def run(args: argparse.Namespace) -> int:
    """Generate the dataset and print its statistics."""
    from landmarks.data.synth import generate

    conf = SynthConfig(
        seed=args.seed,
        n_landmarks=args.landmarks,
        n_queries=args.queries,
        ood_fraction=args.ood_fraction,
        size=args.size,
        n_nonlandmarks=args.nonlandmarks,
        index_per_landmark=args.index_per_landmark,
        index_distractors=args.index_distractors,
    )
    t0 = time.perf_counter()
    info = generate(args.out, conf, workers=args.workers, overwrite=args.overwrite)
    elapsed = time.perf_counter() - t0
    stats = info["statistics"]
    if args.json:
        print(json.dumps({**stats, "seconds": round(elapsed, 2)}, indent=2))
        return 0
    im = stats["images"]
    tr = stats["train_images_per_landmark"]
    te = stats["test"]
    print(f"wrote {args.out}: {im['total']} images in {elapsed:.1f} s")
    print(f"  landmarks          {stats['landmarks']}")
    print(
        f"  train              {im.get('train', 0)} images; per landmark min {tr['min']}, median {tr['median']:g}, "
        f"max {tr['max']}; {tr['share_le_5']:.0%} with <= 5, {tr['share_le_10']:.0%} with <= 10"
    )
    print("  long tail          " + ", ".join(f"{k}: {v}" for k, v in stats["long_tail_histogram"].items()))
    print(f"  index              {im.get('index', 0)} images")
    print(
        f"  test               {te['queries']} queries, {te['landmark_queries']} of landmarks, "
        f"{te['out_of_domain']} out-of-domain ({te['out_of_domain_share']:.1%})"
    )
    print(f"  nonlandmarks       {im.get('nonlandmarks', 0)} images")
    return 0
