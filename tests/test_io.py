"""Atomic writes leave the old file intact on failure; skipped.csv keeps one row per path."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from landmarks.utils.io import SkippedLog, atomic_write, read_json, write_json


def test_atomic_write_replaces_and_keeps_old_on_error(tmp_path: Path) -> None:
    p = tmp_path / "a" / "f.txt"
    with atomic_write(p) as f:
        f.write("one")
    assert p.read_text() == "one"
    with pytest.raises(RuntimeError), atomic_write(p) as f:
        f.write("two")
        raise RuntimeError("boom")
    assert p.read_text() == "one"
    assert [x.name for x in p.parent.iterdir()] == ["f.txt"]  # no temporary left behind


def test_json_roundtrip(tmp_path: Path) -> None:
    write_json(tmp_path / "x.json", {"a": [1, 2], "b": None})
    assert read_json(tmp_path / "x.json") == {"a": [1, 2], "b": None}


def test_skipped_log(tmp_path: Path) -> None:
    log = SkippedLog(tmp_path / "skipped.csv")
    log.add("a.jpg", "truncated image")
    log.add("b.jpg", "not an image\nsecond line")
    log.add("a.jpg", "again")
    again = SkippedLog(tmp_path / "skipped.csv")  # a resumed job does not repeat rows
    again.add("b.jpg", "x")
    with open(tmp_path / "skipped.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["reason"]) for r in rows] == [
        ("a.jpg", "truncated image"),
        ("b.jpg", "not an image second line"),
    ]


def test_remove_entries_removes_files_folders_and_links_only(tmp_path: Path) -> None:
    from landmarks.utils.io import remove_entries

    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "x.txt").write_text("x")
    (tmp_path / "f.txt").write_text("f")
    (tmp_path / "keep.txt").write_text("k")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "precious.txt").write_text("p")
    (tmp_path / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    remove_entries(tmp_path, ["d", "f.txt", "link", "missing"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "outside"]
    assert (tmp_path / "outside" / "precious.txt").read_text() == "p"  # a link is removed, not followed


def test_atomic_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    """mkstemp creates 0600 files; atomically written outputs must be as readable as ordinary ones."""
    import os
    import stat

    from landmarks.utils.io import atomic_save, atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_save(tmp_path / "b.npy", lambda p: Path(p).write_bytes(b"y"))
        with open(tmp_path / "c.txt", "w") as f:
            f.write("z")
    finally:
        os.umask(old)
    modes = {n: stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.bin", "b.npy", "c.txt")}
    assert modes["a.bin"] == modes["b.npy"] == modes["c.txt"] == 0o644
