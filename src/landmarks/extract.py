"""Global embeddings for lists of images, batched, to disk in chunks, resumable.

The stage is :func:`extract_embeddings`::

    embedder = load_embedder("runs/r50")                      # or any object of the Embedder protocol
    out = extract_embeddings(embedder, records, "work/", ExtractConfig(batch_size=64))
    out.embeddings   # (N, D) float32, L2-normalised, rows in the order of the records that decoded
    out.ids          # the N image ids; out.rows: their positions in ``records``; out.skipped: the rest

- Images are decoded (:func:`landmarks.data.decode.decode_image`, reduced-size JPEG decoding down to the
  model's input size) and preprocessed in DataLoader worker processes; the forward pass runs in
  ``torch.inference_mode`` on channels-last tensors.
- Optional multi-scale (each scale resizes the preprocessed ``(3, S, S)`` tensor, e.g.
  :data:`MULTISCALE` = 0.707 / 1 / 1.414) and horizontal flip: the embeddings of all views are summed
  and re-normalised.
- The records are cut into fixed chunks (``chunk_size`` images). Each finished chunk is written
  atomically as ``chunks/NNNNN.npy`` (float32 ``(n, D)``) followed by ``chunks/NNNNN.json`` (its ids,
  record rows and skipped images). A killed run started again with the same inputs skips every chunk
  whose ``.json`` exists, so at most one chunk per process is redone. ``manifest.json`` records the
  model fingerprint, the inputs' digest and the settings; a folder made with other ones is refused.
- Unreadable images are logged, listed in their chunk and in ``skipped.csv``; everything else is done.
- Under ``torchrun`` (``WORLD_SIZE`` > 1) rank r extracts the chunks ``c`` with ``c % world == r``
  into the same folder, all ranks meet at a barrier (gloo process group, created when none exists)
  and the merged result is returned on every rank (rank 0 writes ``skipped.csv``).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from landmarks.data.collection import ImageRecord
from landmarks.data.decode import DEFAULT_MAX_PIXELS, decode_image
from landmarks.data.transforms import Preprocess, normalize_batch, resize_square
from landmarks.errors import ImageDecodeError, IncompatibleArtifactError, LandmarksError
from landmarks.utils import precision
from landmarks.utils.dist import default_workers, dist_env
from landmarks.utils.io import SkippedLog, atomic_save, read_json, write_json
from landmarks.utils.progress import Progress

logger = logging.getLogger("landmarks")

#: The multi-scale preset: scale factors of the model's input size (GLR practice: 1/sqrt(2), 1, sqrt(2)).
MULTISCALE: tuple[float, ...] = (0.7071, 1.0, 1.4142)
#: Version of the chunk folder layout (bumped when it changes; older folders are refused).
CHUNKS_FORMAT = 1


@runtime_checkable
class Embedder(Protocol):
    """What extraction, the index and recognition need from a model.

    ``preprocessor`` is what DataLoader workers receive: a small picklable callable (sizes and
    mean/std, never the model: a model's hundreds of tensors would travel to every worker as file
    descriptors). ``embed`` runs in the main process and returns CPU tensors. :func:`load_embedder`
    adapts a trained run; tests use tiny ones.
    """

    @property
    def fingerprint(self) -> str:
        """Hex digest identifying the weights (an index built with one model refuses another)."""
        ...

    @property
    def embedding_dim(self) -> int:
        """D, the width of the embeddings."""
        ...

    @property
    def image_size(self) -> int:
        """S, the side of the square tensors ``preprocess`` returns (used for faster JPEG decoding)."""
        ...

    @property
    def preprocessor(self) -> Callable[[np.ndarray], torch.Tensor]:
        """Picklable ``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` float32 normalised tensor, holding no model."""
        ...

    def preprocess(self, img: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` float32 normalised tensor (= ``preprocessor(img)``)."""
        ...

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float32 (CPU, any H, W) -> ``(B, D)`` float32 CPU, L2-normalised rows."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-ready description saved in the index metadata (fingerprint, name, source, sizes)."""
        ...


