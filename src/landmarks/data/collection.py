"""Image collections: GLDv2 CSVs and layout, folder-per-landmark trees, query folders and lists.

Every stage works on lists of :class:`ImageRecord` ``(id, path, landmark)``. Landmark ids and image
ids are strings without whitespace (GLDv2's landmark ids are digits). For folder trees the image id is
the relative path without extension, ``/`` kept; characters that cannot appear in a Kaggle CSV cell
(whitespace, ``,``, ``%``) are percent-encoded, which is reversible (:func:`id_to_relpath`).
"""

from __future__ import annotations

import csv
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from landmarks.errors import DataFormatError, LandmarksError

#: File name endings listed as images when walking folders (decoding itself goes by content).
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".webp",
    ".avif",
    ".gif",
    ".bmp",
    ".tif",
    ".tiff",
    ".mpo",
)
#: GLDv2 split folders, by CSV name prefix.
GLDV2_SPLITS = ("train", "index", "test")
_SAFE = "/-_.~+=@:()[]!$&'*;"


@dataclass(frozen=True)
class ImageRecord:
    """One image: a unique ``id``, where it is, and its landmark (None for unlabelled images)."""

    id: str
    path: Path
    landmark: str | None = None


def encode_id(text: str) -> str:
    """Make a string safe as a Kaggle id (no whitespace, commas or ``%``); reversible by :func:`decode_id`."""
    return quote(text, safe=_SAFE)


def decode_id(text: str) -> str:
    """Inverse of :func:`encode_id`."""
    return unquote(text)


def id_to_relpath(image_id: str) -> str:
    """The relative path (without extension) that a folder-collection image id stands for."""
    return decode_id(image_id)


def gldv2_image_path(root: str | Path, split: str, image_id: str, ext: str = ".jpg") -> Path:
    """``<root>/<split>/<id[0]>/<id[1]>/<id[2]>/<id>.jpg``, the GLDv2 layout."""
    if len(image_id) < 3:
        raise DataFormatError(f"GLDv2 image id {image_id!r} is shorter than 3 characters")
    return Path(root) / split / image_id[0] / image_id[1] / image_id[2] / f"{image_id}{ext}"


def is_image_file(path: Path) -> bool:
    """True for a visible file whose name ends like an image (or that has no extension)."""
    return (
        path.is_file()
        and not path.name.startswith(".")
        and (path.suffix.lower() in IMAGE_EXTENSIONS or path.suffix == "")
    )


def read_text_file(path: str | Path) -> str:
    """The text of a UTF-8 file (a BOM is dropped); a missing or non-UTF-8 file raises one clear error."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LandmarksError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise DataFormatError(
            f"{path}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} at offset {e.start})"
        ) from None
    except OSError as e:
        raise LandmarksError(f"{path}: cannot read: {e.strerror or e}") from None


def _not_utf8(path: Path, e: UnicodeDecodeError) -> DataFormatError:
    return DataFormatError(f"{path}: not UTF-8 text (invalid byte 0x{e.object[e.start]:02x} in the file)")


def _split_of(csv_path: Path) -> str:
    stem = csv_path.stem.lower()
    for split in GLDV2_SPLITS:
        if stem.startswith(split):
            return split
    return stem


def _check_token(value: str, what: str, where: str) -> str:
    value = value.strip()
    if not value or any(c.isspace() for c in value):
        raise DataFormatError(f"{where}: {what} {value!r} is empty or contains whitespace")
    return value


def load_gldv2_csv(csv_path: str | Path, image_dir: str | Path | None = None) -> list[ImageRecord]:
    """Read a GLDv2 CSV into records.

    - ``train.csv`` (``id,url,landmark_id``): labelled images;
    - ``train_clean.csv`` (``landmark_id,images``, space-separated ids): labelled images;
    - ``index.csv`` / ``test.csv`` (``id[,url]``): unlabelled images.

    Images are looked up at ``<image_dir>/<a>/<b>/<c>/<id>.jpg``; ``image_dir`` defaults to the folder
    named after the CSV's split (``train/``, ``index/``, ``test/``) beside the CSV.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise LandmarksError(f"{csv_path}: no such CSV file")
    split = _split_of(csv_path)
    root = Path(image_dir) if image_dir is not None else csv_path.parent / split
    records: list[ImageRecord] = []
    seen: set[str] = set()
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            _read_gldv2_rows(csv_path, csv.reader(f), root, records, seen)
    except UnicodeDecodeError as e:
        raise _not_utf8(csv_path, e) from None
    except csv.Error as e:
        raise DataFormatError(f"{csv_path}: malformed CSV: {e}") from None
    return records


