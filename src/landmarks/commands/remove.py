"""``landmarks remove INDEX IDS...``: remove images from an index by id (or whole landmarks with --landmarks).

Each argument is an id, or a file with one id per line (blank lines and ``#`` comments skipped). The
removal holds the index's writer lock and also drops the removed images' local features.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from landmarks.commands._index_common import add_wait_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks remove``."""
    parser.add_argument("index", metavar="INDEX", help="index folder")
    parser.add_argument("ids", metavar="IDS", nargs="+", help="image ids, or files with one id per line")
    parser.add_argument(
        "--landmarks", action="store_true", help="the ids are landmark ids: remove all their images"
    )
    parser.add_argument("--missing-ok", action="store_true", help="ignore ids that are not in the index")
    add_wait_argument(parser)


def read_ids(args: list[str]) -> list[str]:
    """Ids from the command line, expanding arguments that name files (UTF-8 text)."""
    from landmarks.data.collection import read_text_file

    out: list[str] = []
    for a in args:
        p = Path(a)
        if p.is_file():
            for line in read_text_file(p).splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    out.append(line.split(",")[0].strip())
        else:
            out.append(a)
    return list(dict.fromkeys(out))


def run(args: argparse.Namespace) -> int:
    """Remove and save (:func:`landmarks.maintenance.remove_from_index`); returns 0."""
    from landmarks.maintenance import command_line, remove_from_index

    res = remove_from_index(
        args.index,
        read_ids(args.ids),
        landmarks=args.landmarks,
        missing_ok=args.missing_ok,
        wait_s=args.wait,
        command=command_line(),
    )
    assert res.index is not None
    print(
        f"removed {len(res.removed)} images from {args.index}; it now holds {len(res.index)} images of "
        f"{res.index.num_landmarks} landmarks"
    )
    return 0
