"""Runs the ``landmarks`` CLI with :class:`TinyEmbedder` standing in for trained runs (CLI tests)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import landmarks.extract
from _index_support import TinyEmbedder

landmarks.extract.load_embedder = TinyEmbedder.from_run  # type: ignore[assignment]

from landmarks.cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