def _read_gldv2_rows(
    csv_path: Path, reader: Any, root: Path, records: list[ImageRecord], seen: set[str]
) -> None:
    header = next(reader, None)
    if header is None:
        raise DataFormatError(f"{csv_path}: empty file (no header)")
    cols = [h.strip() for h in header]

    def add(image_id: str, landmark: str | None, line: int) -> None:
        image_id = _check_token(image_id, "image id", f"{csv_path}:{line}")
        if image_id in seen:
            raise DataFormatError(f"{csv_path}:{line}: image id {image_id!r} appears twice")
        seen.add(image_id)
        records.append(ImageRecord(image_id, gldv2_image_path(root.parent, root.name, image_id), landmark))

    if "images" in cols and "landmark_id" in cols:
        li, ii = cols.index("landmark_id"), cols.index("images")
        for n, row in enumerate(reader, start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) <= max(li, ii):
                raise DataFormatError(f"{csv_path}:{n}: expected {len(cols)} columns, got {len(row)}")
            lm = _check_token(row[li], "landmark id", f"{csv_path}:{n}")
            for image_id in row[ii].split():
                add(image_id, lm, n)
    elif "id" in cols:
        idi = cols.index("id")
        lj = cols.index("landmark_id") if "landmark_id" in cols else None
        for n, row in enumerate(reader, start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < len(cols):
                raise DataFormatError(f"{csv_path}:{n}: expected {len(cols)} columns, got {len(row)}")
            label = _check_token(row[lj], "landmark id", f"{csv_path}:{n}") if lj is not None else None
            add(row[idi], label, n)
    else:
        raise DataFormatError(
            f"{csv_path}: header {cols} has neither an 'id' column nor 'landmark_id,images'"
        )


def _walk_images(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if is_image_file(p) and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def _ids_for(paths: Sequence[Path], root: Path, *, stem_only: bool = False) -> list[str]:
    """Unique ids: the relative path without extension (or the stem), the extension kept on collisions."""
    keys = [p.stem if stem_only else p.relative_to(root).with_suffix("").as_posix() for p in paths]
    counts = Counter(keys)
    if stem_only and any(c > 1 for c in counts.values()):
        return _ids_for(paths, root, stem_only=False)
    out = []
    for p, k in zip(paths, keys):
        if counts[k] > 1:
            k = p.relative_to(root).as_posix() if not stem_only else p.name
        out.append(encode_id(k))
    return out


def load_folder_collection(root: str | Path) -> list[ImageRecord]:
    """Read ``<root>/<landmark>/<image>`` (images may sit in sub-folders of the landmark folder).

    The landmark id is the (encoded) name of the first-level folder; files directly in ``root`` are
    ignored. Raises when ``root`` holds no landmark folder with an image.
    """
    root = Path(root)
    if not root.is_dir():
        raise LandmarksError(f"{root}: no such folder")
    paths = [p for p in _walk_images(root) if len(p.relative_to(root).parts) >= 2]
    if not paths:
        raise LandmarksError(
            f"{root}: no images found in landmark sub-folders (expected <root>/<landmark>/<image>)"
        )
    ids = _ids_for(paths, root)
    return [ImageRecord(i, p, encode_id(p.relative_to(root).parts[0])) for i, p in zip(ids, paths)]


def load_image_folder(root: str | Path) -> list[ImageRecord]:
    """Unlabelled images anywhere below ``root``; id = file name without extension (relative path on clashes)."""
    root = Path(root)
    paths = _walk_images(root)
    return [ImageRecord(i, p, None) for i, p in zip(_ids_for(paths, root, stem_only=True), paths)]


def load_list_file(list_path: str | Path) -> list[ImageRecord]:
    """A text file with one image path per line (relative to the file's folder; ``#`` comments, blanks skipped).

    An optional second whitespace-separated column is the landmark id.
    """
    list_path = Path(list_path)
    base = list_path.parent
    records = []
    seen: Counter[str] = Counter()
    for n, line in enumerate(read_text_file(list_path).splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = (
            line.rsplit(None, 1)
            if "\t" in line or (" " in line and not Path(base / line).exists())
            else [line]
        )
        p = Path(parts[0])
        p = p if p.is_absolute() else base / p
        lm = _check_token(parts[1], "landmark id", f"{list_path}:{n}") if len(parts) > 1 else None
        image_id = encode_id(p.stem)
        seen[image_id] += 1
        if seen[image_id] > 1:
            image_id = f"{image_id}~{seen[image_id] - 1}"
        records.append(ImageRecord(image_id, p, lm))
    return records


def load_collection(src: str | Path, image_dir: str | Path | None = None) -> list[ImageRecord]:
    """A labelled collection: a GLDv2 CSV (images beside it) or a folder-per-landmark tree."""
    src = Path(src)
    if src.suffix.lower() == ".csv":
        records = load_gldv2_csv(src, image_dir)
    elif src.is_dir():
        records = load_folder_collection(src)
    elif src.suffix.lower() in (".txt", ".lst", ".list"):
        records = load_list_file(src)
    else:
        raise LandmarksError(f"{src}: expected a GLDv2 CSV, a list file or a folder-per-landmark collection")
    return records


def load_images(sources: Iterable[str | Path], image_dir: str | Path | None = None) -> list[ImageRecord]:
    """Unlabelled inputs (queries, non-landmark sets): image files, folders, list files or GLDv2 CSVs.

    Ids: the CSV's ids; for files and folders the file name without extension (relative path on clashes).
    Raises on duplicate ids across sources.
    """
    records: list[ImageRecord] = []
    for src in sources:
        src = Path(src)
        if src.is_dir():
            records.extend(load_image_folder(src))
        elif src.suffix.lower() == ".csv":
            records.extend(load_gldv2_csv(src, image_dir))
        elif src.suffix.lower() in (".txt", ".lst", ".list"):
            records.extend(load_list_file(src))
        elif src.exists():
            records.append(ImageRecord(encode_id(src.stem), src, None))
        else:
            raise LandmarksError(f"{src}: no such file or folder")
    dup = [k for k, c in Counter(r.id for r in records).items() if c > 1]
    if dup:
        raise LandmarksError(f"duplicate image ids across inputs: {', '.join(dup[:5])}")
    return records


# --- subset selection -------------------------------------------------------------------------------


def landmark_counts(records: Iterable[ImageRecord]) -> Counter[str]:
    """Images per landmark."""
    return Counter(r.landmark for r in records if r.landmark is not None)


def select_min_images(records: Sequence[ImageRecord], min_images: int) -> list[ImageRecord]:
    """Keep the landmarks with at least ``min_images`` images."""
    counts = landmark_counts(records)
    return [r for r in records if r.landmark is not None and counts[r.landmark] >= min_images]


def select_top_landmarks(records: Sequence[ImageRecord], k: int) -> list[ImageRecord]:
    """Keep the ``k`` landmarks with most images (ties broken by landmark id)."""
    counts = landmark_counts(records)
    keep = {lm for lm, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]}
    return [r for r in records if r.landmark in keep]


def select_fraction(records: Sequence[ImageRecord], fraction: float, seed: int = 0) -> list[ImageRecord]:
    """A random ``fraction`` of the images (order kept), seeded."""
    if not 0 < fraction <= 1:
        raise LandmarksError(f"fraction must be in (0, 1], got {fraction}")
    rng = random.Random(seed)
    n = round(len(records) * fraction)
    keep = set(rng.sample(range(len(records)), n))
    return [r for i, r in enumerate(records) if i in keep]


def stratified_split(
    records: Sequence[ImageRecord], val_fraction: float, seed: int = 0, min_train: int = 1
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split by landmark: about ``val_fraction`` of each landmark's images go to validation.

    Each landmark keeps at least ``min_train`` training images, so a landmark with one image is never
    validated. Returns ``(train, val)``, each in the input order.
    """
    rng = random.Random(seed)
    by_lm: dict[str | None, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_lm[r.landmark].append(i)
    val_idx: set[int] = set()
    for lm in sorted(by_lm, key=str):
        idx = by_lm[lm]
        n_val = min(round(len(idx) * val_fraction), len(idx) - min_train)
        if lm is None or n_val <= 0:
            continue
        val_idx.update(rng.sample(idx, n_val))
    train = [r for i, r in enumerate(records) if i not in val_idx]
    val = [r for i, r in enumerate(records) if i in val_idx]
    return train, val
