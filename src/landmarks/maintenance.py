"""Index maintenance: the one owner of an index folder's writes (meta, FAISS data and local features).

Every writer of an index folder (``landmarks index``, ``add``, ``remove``, the service's HTTP add) goes
through this module and holds the folder's **writer lock** while it works::

    with index_writer("index/", command="add"):      # fcntl.flock on index/.lock, one writer at a time
        ...

A second writer is refused at once with "index DIR is being written by PID N (command)", or waits up to
``wait_s`` seconds for the lock. The lock is advisory and per open file: it is released when its holder
exits, even by SIGKILL, so a killed writer never leaves the folder locked. Readers take no lock: an
index is committed by replacing ``meta.json`` atomically, so a reader sees the old or the new state.

The stages:

- :func:`add_to_index`: embed labelled images with the index's model, store their local features (when
  the index has some), append them, save. It always starts from the index **on disk** (loaded under the
  lock), never from a caller's in-memory copy, so concurrent writers cannot lose each other's images.
- :func:`remove_from_index`: remove images (by id, or all images of landmarks) and compact the
  local-feature store to the remaining images (a new ``local-NNNNNN`` folder named by the new meta.json).

Each commit increases the index's **generation** (:func:`index_generation`); a long-lived reader (the
service) compares it with the one it loaded and reloads when the disk is newer.

Local features of added images are extracted into a staging store (``work/add-local``) and then written
into the index's store as new chunks, which replace any older features of the same ids: re-adding an
id with another photo never keeps the old photo's features. The store folder a removal replaced is
deleted by the next writer (not at once), so a reader that opened it before the commit can finish.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from landmarks.data.collection import ImageRecord
from landmarks.errors import LandmarksError
from landmarks.utils.io import read_json

if TYPE_CHECKING:
    from landmarks.extract import Embedder
    from landmarks.index import LandmarkIndex

logger = logging.getLogger("landmarks")

#: The writer lock file inside an index folder (never deleted: deleting a lock file races its users).
LOCK_NAME = ".lock"
#: Images per chunk when local features are copied (merge after an add, compaction after a remove).
COPY_CHUNK = 512
_LOCAL_DIR_RE = re.compile(r"^local-(\d{6})$")


class IndexBusyError(LandmarksError):
    """Another process is writing the index folder (``holder``: its ``"PID command"`` line)."""

    def __init__(self, index_dir: str | Path, holder: str):
        self.index_dir = str(index_dir)
        self.holder = holder
        pid, _, command = holder.partition(" ")
        who = f"PID {pid} ({command})" if pid.isdigit() else "another process"
        super().__init__(
            f"index {index_dir} is being written by {who}; try again when it has finished "
            "(or pass --wait SECONDS)"
        )


class IndexConflictError(LandmarksError):
    """Images to add are already in the index under another landmark (relabelling is refused)."""

    def __init__(self, conflicts: Sequence[tuple[str, str | None, str | None]]):
        self.conflicts = list(conflicts)
        shown = ", ".join(f"{i} (indexed as {old}, given {new})" for i, old, new in self.conflicts[:5])
        super().__init__(
            f"{len(self.conflicts)} image(s) already indexed under another landmark: {shown}; "
            "remove them first to relabel"
        )


# --- the writer lock ---------------------------------------------------------------------------------


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        return os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    return ""


@contextlib.contextmanager
def index_writer(index_dir: str | Path, command: str, wait_s: float = 0.0) -> Iterator[Path]:
    """Hold the writer lock of ``index_dir`` (created when missing) for the ``with`` block.

    Args:
        command: what is writing (shown to a refused writer), e.g. ``"add"``, ``"serve: HTTP add"``.
        wait_s: how long to wait for a busy lock (0: refuse at once).

    Raises:
        IndexBusyError: the lock is still held after ``wait_s`` seconds.
    """
    index_dir = Path(index_dir)
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(index_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise LandmarksError(f"index {index_dir}: cannot open its lock file: {e.strerror or e}") from None
    try:
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise IndexBusyError(index_dir, _holder(fd)) from None
                time.sleep(min(0.05, left))  # polling a lock with a deadline (flock has no timeout)
        line = f"{os.getpid()} {command}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
        try:
            yield index_dir
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def index_generation(index_dir: str | Path) -> int:
    """The generation of the index committed in ``index_dir`` (its ``data-NNNNNN`` number; 0: none yet)."""
    meta_path = Path(index_dir) / "meta.json"
    try:
        meta = read_json(meta_path)
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as e:
        raise LandmarksError(f"{meta_path}: unreadable ({type(e).__name__}: {e})") from None
    from landmarks.index import generation_of

    return generation_of(meta)


# --- local features ------------------------------------------------------------------------------------


def _store_dir(index_dir: Path, meta: dict[str, Any]) -> Path:
    from landmarks.rerank import LOCAL_DIR

    return index_dir / str((meta.get("local") or {}).get("dir", LOCAL_DIR))


def _next_local_dir(index_dir: Path) -> str:
    used = [int(m.group(1)) for p in index_dir.iterdir() if (m := _LOCAL_DIR_RE.match(p.name))]
    return f"local-{max(used, default=0) + 1:06d}"


def remove_stale_local_dirs(index_dir: str | Path, meta: dict[str, Any]) -> list[str]:
    """Delete local-feature folders meta.json no longer names (left by earlier removals); call under the lock."""
    index_dir = Path(index_dir)
    current = (meta.get("local") or {}).get("dir")
    gone = []
    for p in index_dir.iterdir():
        if (
            p.is_dir()
            and p.name != current
            and (_LOCAL_DIR_RE.match(p.name) or (p.name == "local" and current))
        ):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
    return gone


def copy_local_features(src: Any, dst: Any, ids: Sequence[str]) -> int:
    """Copy the features of ``ids`` from store ``src`` into new chunks of store ``dst``; returns the count.

    Ids without features in ``src`` are stored empty (they verify with 0 inliers, as before).
    """
    from landmarks.local_features import LocalFeatures

    n = 0
    for s in range(0, len(ids), COPY_CHUNK):
        part = list(ids[s : s + COPY_CHUNK])
        feats = [f if f is not None else LocalFeatures.empty(dst.dim, (0, 0)) for f in src.get_many(part)]
        dst.write_chunk(part, feats)
        n += len(part)
    return n


def compact_local_features(index_dir: str | Path, meta: dict[str, Any], keep: Sequence[str]) -> str:
    """Write a new store holding only the features of ``keep`` (the index's ids); returns its folder name.

    The new folder is not used until meta.json names it (the caller saves the index with
    ``meta["local"]["dir"]`` set to the returned name).
    """
    from landmarks.local_features import LocalFeatureStore

    index_dir = Path(index_dir)
    old = LocalFeatureStore.open(_store_dir(index_dir, meta))
    name = _next_local_dir(index_dir)
    new = LocalFeatureStore.create(index_dir / name, old.dim, old.extractor)
    copy_local_features(old, new, [i for i in keep if old.has(i)])
    missing = [i for i in keep if not old.has(i)]
    if missing:
        logger.warning("%d indexed image(s) had no local features (e.g. %s)", len(missing), missing[0])
    return name


def _records_key(records: Sequence[ImageRecord], extra: Any) -> str:
    h = hashlib.sha1(json.dumps(extra, sort_keys=True, default=str).encode())
    for r in records:
        h.update(f"{r.id}\0{Path(r.path).absolute()}\n".encode())
    return h.hexdigest()


def _add_local_features(
    index_dir: Path,
    meta: dict[str, Any],
    embedder: Any,
    records: Sequence[ImageRecord],
    stage: Path,
    num_workers: int | None,
    show_progress: bool,
) -> None:
    """Extract the local features of ``records`` into a staging store, then write them into the index's store."""
    from landmarks.local_features import LocalFeatureStore
    from landmarks.rerank import extract_local_features, extractor_from_meta

    extractor = extractor_from_meta(meta["local"], embedder)
    key = _records_key(records, extractor.to_info())
    key_file = stage / "records.sha1"
    if stage.exists() and (not key_file.exists() or key_file.read_text().strip() != key):
        shutil.rmtree(stage)  # a killed add of other images: start over
    staged = LocalFeatureStore.create(stage, extractor.dim, extractor.to_info())
    key_file.write_text(key + "\n")
    extract_local_features(
        extractor,
        records,
        staged,
        skipped_csv=index_dir / "skipped.csv",
        num_workers=num_workers,
        show_progress=show_progress,
    )
    store = LocalFeatureStore.create(_store_dir(index_dir, meta), extractor.dim, extractor.to_info())
    copy_local_features(staged, store, [r.id for r in records])


# --- stages ----------------------------------------------------------------------------------------------


@dataclass
class AddResult:
    """What :func:`add_to_index` did."""

    added: list[str]  # ids appended to the index
    known: list[str]  # ids already indexed under the same landmark (left alone)
    skipped: list[tuple[str, str]]  # (path, reason) of unreadable images
    new_landmarks: int  # landmarks the index did not have before
    index: LandmarkIndex  # the index as committed (its generation is the one on disk)
    generation: int = 0  # the committed generation (unchanged when nothing was added)


@dataclass
class RemoveResult:
    """What :func:`remove_from_index` did."""

    removed: list[str]  # image ids removed
    missing: list[str] = field(default_factory=list)  # requested ids (or landmarks) not in the index
    index: LandmarkIndex | None = None  # the index as committed
    generation: int = 0  # the committed generation


def add_to_index(
    index_dir: str | Path,
    records: Sequence[ImageRecord],
    embedder: Embedder,
    *,
    batch_size: int = 32,
    num_workers: int | None = None,
    wait_s: float = 0.0,
    command: str = "add",
    show_progress: bool = True,
) -> AddResult:
    """Embed labelled ``records`` with the index's model and add them to the index in ``index_dir``.

    Holds the writer lock throughout and starts from the committed index on disk. Ids already indexed
    under the same landmark are left alone; an id indexed under another landmark is refused
    (:class:`IndexConflictError`: relabelling is remove + add). Unreadable images go to
    ``skipped.csv``. A killed add resumes from ``work/add`` when run again with the same images.

    Args:
        records: labelled images (ids unique, landmark ids without whitespace).
        embedder: the index's model (its fingerprint is checked).
        num_workers: decoding processes (None: CPUs - 1; 0: in this process, e.g. in a threaded server).
        wait_s: how long to wait for another writer (0: :class:`IndexBusyError` at once).

    Returns:
        :class:`AddResult` with the committed :class:`~landmarks.index.LandmarkIndex`.
    """
    from landmarks.calibrate import recalibrate
    from landmarks.extract import ExtractConfig, extract_resumable
    from landmarks.index import LandmarkIndex

    index_dir = Path(index_dir)
    unlabelled = [r.id for r in records if not r.landmark]
    if unlabelled:
        raise LandmarksError(f"images to add need a landmark id: {', '.join(unlabelled[:5])}")
    with index_writer(index_dir, command, wait_s):
        index = LandmarkIndex.load(index_dir)
        index.check_model(embedder.fingerprint, embedder.describe().get("name"))
        remove_stale_local_dirs(index_dir, index.meta)
        conflicts = [
            (r.id, index.landmarks[row], r.landmark)
            for r in records
            if (row := index.row_of(r.id)) is not None and index.landmarks[row] != r.landmark
        ]
        if conflicts:
            raise IndexConflictError(conflicts)
        known = [r.id for r in records if index.row_of(r.id) is not None]
        if known:
            logger.info("%d image(s) already in the index are left alone (e.g. %s)", len(known), known[0])
        todo = [r for r in records if index.row_of(r.id) is None]
        if not todo:
            return AddResult([], known, [], 0, index, index.generation)
        views = index.views
        conf = ExtractConfig(
            batch_size=batch_size,
            num_workers=num_workers,
            scales=tuple(views.get("scales", [1.0])),
            flip=bool(views.get("flip")),
        )
        work = index_dir / "work"
        res = extract_resumable(
            embedder,
            todo,
            work / "add",
            conf,
            skipped_csv=index_dir / "skipped.csv",
            desc="add",
            show_progress=show_progress,
        )
        recs = [todo[i] for i in res.rows]
        if index.meta.get("local") and recs:
            _add_local_features(
                index_dir, index.meta, embedder, recs, work / "add-local", num_workers, show_progress
            )
        before = index.num_landmarks
        index.add(
            res.embeddings,
            [r.id for r in recs],
            [str(r.landmark) for r in recs],
            [str(Path(r.path).absolute()) for r in recs],
        )
        recalibrate(index)  # new images and landmarks: the is_landmark threshold again, same targets
        index.save(index_dir)
        for p in (work / "add", work / "add-local"):
            shutil.rmtree(p, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.rmdir()
        return AddResult(
            [r.id for r in recs],
            known,
            list(res.skipped),
            index.num_landmarks - before,
            index,
            index.generation,
        )


def select_for_removal(
    index: LandmarkIndex, wanted: Sequence[str], *, landmarks: bool = False
) -> tuple[list[str], list[str]]:
    """``(image ids to remove, requested ids not in the index)``; with ``landmarks`` the requests are landmark ids."""
    if landmarks:
        known = set(index.landmarks)
        sel = set(wanted)
        return [i for i, lm in zip(index.ids, index.landmarks) if lm in sel], [
            lm for lm in wanted if lm not in known
        ]
    return [i for i in wanted if index.row_of(i) is not None], [i for i in wanted if index.row_of(i) is None]


def remove_from_index(
    index_dir: str | Path,
    wanted: Sequence[str],
    *,
    landmarks: bool = False,
    missing_ok: bool = False,
    wait_s: float = 0.0,
    command: str = "remove",
) -> RemoveResult:
    """Remove images (``wanted`` image ids, or with ``landmarks`` all images of those landmark ids).

    Holds the writer lock, starts from the committed index, removes the rows, compacts the local
    features to the remaining images and commits. Requested ids not in the index raise unless
    ``missing_ok``.
    """
    from landmarks.calibrate import recalibrate
    from landmarks.index import LandmarkIndex

    index_dir = Path(index_dir)
    with index_writer(index_dir, command, wait_s):
        index = LandmarkIndex.load(index_dir)
        remove_stale_local_dirs(index_dir, index.meta)
        ids, missing = select_for_removal(index, list(dict.fromkeys(wanted)), landmarks=landmarks)
        if missing and not missing_ok:
            what = "landmark" if landmarks else "image"
            raise LandmarksError(
                f"{len(missing)} {what} id(s) not in {index_dir}: {', '.join(missing[:10])} "
                "(pass --missing-ok to ignore them)"
            )
        if not ids:
            return RemoveResult([], missing, index, index.generation)
        index.remove(ids)
        if index.meta.get("local"):
            index.meta["local"] = {
                **index.meta["local"],
                "dir": compact_local_features(index_dir, index.meta, index.ids),
            }
        recalibrate(index)
        index.save(index_dir)
        return RemoveResult(ids, missing, index, index.generation)


def describe_holder(index_dir: str | Path) -> str | None:
    """The ``"PID command"`` of the process writing ``index_dir`` now, or None when nobody is."""
    path = Path(index_dir) / LOCK_NAME
    if not path.exists():
        return None
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fd) or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def command_line() -> str:
    """This process's command (``landmarks add INDEX SRC``), for the lock file."""
    return "landmarks " + " ".join(sys.argv[1:])[:200] if sys.argv else "landmarks"