class CheckpointEmbedder:
    """:class:`Embedder` over a trained run loaded by :func:`landmarks.checkpoint.load_model`.

    ``amp``: the forward pass's precision (:mod:`landmarks.utils.precision`): ``"auto"`` runs bf16 (or
    fp16) autocast on CUDA and fp32 on CPUs; ``"off"`` is fp32 everywhere. The embeddings are returned
    as float32 either way.
    """

    def __init__(
        self,
        loaded: Any,
        device: str | torch.device = "cpu",
        source: str | Path | None = None,
        amp: str = "auto",
    ):
        self.loaded = loaded
        self.device = torch.device(device)
        self.amp_dtype = precision.amp_dtype(amp, self.device, cpu_auto=False)
        self.model = loaded.model.to(self.device).eval()
        if self.device.type != "mps":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.source = str(source) if source is not None else None
        meta = dict(getattr(loaded, "meta", {}) or {})
        pre = meta.get("preprocessing", {}) or {}
        self._fingerprint = str(loaded.fingerprint)
        self._embedding_dim = int(loaded.model.embedding_dim)
        self._image_size = int(pre.get("image_size", 224))
        self._meta = meta

    @property
    def fingerprint(self) -> str:
        """Hex digest of the weights."""
        return self._fingerprint

    @property
    def embedding_dim(self) -> int:
        """Embedding width D."""
        return self._embedding_dim

    @property
    def image_size(self) -> int:
        """Input side S of the preprocessed tensors."""
        return self._image_size

    @property
    def preprocessor(self) -> Callable[[np.ndarray], torch.Tensor]:
        """The run's :class:`~landmarks.data.transforms.Preprocess` (image size, mean/std): picklable."""
        return self.loaded.preprocess

    def preprocess(self, img: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(3, S, S)`` float32 (the run's own preprocessing)."""
        return self.loaded.preprocess(img)

    def embed(self, batch: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` float32 -> ``(B, D)`` float32 CPU, L2-normalised."""
        with torch.inference_mode(), precision.autocast(self.device, self.amp_dtype):
            x = batch.to(self.device, non_blocking=True)
            out = self.model.embed(x)
        return out.float().cpu()

    def describe(self) -> dict[str, Any]:
        """Fingerprint, embedding size, input size, where the run was loaded from and its name/backbone."""
        meta = self._meta
        conf = meta.get("config", {}) if isinstance(meta.get("config"), dict) else {}
        model_conf = conf.get("model", {}) if isinstance(conf.get("model"), dict) else {}
        desc: dict[str, Any] = {
            "fingerprint": self.fingerprint,
            "embedding_dim": self.embedding_dim,
            "image_size": self.image_size,
            "source": self.source,
            "name": meta.get("name") or (Path(self.source).name if self.source else None),
        }
        for key in ("backbone", "name"):
            if key in model_conf:
                desc[f"model_{key}"] = model_conf[key]
        if "git_sha" in meta:
            desc["git_sha"] = meta["git_sha"]
        return desc


def embedder_device(embedder: Embedder) -> torch.device:
    """Where ``embedder`` computes: a :class:`CheckpointEmbedder`'s device; other embedders count as CPU ones
    (their batches stay in host memory)."""
    return embedder.device if isinstance(embedder, CheckpointEmbedder) else torch.device("cpu")


def load_embedder(run: str | Path, device: str | torch.device = "cpu", amp: str = "auto") -> Embedder:
    """Load a trained run (folder or checkpoint file) as an :class:`Embedder` on ``device``
    (``amp``: see :class:`CheckpointEmbedder`).

    Raises :class:`LandmarksError` when the checkpoint module is unavailable or the run cannot be read.
    """
    try:
        checkpoint = importlib.import_module("landmarks.checkpoint")
    except ImportError as e:  # pragma: no cover - only before the training module exists
        raise LandmarksError(f"cannot load model {run}: landmarks.checkpoint is not available ({e})") from e
    loaded = checkpoint.load_model(run, device=str(device))
    return CheckpointEmbedder(loaded, device=device, source=Path(run).absolute(), amp=amp)


@dataclass
class ExtractConfig:
    """Settings of a batched extraction."""

    # images per forward pass
    batch_size: int = 32
    # DataLoader worker processes that decode and preprocess (None: CPUs - 1, at most 8; 0: in-process)
    num_workers: int | None = None
    # scale factors applied to the preprocessed (3, S, S) tensor; embeddings of all scales are summed
    scales: tuple[float, ...] = (1.0,)
    # also embed the horizontally flipped images and add them
    flip: bool = False
    # images per chunk file: the unit of resumption (a killed run redoes at most one chunk per rank)
    chunk_size: int = 2048
    # run the forward pass on channels-last tensors
    channels_last: bool = True
    # refuse images with more pixels than this (decompression-bomb guard; None: no limit)
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise LandmarksError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_size < 1:
            raise LandmarksError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise LandmarksError(f"scales must be positive numbers, got {self.scales}")
        self.scales = tuple(float(s) for s in self.scales)

    def views(self) -> dict[str, Any]:
        """The settings that change the embeddings (saved with an index; queries must use the same)."""
        return {"scales": list(self.scales), "flip": bool(self.flip)}


@dataclass
class Extraction:
    """The merged result of an extraction."""

    ids: list[str]
    # (N, D) float32, L2-normalised, in record order
    embeddings: np.ndarray
    # (N,) int64: position of each embedded image in the input records
    rows: np.ndarray
    # (path, reason) of every image that could not be read
    skipped: list[tuple[str, str]] = field(default_factory=list)


# --- the forward pass -------------------------------------------------------------------------------


def embed_batch(
    embedder: Embedder,
    x: torch.Tensor,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    channels_last: bool = True,
) -> torch.Tensor:
    """Embed a preprocessed batch, optionally at several scales and flipped.

    Args:
        x: ``(B, 3, S, S)`` float32, preprocessed.
        scales: factors applied to ``S`` (bilinear, antialiased when shrinking).
        flip: add the embeddings of the horizontally flipped views.

    Returns:
        ``(B, D)`` float32 CPU, L2-normalised: the normalised sum of the views' embeddings.
    """
    total: torch.Tensor | None = None
    with torch.inference_mode():
        for s in scales:
            xs = x
            if s != 1.0:
                size = max(1, int(round(x.shape[-2] * s))), max(1, int(round(x.shape[-1] * s)))
                xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=s < 1.0)
            if flip:
                xs = torch.cat([xs, xs.flip(-1)], dim=0)
            if channels_last:
                xs = xs.contiguous(memory_format=torch.channels_last)
            e = embedder.embed(xs).float()
            if flip:
                e = e[: x.shape[0]] + e[x.shape[0] :]
            total = e if total is None else total + e
    assert total is not None
    return F.normalize(total, dim=1)


def embed_images(
    embedder: Embedder, images: Sequence[np.ndarray], conf: ExtractConfig | None = None
) -> np.ndarray:
    """Embed in-memory images (no workers, no files).

    Args:
        images: ``(H, W, 3)`` uint8 RGB arrays.

    Returns:
        ``(N, D)`` float32, L2-normalised.
    """
    conf = conf or ExtractConfig()
    out = np.zeros((len(images), embedder.embedding_dim), dtype=np.float32)
    for start in range(0, len(images), conf.batch_size):
        part = images[start : start + conf.batch_size]
        x = torch.stack([embedder.preprocess(img) for img in part])
        out[start : start + len(part)] = embed_batch(
            embedder, x, conf.scales, conf.flip, conf.channels_last
        ).numpy()
    return out


# --- decoding in workers ----------------------------------------------------------------------------


class _ImageDataset(Dataset):
    """Decodes and preprocesses record ``i``; returns ``(i, tensor or None, reason or None)``."""

    def __init__(
        self,
        records: Sequence[ImageRecord],
        preprocess: Callable[[np.ndarray], torch.Tensor],
        min_side_px: int | None,
        max_pixels: int | None,
    ):
        self.records = records
        self.preprocess = preprocess
        self.min_side_px = min_side_px
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None]:
        rec = self.records[i]
        try:
            img = decode_image(rec.path, min_side_px=self.min_side_px, max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            return i, None, e.reason
        except Exception as e:  # a decoder bug on one odd file must not stop a million-image run
            return i, None, f"cannot decode ({type(e).__name__}: {e})"
        try:
            return i, self.preprocess(img), None
        except (ValueError, RuntimeError, OSError) as e:
            return i, None, f"preprocessing failed: {type(e).__name__}: {e}"


@dataclass(frozen=True)
class SquareUint8:
    """The worker side of extraction on a GPU: ``(H, W, 3)`` uint8 -> the squashed ``(S, S, 3)`` uint8 tensor
    (:func:`~landmarks.data.transforms.resize_square`); the normalisation runs on the GPU. Picklable."""

    image_size: int  # S

    def __call__(self, img: np.ndarray) -> torch.Tensor:
        """``(H, W, 3)`` uint8 RGB -> ``(S, S, 3)`` uint8."""
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {img.shape} {img.dtype}")
        return torch.from_numpy(resize_square(img, self.image_size))


def batch_route(
    preprocessor: Callable[[np.ndarray], torch.Tensor], device: torch.device
) -> tuple[Callable[[np.ndarray], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """What decoding workers do to an image, and what the main process does to their batch before the model.

    On a GPU with a run's own :class:`~landmarks.data.transforms.Preprocess`, ``(S, S, 3)`` uint8 squares
    travel (4x fewer bytes than float32 through shared and pinned memory) and
    :func:`~landmarks.data.transforms.normalize_batch` makes the ``(B, 3, S, S)`` float32 channels-last
    batch on the GPU (the same numbers as ``Preprocess`` up to float rounding). Other preprocessors'
    float32 tensors are copied to the GPU as they are; on a CPU nothing changes.
    """
    if device.type == "cuda" and isinstance(preprocessor, Preprocess):
        pre = preprocessor
        return SquareUint8(pre.image_size), lambda x: normalize_batch(x, pre.mean, pre.std, device)
    if device.type == "cuda":
        return preprocessor, lambda x: x.to(device, non_blocking=True)
    return preprocessor, lambda x: x


def _collate(
    items: list[tuple[int, torch.Tensor | None, str | None]],
) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]]]:
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, str(reason)) for i, x, reason in items if x is None]
    x = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], x, bad


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:  # pragma: no cover
        pass


# --- chunks on disk ---------------------------------------------------------------------------------


def records_digest(records: Sequence[ImageRecord]) -> str:
    """SHA-1 of the records' ids and paths, in order: identifies the inputs of a chunk folder."""
    h = hashlib.sha1()
    for r in records:
        h.update(f"{r.id}\t{r.path}\n".encode())
    return h.hexdigest()


def _chunk_name(c: int) -> str:
    return f"{c:05d}"


def chunk_done(out_dir: Path, c: int) -> bool:
    """True when chunk ``c`` was written completely (its ``.json`` is written after its ``.npy``)."""
    return (out_dir / "chunks" / f"{_chunk_name(c)}.json").exists() and (
        out_dir / "chunks" / f"{_chunk_name(c)}.npy"
    ).exists()


def _write_chunk(
    out_dir: Path,
    c: int,
    rows: list[int],
    records: Sequence[ImageRecord],
    emb: np.ndarray,
    skipped: list[tuple[int, str]],
) -> None:
    chunks = out_dir / "chunks"
    atomic_save(chunks / f"{_chunk_name(c)}.npy", lambda p: np.save(p, emb.astype(np.float32)))
    write_json(
        chunks / f"{_chunk_name(c)}.json",
        {
            "chunk": c,
            "rows": rows,
            "ids": [records[i].id for i in rows],
            "skipped": [[str(records[i].path), reason] for i, reason in skipped],
        },
    )


def _dist_info() -> tuple[int, int]:
    env = dist_env()
    return env.rank, env.world_size


def _barrier() -> None:
    import torch.distributed as dist

    if not dist.is_available():
        raise LandmarksError("WORLD_SIZE > 1 but torch.distributed is not available")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=2))
    dist.barrier()


def finish_distributed() -> None:
    """Destroy the process group :func:`extract_embeddings` created under torchrun (no-op otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _manifest(embedder: Embedder, records: Sequence[ImageRecord], conf: ExtractConfig) -> dict[str, Any]:
    return {
        "format": CHUNKS_FORMAT,
        "fingerprint": embedder.fingerprint,
        "embedding_dim": int(embedder.embedding_dim),
        "num_records": len(records),
        "records_sha1": records_digest(records),
        "chunk_size": conf.chunk_size,
        **conf.views(),
    }


def _prepare(out_dir: Path, manifest: dict[str, Any], overwrite: bool) -> None:
    path = out_dir / "manifest.json"
    if overwrite and out_dir.exists():
        shutil.rmtree(out_dir)
    if path.exists():
        old = read_json(path)
        diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if diff:
            raise IncompatibleArtifactError(
                f"{out_dir} holds a partial extraction made with other inputs or settings (differs in: "
                f"{', '.join(diff)}); delete the folder or start over with overwrite"
            )
    else:
        write_json(path, manifest)


def read_chunks(out_dir: str | Path, num_chunks: int | None = None) -> Extraction:
    """Merge the chunks of a finished extraction, in chunk order (= record order)."""
    out_dir = Path(out_dir)
    if num_chunks is None:
        man = read_json(out_dir / "manifest.json")
        num_chunks = math.ceil(man["num_records"] / man["chunk_size"])
    ids: list[str] = []
    rows: list[int] = []
    embs: list[np.ndarray] = []
    skipped: list[tuple[str, str]] = []
    for c in range(num_chunks):
        if not chunk_done(out_dir, c):
            raise LandmarksError(f"{out_dir}: chunk {c} is missing; the extraction did not finish")
        info = read_json(out_dir / "chunks" / f"{_chunk_name(c)}.json")
        emb = np.load(out_dir / "chunks" / f"{_chunk_name(c)}.npy")
        if emb.shape[0] != len(info["ids"]):
            raise LandmarksError(
                f"{out_dir}: chunk {c} has {emb.shape[0]} embeddings for {len(info['ids'])} ids"
            )
        ids.extend(info["ids"])
        rows.extend(info["rows"])
        embs.append(emb)
        skipped.extend((p, r) for p, r in info["skipped"])
    dim = embs[0].shape[1] if embs else 0
    emb_all = np.concatenate(embs, axis=0) if embs else np.zeros((0, dim), np.float32)
    return Extraction(
        ids=ids,
        embeddings=np.ascontiguousarray(emb_all, dtype=np.float32),
        rows=np.asarray(rows, dtype=np.int64),
        skipped=skipped,
    )


def extract_embeddings(
    embedder: Embedder,
    records: Sequence[ImageRecord],
    out_dir: str | Path,
    conf: ExtractConfig | None = None,
    *,
    skipped_csv: str | Path | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
    desc: str = "embed",
) -> Extraction:
    """Embed ``records`` into chunk files under ``out_dir`` (resuming finished chunks) and merge them.

    Args:
        embedder: the model (see :class:`Embedder`).
        records: the images; their ids must be unique.
        out_dir: the chunk folder (``manifest.json``, ``chunks/``); created when missing.
        conf: batch size, workers, views, chunk size.
        skipped_csv: where unreadable images are listed (default ``out_dir/skipped.csv``).
        overwrite: start from scratch even when ``out_dir`` holds a partial run.

    Returns:
        The :class:`Extraction`: ``(N, D)`` float32 L2-normalised embeddings of the images that decoded.

    Raises:
        IncompatibleArtifactError: ``out_dir`` holds chunks made with another model, inputs or settings.
    """
    conf = conf or ExtractConfig()
    out_dir = Path(out_dir)
    rank, world = _dist_info()
    manifest = _manifest(embedder, records, conf)
    if world > 1:
        if rank == 0:
            _prepare(out_dir, manifest, overwrite)
        _barrier()
        if rank != 0:
            _prepare(out_dir, manifest, False)
    else:
        _prepare(out_dir, manifest, overwrite)
    num_chunks = math.ceil(len(records) / conf.chunk_size)
    mine = [c for c in range(num_chunks) if c % world == rank]
    todo = [c for c in mine if not chunk_done(out_dir, c)]
    done_images = sum(min(conf.chunk_size, len(records) - c * conf.chunk_size) for c in mine if c not in todo)
    if done_images:
        logger.info("%s: resuming, %d of %d chunks already done", out_dir, len(mine) - len(todo), len(mine))
    batches: list[list[int]] = []
    for c in todo:
        stop = min(len(records), (c + 1) * conf.chunk_size)
        for s in range(c * conf.chunk_size, stop, conf.batch_size):
            batches.append(list(range(s, min(stop, s + conf.batch_size))))
    if batches:
        with precision.cudnn_benchmark(embedder_device(embedder)):  # one input size: benchmark once
            _run_batches(
                embedder,
                records,
                out_dir,
                conf,
                batches,
                done_images,
                sum(min(conf.chunk_size, len(records) - c * conf.chunk_size) for c in mine),
                show_progress,
                desc,
            )
    if world > 1:
        _barrier()
    result = read_chunks(out_dir, num_chunks)
    if rank == 0 and result.skipped:
        log = SkippedLog(skipped_csv if skipped_csv is not None else out_dir / "skipped.csv")
        for path, reason in result.skipped:
            log.add(path, reason)
    return result


def extract_resumable(
    embedder: Embedder,
    records: Sequence[ImageRecord],
    work_dir: str | Path,
    conf: ExtractConfig | None = None,
    **kwargs: Any,
) -> Extraction:
    """:func:`extract_embeddings` into a private work folder: resumes a killed run on the same inputs and
    starts over (instead of refusing) when the folder holds chunks of other inputs or settings."""
    try:
        return extract_embeddings(embedder, records, work_dir, conf, **kwargs)
    except IncompatibleArtifactError as e:
        logger.info("starting over: %s", e)
        return extract_embeddings(embedder, records, work_dir, conf, overwrite=True, **kwargs)


def _run_batches(
    embedder: Embedder,
    records: Sequence[ImageRecord],
    out_dir: Path,
    conf: ExtractConfig,
    batches: list[list[int]],
    done_images: int,
    total_images: int,
    show_progress: bool,
    desc: str,
) -> None:
    workers = default_workers() if conf.num_workers is None else conf.num_workers
    # the workers get the preprocessor alone (sizes, mean/std), never the embedder and its model
    device = embedder_device(embedder)
    on_gpu = device.type == "cuda"
    worker_fn, to_model = batch_route(embedder.preprocessor, device)
    dataset = _ImageDataset(records, worker_fn, embedder.image_size, conf.max_pixels)
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs.update(worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=False)
        from landmarks.utils.workers import worker_context

        kwargs["multiprocessing_context"] = worker_context()
    # pinned host batches copy to the GPU asynchronously; the views (scales, flip, channels-last) are then
    # made on the GPU, not by the CPU
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=workers, collate_fn=_collate, pin_memory=on_gpu, **kwargs
    )
    bar = Progress(total_images, desc, "img", disable=not show_progress)
    bar.update(done_images)
    cur: int | None = None
    rows: list[int] = []
    embs: list[np.ndarray] = []
    bad: list[tuple[int, str]] = []
    n_skipped = 0

    def flush(c: int) -> None:
        emb = np.concatenate(embs, axis=0) if embs else np.zeros((0, embedder.embedding_dim), np.float32)
        _write_chunk(out_dir, c, rows, records, emb, bad)

    try:
        for batch_rows, x, errors in loader:
            first = (batch_rows or [i for i, _ in errors])[0]
            c = first // conf.chunk_size
            if cur is not None and c != cur:
                flush(cur)
                rows, embs, bad = [], [], []
            cur = c
            for i, reason in errors:
                logger.warning("skipped %s: %s", records[i].path, reason)
            bad.extend(errors)
            n_skipped += len(errors)
            if x is not None:
                x = to_model(x)
                e = embed_batch(embedder, x, conf.scales, conf.flip, conf.channels_last).numpy()
                embs.append(e)
                rows.extend(batch_rows)
            bar.update(len(batch_rows) + len(errors), skipped=n_skipped)
        if cur is not None:
            flush(cur)
    finally:
        bar.close()
