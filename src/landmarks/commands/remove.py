"""``landmarks remove INDEX IDS...``: remove images from an index by id (or whole landmarks with --landmarks).

Each argument is an id, or a file with one id per line (blank lines and ``#`` comments skipped).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from landmarks.errors import LandmarksError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks remove``."""
    parser.add_argument("index", metavar="INDEX", help="index folder")
    parser.add_argument("ids", metavar="IDS", nargs="+", help="image ids, or files with one id per line")
    parser.add_argument("--landmarks", action="store_true", help="the ids are landmark ids: remove all their images")
    parser.add_argument("--missing-ok", action="store_true", help="ignore ids that are not in the index")


def read_ids(args: list[str]) -> list[str]:
    """Ids from the command line, expanding arguments that name files."""
    out: list[str] = []
    for a in args:
        p = Path(a)
        if p.is_file():
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line.split(",")[0].strip())
        else:
            out.append(a)
    return list(dict.fromkeys(out))


def run(args: argparse.Namespace) -> int:
    """Remove and save; returns 0."""
    from landmarks.index import LandmarkIndex

    index = LandmarkIndex.load(args.index)
    wanted = read_ids(args.ids)
    if args.landmarks:
        known = set(index.landmarks)
        missing = [lm for lm in wanted if lm not in known]
        sel = set(wanted)
        ids = [i for i, lm in zip(index.ids, index.landmarks) if lm in sel]
    else:
        missing = [i for i in wanted if index.row_of(i) is None]
        ids = [i for i in wanted if index.row_of(i) is not None]
    if missing and not args.missing_ok:
        what = "landmark" if args.landmarks else "image"
        raise LandmarksError(f"{len(missing)} {what} id(s) not in {args.index}: {', '.join(missing[:10])} "
                             "(pass --missing-ok to ignore them)")
    n = index.remove(ids)
    from landmarks.calibrate import recalibrate

    recalibrate(index)
    index.save(args.index)
    print(f"removed {n} images from {args.index}; it now holds {len(index)} images of "
          f"{index.num_landmarks} landmarks")
    return 0
