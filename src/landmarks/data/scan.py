"""``landmarks scan``: what a collection holds, before anyone trains on it.

:func:`scan` reads a GLDv2 CSV (or a GLDv2 root holding ``train.csv``), a folder-per-landmark
collection, a list file or an unlabelled folder, fully decodes every image with
:func:`landmarks.data.decode.decode_image` in a process pool (so truncated files are caught) and reports:

- images per landmark: counts, the long-tail histogram (bins 1, 2-5, 6-10, 11-20, 21-50, 51-100, 101+),
  the largest landmarks;
- image sizes (min / median / max width and height), formats by content (and names whose extension
  says otherwise);
- duplicates by content hash (groups of ids whose files are byte-identical);
- every unreadable file with its reason (also appended to ``skipped.csv`` when asked).

It never raises on a bad image; the report is one JSON-ready dict (:func:`format_report` makes the text).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from landmarks.data.collection import (
    ImageRecord,
    is_image_file,
    load_folder_collection,
    load_gldv2_csv,
    load_image_folder,
    load_list_file,
)
from landmarks.data.decode import DEFAULT_MAX_PIXELS, decode_image, image_info
from landmarks.errors import ImageDecodeError, LandmarksError
from landmarks.utils.dist import cpu_count
from landmarks.utils.io import SkippedLog
from landmarks.utils.progress import Progress

logger = logging.getLogger("landmarks")

#: Bins of the images-per-landmark histogram: (low, high) inclusive, None = no upper bound.
LONG_TAIL_BINS: tuple[tuple[int, int | None], ...] = (
    (1, 1),
    (2, 5),
    (6, 10),
    (11, 20),
    (21, 50),
    (51, 100),
    (101, None),
)
#: Extensions expected for each detected format (for the "extension says otherwise" count).
_FORMAT_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "MPO": {".jpg", ".jpeg", ".mpo"},
    "PNG": {".png"},
    "WEBP": {".webp"},
    "AVIF": {".avif"},
    "GIF": {".gif"},
    "BMP": {".bmp"},
    "TIFF": {".tif", ".tiff"},
}
#: Below this many images the scan runs in this process (a pool costs more than it saves).
_INLINE_BELOW = 48


def long_tail_histogram(counts: Sequence[int] | Any) -> dict[str, int]:
    """Landmarks per bin of images-per-landmark (:data:`LONG_TAIL_BINS`), e.g. ``{"1": 3, "2-5": 10, ...}``."""
    arr = np.asarray(list(counts), dtype=np.int64)
    out: dict[str, int] = {}
    for lo, hi in LONG_TAIL_BINS:
        name = str(lo) if hi == lo else f"{lo}+" if hi is None else f"{lo}-{hi}"
        upper = hi if hi is not None else np.iinfo(np.int64).max
        out[name] = int(((arr >= lo) & (arr <= upper)).sum())
    return out


@dataclass(frozen=True)
class FileResult:
    """What decoding one file gave: size, format and content hash, or the reason it is unreadable."""

    ok: bool
    reason: str = ""
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    sha256: str = ""
    n_bytes: int = 0


def check_file(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> FileResult:
    """Fully decode one file; never raises for a bad image (the reason is in the result)."""
    p = Path(path)
    try:
        data = p.read_bytes()
        if not data:
            raise OSError("empty")
    except OSError:
        try:  # let the decoder word the reason (missing file, folder, permission)
            decode_image(p, max_pixels=max_pixels)
            return FileResult(False, "cannot read file")
        except ImageDecodeError as e:
            return FileResult(False, e.reason)
    digest = hashlib.sha256(data).hexdigest()
    try:
        info = image_info(data, name=str(p), max_pixels=max_pixels)
        arr = decode_image(data, name=str(p), max_pixels=max_pixels)
    except ImageDecodeError as e:
        return FileResult(False, e.reason, sha256=digest, n_bytes=len(data))
    except Exception as e:  # a scan must survive any decoder failure
        return FileResult(
            False, f"decoder failure: {type(e).__name__}: {e}", sha256=digest, n_bytes=len(data)
        )
    h, w = arr.shape[:2]
    return FileResult(True, "", info.format, info.mode, int(w), int(h), digest, len(data))


def _check(args: tuple[str, int | None]) -> FileResult:
    return check_file(args[0], args[1])


def resolve_source(
    src: str | Path, image_dir: str | Path | None = None
) -> tuple[str, list[ImageRecord], int]:
    """What ``src`` is and its records: ``(kind, records, loose_files)``.

    ``kind``: ``gldv2_csv``, ``folder`` (folder per landmark), ``unlabelled`` (a folder of images) or
    ``list``. A folder holding ``train.csv`` (a GLDv2 or synthetic root) is read through that CSV.
    ``loose_files``: images directly in a folder-per-landmark root (not counted as any landmark).
    """
    src = Path(src)
    if not src.exists():
        raise LandmarksError(f"{src}: no such file or folder")
    if src.is_file():
        suffix = src.suffix.lower()
        if suffix == ".csv":
            return "gldv2_csv", load_gldv2_csv(src, image_dir), 0
        if suffix in (".txt", ".lst", ".list"):
            return "list", load_list_file(src), 0
        raise LandmarksError(f"{src}: expected a GLDv2 CSV, a list file (.txt) or a folder")
    for name in ("train.csv", "train_clean.csv"):
        if (src / name).is_file():
            logger.info("scan: %s holds %s; scanning the images it lists", src, name)
            return "gldv2_csv", load_gldv2_csv(src / name, image_dir), 0
    has_subfolder_images = any(
        d.is_dir() and not d.name.startswith(".") and any(is_image_file(p) for p in d.rglob("*"))
        for d in src.iterdir()
    )
    if has_subfolder_images:
        loose = sum(1 for p in src.iterdir() if is_image_file(p))
        return "folder", load_folder_collection(src), loose
    return "unlabelled", load_image_folder(src), 0


def scan(
    src: str | Path,
    *,
    workers: int | None = None,
    skipped: str | Path | None = None,
    image_dir: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_groups: int = 100,
    progress: bool = True,
) -> dict[str, Any]:
    """Scan a collection; returns the report (a JSON-ready dict, see the module docstring).

    ``workers``: decoding processes (default: all CPUs; small collections are done in-process).
    ``skipped``: append every unreadable file to this ``skipped.csv``. ``max_groups``: duplicate
    groups listed in full (all are counted).
    """
    kind, records, loose = resolve_source(src, image_dir)
    n_workers = max(1, workers if workers is not None else cpu_count())
    args = [(str(r.path), max_pixels) for r in records]
    results: list[FileResult] = []
    bar = Progress(len(records), "scan", "img", disable=not progress)
    if n_workers == 1 or len(records) < _INLINE_BELOW:
        for a in args:
            results.append(_check(a))
            bar.update(1)
    else:
        chunk = max(1, min(32, len(args) // (n_workers * 8)))
        with mp.get_context("spawn").Pool(n_workers) as pool:
            for res in pool.imap(_check, args, chunksize=chunk):
                results.append(res)
                bar.update(1)
    bar.close()
    return build_report(str(src), kind, records, results, loose=loose, skipped=skipped, max_groups=max_groups)


def _summary(values: list[int]) -> dict[str, float | int | None]:
    if not values:
        return {"min": None, "median": None, "max": None}
    return {"min": int(min(values)), "median": float(np.median(values)), "max": int(max(values))}


def build_report(
    source: str,
    kind: str,
    records: Sequence[ImageRecord],
    results: Sequence[FileResult],
    *,
    loose: int = 0,
    skipped: str | Path | None = None,
    max_groups: int = 100,
) -> dict[str, Any]:
    """Assemble the report from per-file results (``results[i]`` belongs to ``records[i]``)."""
    ok = [(r, res) for r, res in zip(records, results) if res.ok]
    bad = [(r, res) for r, res in zip(records, results) if not res.ok]
    labelled = any(r.landmark is not None for r in records)
    report: dict[str, Any] = {
        "source": source,
        "kind": kind,
        "images": len(records),
        "readable": len(ok),
        "unreadable": len(bad),
    }
    if labelled:
        counts = Counter(r.landmark for r, _ in ok if r.landmark is not None)
        listed = Counter(r.landmark for r in records if r.landmark is not None)
        values = sorted(counts.values())
        report["landmarks"] = {
            "count": len(counts),
            "without_readable_images": sorted(set(listed) - set(counts)),
            "images_per_landmark": {
                **_summary(values),
                "mean": round(float(np.mean(values)), 3) if values else None,
            },
            "long_tail": long_tail_histogram(values),
            "share_le_5": round(float(np.mean(np.array(values) <= 5)), 4) if values else None,
            "share_le_10": round(float(np.mean(np.array(values) <= 10)), 4) if values else None,
            "largest": [[lm, n] for lm, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:10]],
        }
    else:
        report["landmarks"] = None
    if loose:
        report["ignored_loose_files"] = loose
    report["sizes"] = {
        "width": _summary([res.width for _, res in ok]),
        "height": _summary([res.height for _, res in ok]),
    }
    report["formats"] = dict(sorted(Counter(res.format for _, res in ok).items()))
    report["modes"] = dict(sorted(Counter(res.mode for _, res in ok).items()))
    mismatched = [
        r.id
        for r, res in ok
        if r.path.suffix.lower() not in _FORMAT_EXTENSIONS.get(res.format, set()) and r.path.suffix
    ]
    report["extension_mismatch"] = {"count": len(mismatched), "examples": mismatched[:10]}
    report["bytes"] = int(sum(res.n_bytes for _, res in ok))
    by_hash: dict[str, list[str]] = {}
    for r, res in zip(records, results):
        if res.sha256 and res.ok:
            by_hash.setdefault(res.sha256, []).append(r.id)
    groups = sorted((sorted(g) for g in by_hash.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))
    report["duplicates"] = {
        "groups": len(groups),
        "images": sum(len(g) for g in groups),
        "redundant": sum(len(g) - 1 for g in groups),
        "listed": groups[:max_groups],
    }
    report["unreadable_files"] = [{"id": r.id, "path": str(r.path), "reason": res.reason} for r, res in bad]
    if skipped is not None and bad:
        log = SkippedLog(skipped)
        for r, res in bad:
            log.add(r.path, res.reason)
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as readable text."""
    lines = [
        f"{report['source']} ({report['kind']}): {report['images']} images, {report['readable']} readable, "
        f"{report['unreadable']} unreadable"
    ]
    lm = report.get("landmarks")
    if lm:
        ipl = lm["images_per_landmark"]
        lines.append(
            f"landmarks: {lm['count']}; images per landmark min {ipl['min']}, median {ipl['median']:g}, "
            f"mean {ipl['mean']:g}, max {ipl['max']}"
        )
        if lm["share_le_5"] is not None:
            lines.append(
                f"  {lm['share_le_5']:.0%} of landmarks with <= 5 images, {lm['share_le_10']:.0%} with <= 10"
            )
        lines.append("  long tail (images per landmark: landmarks)")
        width = max([lm["long_tail"][k] for k in lm["long_tail"]] + [1])
        for k, v in lm["long_tail"].items():
            bar = "#" * round(40 * v / width)
            lines.append(f"    {k:>7}: {v:6d} {bar}")
        lines.append("  largest: " + ", ".join(f"{a} ({b})" for a, b in lm["largest"]))
        if lm["without_readable_images"]:
            lines.append(
                f"  landmarks with no readable image: {', '.join(lm['without_readable_images'][:20])}"
            )
    elif report["kind"] == "unlabelled":
        lines.append("landmarks: none (unlabelled images)")
    if report.get("ignored_loose_files"):
        lines.append(
            f"images directly in the root folder (no landmark, ignored): {report['ignored_loose_files']}"
        )
    w, h = report["sizes"]["width"], report["sizes"]["height"]
    if w["min"] is not None:
        lines.append(
            f"sizes: width min {w['min']} / median {w['median']:g} / max {w['max']}, "
            f"height min {h['min']} / median {h['median']:g} / max {h['max']}"
        )
    if report["formats"]:
        lines.append(
            "formats: "
            + ", ".join(f"{k} {v}" for k, v in report["formats"].items())
            + "; modes: "
            + ", ".join(f"{k} {v}" for k, v in report["modes"].items())
        )
    if report["extension_mismatch"]["count"]:
        lines.append(
            f"extension says another format: {report['extension_mismatch']['count']} "
            f"(e.g. {', '.join(report['extension_mismatch']['examples'][:3])})"
        )
    d = report["duplicates"]
    lines.append(f"duplicates: {d['groups']} groups of identical files, {d['redundant']} redundant copies")
    for g in d["listed"][:10]:
        lines.append("  " + " = ".join(g))
    if d["groups"] > 10:
        lines.append(f"  ... {d['groups'] - 10} more groups (see --json)")
    if report["unreadable_files"]:
        lines.append(f"unreadable files: {len(report['unreadable_files'])}")
        for item in report["unreadable_files"]:
            lines.append(f"  {item['path']}: {item['reason']}")
    else:
        lines.append("unreadable files: none")
    return "\n".join(lines)
