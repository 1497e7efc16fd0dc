"""``landmarks scan``: counts, long tail, sizes, formats, duplicates, and every bad file named with its reason."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_image
from landmarks.cli import main
from landmarks.data import scan as scan_mod
from landmarks.data.scan import check_file, format_report, long_tail_histogram, scan
from landmarks.errors import LandmarksError


def _messy_collection(root: Path) -> dict[str, Path]:
    """Two landmarks with good images, a duplicate, and four bad files."""
    make_image(root / "tower" / "a.jpg", (40, 30), seed=1)
    make_image(root / "tower" / "b.jpg", (30, 40), seed=2)
    make_image(root / "tower" / "c.png", (64, 48), kind="png", seed=3)
    make_image(root / "tower" / "d.jpg", (50, 50), kind="png", seed=4)  # PNG named .jpg: fine, counted
    (root / "bridge").mkdir()
    shutil.copy(root / "tower" / "a.jpg", root / "bridge" / "copy of a.jpg")
    make_image(root / "bridge" / "e.webp", (20, 10), kind="webp", seed=5)
    rng = np.random.default_rng(0)
    full = root / "full.tmp"
    Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(full, format="JPEG", quality=90)
    data = full.read_bytes()
    full.unlink()
    bad = {
        "truncated": root / "bridge" / "truncated.jpg",
        "text": root / "bridge" / "readme.jpg",
        "empty": root / "tower" / "empty.jpg",
    }
    (root / "tower" / "folder.jpg").mkdir()  # a folder named like an image is not an image
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["text"].write_text("hello, I am text\n")
    bad["empty"].write_bytes(b"")
    return bad


def test_folder_scan_names_every_bad_file(tmp_path: Path) -> None:
    root = tmp_path / "coll"
    bad = _messy_collection(root)
    skipped = tmp_path / "skipped.csv"
    rep = scan(root, workers=1, skipped=skipped, progress=False)
    assert rep["kind"] == "folder"
    assert rep["images"] == 9 and rep["readable"] == 6 and rep["unreadable"] == 3
    reasons = {Path(x["path"]).name: x["reason"] for x in rep["unreadable_files"]}
    assert set(reasons) == {"truncated.jpg", "readme.jpg", "empty.jpg"}
    assert "truncated" in reasons["truncated.jpg"]
    assert "not a recognised image" in reasons["readme.jpg"]
    assert "empty" in reasons["empty.jpg"]
    lm = rep["landmarks"]
    assert lm["count"] == 2 and lm["largest"][0] == ["tower", 4] and lm["largest"][1] == ["bridge", 2]
    assert lm["long_tail"] == {"1": 0, "2-5": 2, "6-10": 0, "11-20": 0, "21-50": 0, "51-100": 0, "101+": 0}
    assert rep["sizes"]["width"] == {"min": 20, "median": 40.0, "max": 64}
    assert rep["sizes"]["height"] == {"min": 10, "median": 35.0, "max": 50}
    assert rep["formats"] == {"JPEG": 3, "PNG": 2, "WEBP": 1}
    assert rep["extension_mismatch"]["count"] == 1 and rep["extension_mismatch"]["examples"] == ["tower/d"]
    assert rep["duplicates"]["groups"] == 1 and rep["duplicates"]["listed"] == [
        ["bridge/copy%20of%20a", "tower/a"]
    ]
    with open(skipped, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {Path(r["path"]).name for r in rows} == set(reasons)
    text = format_report(rep)
    for p in (bad["truncated"], bad["text"], bad["empty"]):
        assert str(p) in text
    assert "duplicates: 1 groups" in text and "2-5" in text


def test_cli_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "coll"
    _messy_collection(root)
    assert main(["scan", str(root), "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "3 unreadable" in text and "readme.jpg" in text and "long tail" in text
    assert main(["scan", str(root), "--json", "--workers", "1", "--skipped", str(tmp_path / "s.csv")]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert set(rep) >= {
        "source",
        "kind",
        "images",
        "readable",
        "unreadable",
        "landmarks",
        "sizes",
        "formats",
        "duplicates",
        "unreadable_files",
    }
    assert {"id", "path", "reason"} == set(rep["unreadable_files"][0])
    assert (tmp_path / "s.csv").is_file()
    assert main(["scan", str(tmp_path / "nowhere")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_unlabelled_folder(tmp_path: Path) -> None:
    make_image(tmp_path / "q" / "one.jpg")
    make_image(tmp_path / "q" / "two.gif", kind="gif")
    (tmp_path / "q" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(30))
    rep = scan(tmp_path / "q", workers=1, progress=False)
    assert rep["kind"] == "unlabelled" and rep["landmarks"] is None
    assert rep["readable"] == 2 and rep["unreadable_files"][0]["id"] == "broken"
    assert "unlabelled" in format_report(rep)


def test_gldv2_csv_with_a_missing_file(tiny_synth: Path, tmp_path: Path) -> None:
    root = tmp_path / "g"
    root.mkdir()
    shutil.copy(tiny_synth / "index.csv", root / "index.csv")
    shutil.copytree(tiny_synth / "index", root / "index")
    victim = next((root / "index").rglob("*.jpg"))
    victim.unlink()
    rep = scan(root / "index.csv", workers=1, progress=False)
    assert rep["kind"] == "gldv2_csv" and rep["unreadable"] == 1
    assert (
        rep["unreadable_files"][0]["id"] == victim.stem
        and "not found" in rep["unreadable_files"][0]["reason"]
    )
    whole = scan(tiny_synth, workers=1, progress=False)  # a GLDv2 root: read through train.csv
    assert whole["kind"] == "gldv2_csv" and whole["unreadable"] == 0
    assert whole["landmarks"]["count"] == 8 and whole["formats"] == {"JPEG": whole["readable"]}


def test_pool_gives_the_same_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "coll"
    _messy_collection(root)
    inline = scan(root, workers=1, progress=False)
    monkeypatch.setattr(scan_mod, "_INLINE_BELOW", 0)
    pooled = scan(root, workers=2, progress=False)
    assert pooled == inline


def test_check_file_never_raises(tmp_path: Path) -> None:
    assert not check_file(tmp_path / "missing.jpg").ok
    assert "directory" in check_file(tmp_path).reason
    big = make_image(tmp_path / "big.png", (50, 50), kind="png")
    res = check_file(big, max_pixels=100)
    assert not res.ok and "exceeds" in res.reason


def test_bad_source(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(LandmarksError):
        scan(tmp_path / "x.json", progress=False)


def test_long_tail_histogram_bins() -> None:
    h = long_tail_histogram([1, 2, 5, 6, 10, 11, 20, 21, 50, 51, 100, 101, 5000])
    assert h == {"1": 1, "2-5": 2, "6-10": 2, "11-20": 2, "21-50": 2, "51-100": 2, "101+": 2}
    assert sum(long_tail_histogram([]).values()) == 0
