"""Atomic file writing, JSON helpers and the ``skipped.csv`` log shared by every batch stage."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def _file_mode() -> int:
    """``0o666`` less the process umask: the mode ``open()`` would give a new file (``mkstemp`` gives 0600).

    The umask is read from ``/proc/self/status`` (setting and restoring it is not thread-safe); 022 elsewhere.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success fsync it and rename it over ``path``.

    A reader never sees a half-written file and a killed writer leaves the old file intact.
    ``mode`` is ``"w"`` (text) or ``"wb"`` (binary).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding, newline=None) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def atomic_save(path: str | Path, save_fn: Any) -> None:
    """Call ``save_fn(tmp_path)`` (a library writer that wants a file name) and rename atomically.

    The temporary name keeps the suffix of ``path`` so writers that look at it (``np.save``) behave.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.fchmod(fd, _file_mode())
    os.close(fd)
    try:
        save_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def remove_entries(root: str | Path, names: Iterable[str]) -> None:
    """Delete ``root/name`` for each name, files and whole folders alike; missing ones are skipped."""
    import shutil

    for name in names:
        p = Path(root) / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class SkippedLog:
    """Appends ``path,reason`` rows to ``skipped.csv`` (header written once); thread-safe.

    Batch stages record every unreadable input here and carry on. Rows are flushed at once so a
    killed job keeps what it reported.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self.count = 0
        self._seen: set[str] = set()
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    self._seen.add(row["path"])

    def add(self, path: str | Path, reason: str) -> None:
        """Record one skipped item (once per path)."""
        key = str(path)
        with self._lock:
            self.count += 1
            if key in self._seen:
                return
            self._seen.add(key)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            new = not self.path.exists()
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["path", "reason"])
                w.writerow([key, reason.replace("\n", " ")])
