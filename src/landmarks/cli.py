"""The ``landmarks`` command: a thin layer that parses arguments and calls the stage functions.

Each verb lives in ``landmarks.commands.<verb>`` with two functions::

    def add_arguments(parser: argparse.ArgumentParser) -> None: ...
    def run(args: argparse.Namespace) -> int: ...

and is imported only when it runs, so ``landmarks --help`` is instant. A :class:`LandmarksError`
raised by a stage is printed as one line and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from landmarks import __version__
from landmarks.errors import LandmarksError

#: (verb, one-line help). The order is the order of a pipeline.
VERBS: list[tuple[str, str]] = [
    ("synth", "write a synthetic GLDv2-shaped dataset (long tail, 3-D scenes, out-of-domain queries)"),
    ("scan", "report a collection: images per landmark, sizes, formats, duplicates, unreadable files"),
    ("init", "a model from ImageNet weights with no training (EfficientNet-Lite + GeM), ready to index"),
    ("train", "train the global descriptor (timm backbone + GeM + neck + sub-center ArcFace)"),
    ("index", "embed a labelled collection and build a FAISS index (resumable)"),
    ("add", "add images or whole new landmarks to an index, no retraining"),
    ("remove", "remove images from an index by id"),
    ("recognize", "recognize query images: kNN voting, out-of-domain handling, optional re-ranking"),
    ("match", "match two images with local features and RANSAC; print or draw the inliers"),
    (
        "evaluate",
        "score Kaggle recognition (GAP) or retrieval (mAP@k) CSVs, or run the Revisited Oxford/Paris protocol",
    ),
    ("report", "write a self-contained HTML report of predictions with neighbours and matches"),
    ("serve", "serve recognition over HTTP (FastAPI + uvicorn) with a page to try it"),
    ("demo", "end to end on this machine: synth, train, index, recognize, evaluate, report"),
]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The top-level parser and one sub-parser per verb (arguments added lazily)."""
    parser = argparse.ArgumentParser(
        prog="landmarks",
        description="Landmark recognition and retrieval: train, index, recognize, verify, evaluate, serve.",
    )
    parser.add_argument("--version", action="version", version=f"landmarks {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", title="verbs")
    subparsers = {}
    for verb, help_text in VERBS:
        subparsers[verb] = sub.add_parser(verb, help=help_text, description=help_text)
    return parser, subparsers


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Plain ``HH:MM:SS level message`` lines on stderr for the ``landmarks`` logger."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    log = logging.getLogger("landmarks")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``landmarks`` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    # Find the verb first so that only its module is imported.
    pos = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    verb = argv[pos] if pos is not None else None
    if verb not in subparsers:
        args = parser.parse_args(argv)  # --help, --version, or argparse's error for an unknown verb
        parser.print_help()
        return 0
    assert pos is not None
    module = importlib.import_module(f"landmarks.commands.{verb}")
    sub = subparsers[verb]
    module.add_arguments(sub)
    args = parser.parse_args(argv[:pos])
    try:
        # options and positionals in any order (``train --time-budget 5 a=1 --preset cpu b=2``)
        verb_args = sub.parse_intermixed_args(argv[pos + 1 :])
    except TypeError:  # verbs with sub-commands (``evaluate``) are parsed the ordinary way
        verb_args = sub.parse_args(argv[pos + 1 :])
    for key, value in vars(verb_args).items():
        setattr(args, key, value)
    args.verb = verb
    setup_logging(args.verbose, args.quiet)
    try:
        return int(module.run(args) or 0)
    except LandmarksError as e:
        print(f"landmarks {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"landmarks {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
