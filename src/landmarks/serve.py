"""Recognition over HTTP: a FastAPI app around a loaded :class:`~landmarks.recognize.Recognizer`.

The app is a thin shell: it reads a bounded upload, decodes it with :func:`landmarks.data.decode.decode_image`
(pixel limit on), runs ``recognizer.recognize([image])`` in a bounded worker pool and returns JSON.

Endpoints (OpenAPI at ``/openapi.json``, interactive docs at ``/docs``):

- ``GET /`` a page to try it (``landmarks/static/index.html``).
- ``GET /healthz`` liveness; answered on the event loop, never waits for a worker.
- ``POST /v1/recognize`` a multipart ``file`` field, or the raw image bytes with an ``image/*`` (or
  ``application/octet-stream``) Content-Type; answers ``{"landmark", "confidence", "is_landmark",
  "neighbours": [{"id", "landmark", "score", "inliers"}], "timings_ms"}``.
- ``POST /v1/matches?neighbour=ID`` the same upload; a PNG of the local-feature inlier matches
  between it and index image ``ID`` (501 when the local-feature modules are not available).
- ``GET /v1/index`` size, landmarks, model.
- ``POST /v1/index/images`` add labelled images (multipart ``files`` + ``landmark``); needs
  ``Authorization: Bearer <token>`` and is off (403) when the server was started without a token.
- ``GET /v1/thumbnail/{id}`` a small JPEG of an index image; only ids the index has returned (or that
  were added through the service) are served, and the path is never taken from the request.

Errors are JSON ``{"detail": reason, "status": code}``: 413 upload too large (enforced while the body is
read, and before reading when Content-Length says so), 415 not an image / unsupported Content-Type,
400 corrupt, truncated, empty, too many pixels or too many JPEG scans, 408 body not received within
``body_timeout_s``, 409 an add would relabel an indexed image, 503 all workers and queue slots busy, too
many upload bytes in flight or another process writing the index (with ``Retry-After``), 504 the request
took longer than ``timeout_s``. Bad input never answers 500; an unexpected exception is logged with its
traceback and answered as a JSON 500. A client that disconnects mid-upload is one 499 log line.

Thread model: decoding and recognition run in a ``ThreadPoolExecutor`` of ``workers`` threads with at
most ``queue_size`` more requests waiting; the event loop only reads bodies and writes answers, so
``/healthz`` stays responsive while every worker is busy. Uploads to ``/v1/recognize`` are decoded
first, in ``decode_processes`` child processes (:class:`~landmarks.data.decode_pool.DecoderPool`,
default ``workers + 2``) waited on by their own threads, and only then take a recognition worker: a
decode still running at the request's deadline is killed, and slow decodes never hold recognition
workers (recognition itself is bounded by the model's input size). Recognition calls share a read lock; swapping in a newer index
takes the write lock, so a request sees one index, never a mix.

The index on disk is the truth: before answering or writing, the service checks the index's generation
(one ``stat`` of meta.json) and swaps in a newer one written by another process (``landmarks add``,
``remove``). An HTTP add runs :func:`landmarks.maintenance.add_to_index` under the folder's writer lock,
from the committed index, then swaps the result in.

Connections (uvicorn + :func:`guarded_h11`): request headers must arrive within ``header_timeout_s``,
bodies within ``body_timeout_s``, idle keep-alive connections close after ``keep_alive_s``, at most
``max_connections`` are open and ``max_inflight_upload_mb`` of bodies are held at once. Log lines escape
control characters (a ``%0a`` in a path cannot forge a line).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import math
import os
import signal
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from landmarks import __version__
from landmarks.data.collection import ImageRecord
from landmarks.data.decode import decode_image, image_info, open_image
from landmarks.data.decode_pool import DecoderPool, DecodeTimeoutError
from landmarks.errors import ImageDecodeError, ImageTooLargeError, LandmarksError
from landmarks.maintenance import IndexBusyError, IndexConflictError
from landmarks.utils.dist import cpu_count

if TYPE_CHECKING:
    from landmarks.recognize import RecognizerInfo

log = logging.getLogger("landmarks")

T = TypeVar("T")

#: Environment variable read by ``landmarks serve`` when ``--token`` is not given.
TOKEN_ENV = "LANDMARKS_SERVE_TOKEN"
#: Raw-body Content-Types accepted besides ``image/*``.
RAW_CONTENT_TYPES = ("application/octet-stream",)


# --------------------------------------------------------------------------------------------------
# What the service needs from a recognizer (exactly the contract's methods)
# --------------------------------------------------------------------------------------------------


class NeighbourLike(Protocol):
    """One index image returned for a query (``landmarks.recognize.Neighbour``)."""

    @property
    def id(self) -> str: ...
    @property
    def landmark(self) -> str: ...
    @property
    def score(self) -> float: ...
    @property
    def inliers(self) -> int | None: ...
    @property
    def path(self) -> str | None: ...


class RecognitionLike(Protocol):
    """The answer for one query (``landmarks.recognize.Recognition``)."""

    @property
    def landmark(self) -> str | None: ...
    @property
    def confidence(self) -> float: ...
    @property
    def is_landmark(self) -> bool: ...
    @property
    def neighbours(self) -> Sequence[NeighbourLike]: ...
    @property
    def timings_ms(self) -> Mapping[str, float]: ...


class AddResultLike(Protocol):
    """What an add returns (``landmarks.maintenance.AddResult``)."""

    @property
    def added(self) -> list[str]: ...
    @property
    def known(self) -> list[str]: ...
    @property
    def index(self) -> Any: ...


class RecognizerProtocol(Protocol):
    """The methods of ``landmarks.recognize.Recognizer`` the service calls; tests pass a fake."""

    def recognize(
        self, images: Sequence[np.ndarray], ids: Sequence[str] | None = None
    ) -> Sequence[RecognitionLike]:
        """Recognize ``(H, W, 3)`` uint8 RGB images; one answer per image, in order."""
        ...

    def add(
        self,
        records: Sequence[ImageRecord],
        *,
        num_workers: int | None = None,
        wait_s: float = 0.0,
        command: str = "add",
        swap: bool = True,
        show_progress: bool = True,
    ) -> AddResultLike:
        """Add labelled images to the index on disk under its writer lock; ``swap=False``: do not use it yet.

        Raises ``IndexConflictError`` (an id indexed under another landmark) or ``IndexBusyError``.
        """
        ...

    def pair_verification(self, query: np.ndarray, image_id: str, image: np.ndarray) -> tuple[Any, Any, Any]:
        """``(query features, image features, Verification)`` of a query and index image ``image_id``
        (decoded: ``image``), as re-ranking verifies them."""
        ...

    def load_newer(self) -> Any:
        """The committed index when it is newer than the one in memory, else None (changes nothing)."""
        ...

    def replace_index(self, index: Any) -> bool:
        """Use ``index`` from now on when it is newer (the service calls this under its write lock)."""
        ...

    def info(self) -> RecognizerInfo:
        """The index's :class:`~landmarks.index.IndexInfo`, the recognition settings, OOD availability."""
        ...


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class ServeConfig:
    """Settings of the HTTP service (``landmarks serve`` flags map onto these)."""

    host: str = "127.0.0.1"  # interface to listen on; 0.0.0.0 exposes the service to the network
    port: int = 8000  # TCP port; 0 picks a free one (the URL is logged at start-up)
    workers: int = 2  # recognition threads; each runs one request at a time
    queue_size: int = 16  # requests allowed to wait for a free worker; more are answered 503
    max_upload_mb: float = 10.0  # largest body of /v1/recognize and /v1/matches (413 beyond)
    max_add_upload_mb: float = 100.0  # largest body of POST /v1/index/images (413 beyond)
    max_add_files: int = 64  # most images in one POST /v1/index/images
    max_pixels: int = 40_000_000  # decoded width x height limit; larger images (and bombs) are 400
    decode_min_side_px: int | None = (
        None  # JPEGs may be decoded shrunk (DCT scaling) down to this shorter side; None: full size
    )
    timeout_s: float = 30.0  # limit on one recognize/matches request, queueing included (504 beyond)
    add_timeout_s: float = 600.0  # limit on one POST /v1/index/images (504 beyond; the add may still finish)
    token: str | None = None  # bearer token guarding POST /v1/index/images; None: adding is off (403)
    upload_dir: str | None = None  # folder where images added over HTTP are stored; None: adding is off
    index_dir: str | None = None  # the index folder; relative neighbour paths are resolved against it
    rerank: Literal["none", "local"] = (
        "none"  # local re-ranking of the shortlist (applied when the recognizer is loaded)
    )
    thumbnail_px: int = 256  # longest side of the neighbour thumbnails
    match_side_px: int = 800  # match drawings: both images are shrunk to this longest side first
    max_known_ids: int = 200_000  # index ids remembered (id -> image path) for thumbnails and match drawings
    graceful_timeout_s: float = 10.0  # on SIGINT/SIGTERM, how long in-flight requests may finish
    decode_processes: int | None = (
        None  # killable processes decoding uploads (None: workers + 2; 0: decode in the worker threads)
    )
    max_jpeg_scans: int = 100  # JPEGs with more scans are 400 (progressive-decoding bombs; libjpeg writes 10)
    header_timeout_s: float = 10.0  # a connection must send a request's headers within this (else closed)
    body_timeout_s: float = 30.0  # a request body must arrive within this (else 408 and closed)
    keep_alive_s: float = 5.0  # an idle keep-alive connection is closed after this
    max_connections: int = 256  # open connections at most; more are closed at once (requests beyond: 503)
    max_inflight_upload_mb: float = (
        256.0  # request bodies held in memory at once, all requests together (503 beyond)
    )
    lock_wait_s: float = 30.0  # an HTTP add waits this long for another writer of the index (then 503)


# --------------------------------------------------------------------------------------------------
# JSON shapes (OpenAPI schemas)
# --------------------------------------------------------------------------------------------------


class NeighbourOut(BaseModel):
    """One index image near the query."""

    id: str = Field(description="index image id (also the thumbnail key)")
    landmark: str = Field(description="its landmark")
    score: float = Field(description="similarity to the query (cosine, or the re-ranked score)")
    inliers: int | None = Field(description="geometrically verified local matches; null when not verified")


class RecognizeOut(BaseModel):
    """The answer for one photo."""

    landmark: str | None = Field(description="the recognised landmark, or null for no landmark")
    confidence: float = Field(description="score of the answer (higher is surer)")
    is_landmark: bool = Field(description="false when the photo is judged to show no indexed landmark")
    neighbours: list[NeighbourOut]
    timings_ms: dict[str, float] = Field(description="recognizer stages plus decode, queue and server_total")


class ErrorOut(BaseModel):
    """Every error answer."""

    detail: str = Field(description="what was wrong, in words")
    status: int


class HealthOut(BaseModel):
    """Liveness and worker-pool load."""

    status: str
    version: str
    uptime_s: float
    workers: int
    running: int
    queued: int
    capacity: int


class IndexOut(BaseModel):
    """What is being served."""

    size: int = Field(description="images in the index")
    landmarks: int = Field(description="distinct landmarks in the index")
    model: str = Field(description="model name, or its fingerprint when it has no name")
    generation: int = Field(description="committed generation of the index (grows with every add/remove)")
    adding_enabled: bool
    details: dict[str, Any] = Field(description="everything Recognizer.info() reports")


class AddOut(BaseModel):
    """Result of adding images."""

    added: int
    ids: list[str]
    landmark: str


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in [
        (400, "corrupt, truncated, empty or too large image; malformed request"),
        (408, "the request body did not arrive in time"),
        (413, "upload larger than the limit"),
        (415, "not an image, or unsupported Content-Type"),
        (503, "all workers busy and the queue full; retry later"),
        (504, "took longer than the per-request timeout"),
    ]
}

_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

_ADD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "landmark": {"type": "string", "description": "landmark id (no whitespace)"},
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    },
                    "required": ["landmark", "files"],
                }
            }
        },
    }
}


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer: HTTP ``status`` and a ``reason`` in words (sent as ``detail``)."""

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = dict(headers or {})


def decode_error_status(err: ImageDecodeError) -> int:
    """HTTP status for a decode failure: 415 when the bytes are no supported image, else 400."""
    if isinstance(err, ImageTooLargeError):
        return 400
    return 415 if err.reason.startswith("not a recognised image") else 400


class WorkerPool:
    """A ``ThreadPoolExecutor`` that refuses work beyond ``workers + queue_size`` unfinished jobs.

    A job counts from submission until its function returns (a timed-out job still running keeps its
    slot), so the number of threads busy or waiting is bounded whatever the clients do.
    """

    def __init__(self, workers: int, queue_size: int):
        if workers < 1:
            raise LandmarksError(f"workers must be >= 1, got {workers}")
        if queue_size < 0:
            raise LandmarksError(f"queue_size must be >= 0, got {queue_size}")
        self.workers = workers
        self.capacity = workers + queue_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="landmarks-serve")
        self._lock = threading.Lock()
        self._pending = 0

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T] | None:
        """Schedule ``fn(*args)``; None when the pool is full."""
        with self._lock:
            if self._pending >= self.capacity:
                return None
            self._pending += 1
        try:
            fut = self._executor.submit(fn, *args)
        except RuntimeError:  # shut down
            self._release(None)
            return None
        fut.add_done_callback(self._release)
        return fut

    def _release(self, _fut: Future[Any] | None) -> None:
        with self._lock:
            self._pending -= 1

    def stats(self) -> dict[str, int]:
        """``workers``, ``running``, ``queued`` and ``capacity`` right now."""
        with self._lock:
            pending = self._pending
        return {
            "workers": self.workers,
            "running": min(pending, self.workers),
            "queued": max(0, pending - self.workers),
            "capacity": self.capacity,
        }

    def shutdown(self) -> None:
        """Cancel queued jobs; running ones finish in their threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Hold the lock shared."""
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    def wait_for_writers(self, n: int, timeout_s: float) -> bool:
        """Block until at least ``n`` writers wait for the lock (True), or ``timeout_s`` passes (False)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._writers_waiting >= n, timeout=timeout_s)

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Hold the lock exclusively."""
        with self._cond:
            self._writers_waiting += 1
            self._cond.notify_all()  # wakes wait_for_writers
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class PathBook:
    """Bounded id -> image path map of the index images the service has seen (LRU)."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._paths: OrderedDict[str, Path] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, image_id: str, path: Path) -> None:
        """Remember where image ``image_id`` is."""
        with self._lock:
            self._paths[image_id] = path
            self._paths.move_to_end(image_id)
            while len(self._paths) > self.capacity:
                self._paths.popitem(last=False)

    def get(self, image_id: str) -> Path | None:
        """The path of ``image_id``, or None when the service has not seen it."""
        with self._lock:
            path = self._paths.get(image_id)
            if path is not None:
                self._paths.move_to_end(image_id)
            return path


def _finite(x: Any, default: float = 0.0) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return default
    return v if math.isfinite(v) else default


def recognition_to_json(
    rec: RecognitionLike, extra_timings: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """The JSON answer for one recognition (non-finite numbers become 0)."""
    timings = {str(k): round(_finite(v), 3) for k, v in dict(rec.timings_ms or {}).items()}
    for k, v in (extra_timings or {}).items():
        timings[k] = round(_finite(v), 3)
    return {
        "landmark": None if rec.landmark is None else str(rec.landmark),
        "confidence": _finite(rec.confidence),
        "is_landmark": bool(rec.is_landmark),
        "neighbours": [
            {
                "id": str(n.id),
                "landmark": str(n.landmark),
                "score": _finite(n.score),
                "inliers": None if n.inliers is None else int(n.inliers),
            }
            for n in rec.neighbours
        ],
        "timings_ms": timings,
    }


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


class UploadBudget:
    """Bytes of request bodies held in memory, all requests together, bounded (503 beyond)."""

    def __init__(self, limit_bytes: int):
        self.limit = max(1, limit_bytes)
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes; False (nothing reserved) when that would exceed the limit."""
        with self._lock:
            if self.used + n > self.limit:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        """Release ``n`` reserved bytes."""
        with self._lock:
            self.used -= n


class ClientGone(Exception):
    """The client closed the connection before its request was read (logged as one quiet 499 line)."""


async def read_body(
    request: Request, limit_bytes: int, budget: UploadBudget | None = None, timeout_s: float | None = None
) -> bytes:
    """The request body, refusing (413) more than ``limit_bytes``: first by the declared
    Content-Length, then while reading, so at most ``limit_bytes`` plus one chunk is ever held.

    ``budget``: the bytes held by all requests together (503 when exhausted); released when the
    request ends. ``timeout_s``: the whole body must arrive within it (408 otherwise: slow senders).
    """
    declared = request.headers.get("content-length")
    too_big = f"upload too large: the limit is {limit_bytes} bytes ({limit_bytes / 2**20:.1f} MiB)"
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise ApiError(400, f"invalid Content-Length header {declared[:40]!r}") from None
        if n > limit_bytes:
            raise ApiError(413, f"{too_big}, Content-Length says {n}", {"Connection": "close"})
    buf = bytearray()
    held = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                if budget is not None:
                    if not budget.take(len(chunk)):
                        raise ApiError(
                            503,
                            "busy: too many uploads in flight; retry shortly",
                            {"Retry-After": "1", "Connection": "close"},
                        )
                    held += len(chunk)
                buf += chunk
                if len(buf) > limit_bytes:
                    raise ApiError(413, too_big, {"Connection": "close"})
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {timeout_s:g} s", {"Connection": "close"}
        ) from None
    except ClientDisconnect:
        raise ClientGone() from None
    finally:
        if budget is not None and held:
            budget.give(held)
    return bytes(buf)


async def _replay(data: bytes) -> AsyncGenerator[bytes, None]:
    yield data


async def parse_multipart(
    request: Request, body: bytes, max_files: int
) -> list[tuple[str, str | UploadFile]]:
    """Parse a multipart/form-data ``body`` already read (and size-checked) into (name, value) items."""
    parser = MultiPartParser(
        Headers(raw=request.headers.raw), _replay(body), max_files=max_files, max_fields=16
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ApiError(400, f"malformed multipart body: {e.message}") from None
    return list(form.multi_items())


async def read_image_upload(
    request: Request, limit_bytes: int, budget: UploadBudget | None = None, timeout_s: float | None = None
) -> tuple[bytes, str]:
    """The image bytes and a name for them, from a multipart ``file`` field or a raw image body."""
    media = _media_type(request)
    if media == "multipart/form-data":
        body = await read_body(request, limit_bytes, budget, timeout_s)
        items = await parse_multipart(request, body, max_files=1)
        for name, value in items:
            if name == "file":
                if not isinstance(value, UploadFile):
                    raise ApiError(400, "the multipart 'file' field must be a file part (with a filename)")
                data = await value.read()
                await value.close()
                return data, _clean_name(value.filename) or "upload"
        raise ApiError(400, "multipart body has no 'file' field")
    if media and not (media.startswith("image/") or media in RAW_CONTENT_TYPES):
        raise ApiError(
            415,
            f"unsupported Content-Type {media!r}: send multipart/form-data with a 'file' "
            "field, or the raw image bytes with an image/* Content-Type",
        )
    body = await read_body(request, limit_bytes, budget, timeout_s)
    return body, "upload"


def _clean_name(name: str | None) -> str:
    """A file name safe for logs and ids (basename, printable, bounded)."""
    if not name:
        return ""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c if c.isprintable() and not c.isspace() else "_" for c in base)[:120]


def _check_landmark(value: str) -> str:
    value = value.strip()
    if not value or len(value) > 200 or any(c.isspace() or not c.isprintable() for c in value):
        raise ApiError(400, f"landmark {value[:50]!r} must be 1-200 printable characters without whitespace")
    return value


def _printable(text: str, limit: int = 300) -> str:
    """``text`` safe for one log line: control and non-printable characters escaped (``\\n``, ``\\x1b``), bounded."""
    out = text if text.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[:limit] + "..."


def _static_page() -> str:
    return resources.files("landmarks").joinpath("static/index.html").read_text(encoding="utf-8")


class _AccessLog:
    """Pure ASGI middleware: one log line per request (DEBUG for success), security headers."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = [0]

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            code = status[0] or 500  # 0: an exception escaped, the error middleware answers 500
            level = logging.DEBUG if 0 < code < 400 else logging.INFO if code < 500 else logging.ERROR
            log.log(
                level,
                "%s %s %d %.1fms",
                _printable(str(scope.get("method"))),
                _printable(str(scope.get("path"))),
                code,
                1000 * (time.perf_counter() - t0),
            )


# --------------------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------------------


class _Service:
    """State shared by the endpoints of one app."""

    def __init__(self, recognizer: RecognizerProtocol, conf: ServeConfig):
        self.recognizer = recognizer
        self.conf = conf
        self.pool = WorkerPool(conf.workers, conf.queue_size)
        self.lock = ReadWriteLock()
        self.refresh_lock = threading.Lock()
        self.paths = PathBook(conf.max_known_ids)
        self.started = time.monotonic()
        self.thumbs: OrderedDict[str, bytes] = OrderedDict()
        self.thumbs_lock = threading.Lock()
        self.upload_limit = int(conf.max_upload_mb * 2**20)
        self.add_limit = int(conf.max_add_upload_mb * 2**20)
        self.uploads = UploadBudget(int(conf.max_inflight_upload_mb * 2**20))
        n_dec = conf.workers + 2 if conf.decode_processes is None else conf.decode_processes
        self.decoders: DecoderPool | None = None
        self.decode_waiters: WorkerPool | None = None  # threads that wait for decoder processes
        if n_dec > 0:
            self.decoders = DecoderPool(
                n_dec,
                max_pixels=conf.max_pixels,
                min_side_px=conf.decode_min_side_px,
                max_scans=conf.max_jpeg_scans,
            )
            self.decode_waiters = WorkerPool(n_dec, conf.queue_size)

    def close(self) -> None:
        """Stop the worker pools and the decoding processes."""
        self.pool.shutdown()
        if self.decode_waiters is not None:
            self.decode_waiters.shutdown()
        if self.decoders is not None:
            self.decoders.close()

    # -- helpers run in worker threads --------------------------------------------------------------

    def decode(self, data: bytes, name: str, deadline: float | None = None) -> np.ndarray:
        """Decode an upload (in a killable process when configured); any failure is the upload's fault (400/415)."""
        if self.decoders is not None:
            try:
                return self.decoders.decode(
                    data, name, deadline if deadline is not None else time.monotonic() + self.conf.timeout_s
                )
            except DecodeTimeoutError as e:
                raise ApiError(504, f"timed out: {e}") from None
        try:
            return decode_image(
                data,
                name=name,
                max_pixels=self.conf.max_pixels,
                min_side_px=self.conf.decode_min_side_px,
                max_scans=self.conf.max_jpeg_scans,
            )
        except ImageDecodeError:
            raise
        except MemoryError:
            raise ImageTooLargeError(name, "refused: out of memory while decoding") from None
        except Exception as e:  # a decoder bug on hostile bytes: log it, answer 400
            log.error("decoder failed on %s (%d bytes): %s", name, len(data), _printable(repr(e)))
            raise ImageDecodeError(name, f"cannot decode: {type(e).__name__}: {e}") from None

    def refresh(self) -> None:
        """Follow the index on disk: when another process committed a newer generation, swap it in.

        The new index is loaded without blocking requests, then swapped under the write lock, so a
        request sees the old or the new index, never a mix.
        """
        with self.refresh_lock:
            newer = self.recognizer.load_newer()
            if newer is None:
                return
            with self.lock.write():
                if self.recognizer.replace_index(newer):
                    log.info("reloaded the index from disk (generation %d)", int(newer.generation))

    def remember(self, rec: RecognitionLike) -> None:
        for n in rec.neighbours:
            if n.path:
                p = Path(n.path)
                if not p.is_absolute() and self.conf.index_dir:
                    p = Path(self.conf.index_dir) / p
                self.paths.put(str(n.id), p)

    async def predecode(self, data: bytes, name: str, deadline: float) -> tuple[np.ndarray | None, float]:
        """Decode an upload in a decoder process before it takes a recognition worker: ``(image, ms)``.

        A waiting thread of :attr:`decode_waiters` (not a recognition worker) waits for the process,
        so uploads that decode slowly (until killed at their deadline) never hold recognition workers.
        ``(None, 0)`` when decoding happens in the worker threads (``decode_processes=0``).
        """
        if self.decode_waiters is None:
            return None, 0.0
        t0 = time.perf_counter()
        img = await self.run(
            max(0.0, deadline - time.monotonic()), self.decode, data, name, deadline, pool=self.decode_waiters
        )
        return img, 1000 * (time.perf_counter() - t0)

    def recognize_job(
        self,
        data: bytes,
        name: str,
        submitted: float,
        deadline: float,
        img: np.ndarray | None = None,
        decode_ms: float = 0.0,
    ) -> dict[str, Any]:
        t0 = time.perf_counter()
        queue_ms = 1000 * (t0 - submitted)
        if img is None:
            img = self.decode(data, name, deadline)
        t1 = time.perf_counter()
        decode_ms += 1000 * (t1 - t0)
        if time.monotonic() >= deadline:
            raise ApiError(504, "timed out before recognition started")
        self.refresh()
        with self.lock.read():
            rec = self.recognizer.recognize([img], ids=[name])[0]
        self.remember(rec)
        return recognition_to_json(rec, {"decode": decode_ms, "queue": queue_ms})

    def matches_job(self, data: bytes, name: str, neighbour: str, deadline: float) -> tuple[bytes, int]:
        path = self.paths.get(neighbour)
        if path is None:
            raise ApiError(404, f"unknown neighbour id {neighbour!r} (only ids returned by this index)")
        try:
            from landmarks.viz import draw_verification
        except ImportError as e:
            raise ApiError(501, f"match drawing is not available in this build: {e}") from None
        query = self.decode(data, name, deadline)
        try:
            ref = decode_image(path, name=neighbour, max_pixels=self.conf.max_pixels)
        except ImageDecodeError as e:
            raise ApiError(404, f"index image {neighbour!r} cannot be read: {e.reason}") from None
        self.refresh()
        with self.lock.read():  # the verification re-ranking runs, on the index generation being served
            fa, fb, ver = self.recognizer.pair_verification(query, neighbour, ref)
        canvas = draw_verification(query, ref, fa, fb, ver, max_side_px=self.conf.match_side_px)
        return _png(canvas), int(ver.num_inliers)

    def add_job(self, files: list[tuple[str, bytes]], landmark: str, deadline: float) -> dict[str, Any]:
        upload_dir = Path(self.conf.upload_dir or ".")
        staged: list[tuple[str, Path, bytes]] = []
        for name, data in files:
            info = image_info(
                data, name=name, max_pixels=self.conf.max_pixels, max_scans=self.conf.max_jpeg_scans
            )
            self.decode(data, name, deadline)  # the whole image must decode, not only its header
            image_id = "http-" + hashlib.sha256(data).hexdigest()[:20]
            ext = {"JPEG": "jpg", "MPO": "jpg"}.get(info.format, info.format.lower())
            staged.append((image_id, upload_dir / f"{image_id}.{ext}", data))
        from landmarks.utils.io import atomic_write_bytes

        records = []
        for image_id, path, data in staged:
            if not path.exists():
                atomic_write_bytes(path, data)
            records.append(ImageRecord(id=image_id, path=path, landmark=landmark))
        try:
            # under the index's writer lock, from the committed index (never from this process's copy);
            # num_workers=0: forking a server full of threads can deadlock the child
            res = self.recognizer.add(
                records,
                num_workers=0,
                wait_s=self.conf.lock_wait_s,
                command=f"serve (PID {os.getpid()}): HTTP add",
                swap=False,
                show_progress=False,
            )
        except IndexConflictError as e:
            raise ApiError(409, str(e)) from None
        except IndexBusyError as e:
            raise ApiError(503, str(e), {"Retry-After": "5"}) from None
        with self.lock.write():
            self.recognizer.replace_index(res.index)
        for r in records:
            self.paths.put(r.id, r.path)
        log.info(
            "added %d image(s) of landmark %s over HTTP (%d already there)",
            len(res.added),
            landmark,
            len(res.known),
        )
        return {"added": len(res.added), "ids": [r.id for r in records], "landmark": landmark}

    def thumbnail(self, image_id: str) -> bytes:
        with self.thumbs_lock:
            cached = self.thumbs.get(image_id)
        if cached is not None:
            return cached
        path = self.paths.get(image_id)
        if path is None:
            raise ApiError(404, f"unknown image id {image_id!r}: only ids returned by this index are served")
        try:
            img = open_image(
                path, name=image_id, max_pixels=self.conf.max_pixels, min_side_px=self.conf.thumbnail_px
            )
        except ImageDecodeError as e:
            raise ApiError(404, f"index image {image_id!r} cannot be read: {e.reason}") from None
        img.thumbnail((self.conf.thumbnail_px, self.conf.thumbnail_px))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        out = buf.getvalue()
        with self.thumbs_lock:
            self.thumbs[image_id] = out
            while len(self.thumbs) > 512:
                self.thumbs.popitem(last=False)
        return out

    # -- scheduling ----------------------------------------------------------------------------------

    async def run(
        self, timeout_s: float, fn: Callable[..., T], *args: Any, pool: WorkerPool | None = None
    ) -> T:
        """Run ``fn(*args)`` in ``pool`` (default: the recognition workers): 503 when full, 504 after ``timeout_s``."""
        pool = pool or self.pool
        fut = pool.submit(fn, *args)
        if fut is None:
            raise ApiError(
                503,
                f"busy: all {pool.workers} workers and {self.conf.queue_size} queue slots "
                "are taken; retry shortly",
                {"Retry-After": "1"},
            )
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, f"timed out after {timeout_s:g} s") from None
        except ImageDecodeError as e:
            raise ApiError(decode_error_status(e), f"{e.source}: {e.reason}") from None
        except LandmarksError as e:  # the recognizer refusing this input
            raise ApiError(400, str(e)) from None


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _error(status: int, reason: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": reason, "status": status}, status_code=status, headers=dict(headers or {}))


def create_app(recognizer: RecognizerProtocol, conf: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``recognizer`` (already loaded) with settings ``conf``.

    The worker pool is created here and shut down when the app's lifespan ends.
    """
    conf = conf or ServeConfig()
    svc = _Service(recognizer, conf)
    page = _static_page()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = getattr(app.state, "url", None)
        if url:
            log.info("serving on %s (docs at %sdocs); Ctrl-C to stop", url, url)
        yield
        svc.close()
        log.info("stopped")

    app = FastAPI(
        title="landmarks",
        version=__version__,
        lifespan=lifespan,
        description="Landmark recognition over HTTP: which landmark is in this photo?",
    )
    app.state.service = svc
    app.add_middleware(_AccessLog)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.reason, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [
            "{}: {}".format(".".join(str(x) for x in e.get("loc", ())), e.get("msg")) for e in exc.errors()
        ]
        return _error(422, "invalid request: " + "; ".join(parts))

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> JSONResponse:
        return _error(499, "client closed the connection")  # nobody reads it; the access log says 499

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
        return _error(499, "client closed the connection")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("%s %s failed", request.method, _printable(request.url.path), exc_info=exc)
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index_page() -> HTMLResponse:
        return HTMLResponse(
            page,
            headers={
                "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; "
                "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'",
                "Cache-Control": "no-cache",
            },
        )

    @app.get("/healthz", response_model=HealthOut, tags=["service"])
    async def healthz() -> dict[str, Any]:
        """Liveness; answered without waiting for a worker."""
        return {
            "status": "ok",
            "version": __version__,
            "uptime_s": round(time.monotonic() - svc.started, 3),
            **svc.pool.stats(),
        }

    @app.post(
        "/v1/recognize",
        response_model=RecognizeOut,
        responses=_ERRORS,
        openapi_extra=_IMAGE_BODY,
        tags=["recognition"],
    )
    async def recognize(request: Request) -> dict[str, Any]:
        """Which landmark is in this photo? Send a multipart ``file`` or the raw image bytes."""
        t0 = time.perf_counter()
        data, name = await read_image_upload(request, svc.upload_limit, svc.uploads, conf.body_timeout_s)
        deadline = time.monotonic() + conf.timeout_s
        img, decode_ms = await svc.predecode(data, name, deadline)
        out = await svc.run(
            max(0.0, deadline - time.monotonic()),
            svc.recognize_job,
            data,
            name,
            time.perf_counter(),
            deadline,
            img,
            decode_ms,
        )
        out["timings_ms"]["server_total"] = round(1000 * (time.perf_counter() - t0), 3)
        return out

    @app.post(
        "/v1/matches",
        responses={
            **_ERRORS,
            200: {"content": {"image/png": {}}, "description": "the inlier matches drawn"},
            501: {"model": ErrorOut, "description": "not available"},
        },
        response_class=Response,
        openapi_extra=_IMAGE_BODY,
        tags=["recognition"],
    )
    async def matches(request: Request, neighbour: str) -> Response:
        """The local-feature inlier matches between the uploaded photo and index image ``neighbour`` (PNG)."""
        data, name = await read_image_upload(request, svc.upload_limit, svc.uploads, conf.body_timeout_s)
        png, inliers = await svc.run(
            conf.timeout_s, svc.matches_job, data, name, neighbour, time.monotonic() + conf.timeout_s
        )
        return Response(png, media_type="image/png", headers={"X-Inliers": str(inliers)})

    @app.get("/v1/index", response_model=IndexOut, tags=["index"])
    async def index_info() -> dict[str, Any]:
        """Index size, landmark count and model."""
        await svc.run(conf.timeout_s, svc.refresh)
        with svc.lock.read():  # not while an add is changing the index
            info = svc.recognizer.info()
        return {
            "size": info.index.size,
            "landmarks": info.index.landmarks,
            "model": info.index.model_name or info.index.model_fingerprint,
            "generation": info.index.generation,
            "adding_enabled": bool(conf.token and conf.upload_dir),
            "details": _jsonable(info.to_dict()),
        }

    @app.post(
        "/v1/index/images",
        response_model=AddOut,
        openapi_extra=_ADD_BODY,
        tags=["index"],
        responses={
            **_ERRORS,
            401: {"model": ErrorOut, "description": "missing or wrong bearer token"},
            403: {"model": ErrorOut, "description": "adding is off (no token at start-up)"},
            409: {"model": ErrorOut, "description": "an image is already indexed under another landmark"},
        },
    )
    async def add_images(request: Request) -> dict[str, Any]:
        """Add labelled images to the index (``Authorization: Bearer <token>``; multipart ``files`` + ``landmark``)."""
        if not conf.token:
            raise ApiError(403, f"adding images is disabled: start the server with --token or ${TOKEN_ENV}")
        if not conf.upload_dir:
            raise ApiError(403, "adding images is disabled: the server has no upload folder")
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), conf.token.encode()):
            raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        if _media_type(request) != "multipart/form-data":
            raise ApiError(415, "send multipart/form-data with 'landmark' and one or more 'files'")
        body = await read_body(request, svc.add_limit, svc.uploads, conf.body_timeout_s)
        items = await parse_multipart(request, body, max_files=conf.max_add_files)
        landmark = None
        files: list[tuple[str, bytes]] = []
        for key, value in items:
            if key == "landmark" and isinstance(value, str):
                landmark = _check_landmark(value)
            elif key in ("files", "file") and isinstance(value, UploadFile):
                files.append((_clean_name(value.filename) or f"file{len(files)}", await value.read()))
                await value.close()
        if landmark is None:
            raise ApiError(400, "missing the 'landmark' field")
        if not files:
            raise ApiError(400, "no 'files' in the request")
        return await svc.run(
            conf.add_timeout_s, svc.add_job, files, landmark, time.monotonic() + conf.timeout_s
        )

    @app.get(
        "/v1/thumbnail/{image_id:path}",
        response_class=Response,
        tags=["index"],
        responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorOut}},
    )
    def thumbnail(image_id: str) -> Response:
        """A small JPEG of index image ``image_id`` (one the index has returned or that was added here)."""
        return Response(
            svc.thumbnail(image_id), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"}
        )

    return app


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _finite(obj)
    return str(obj)


# --------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: any free port). Raises LandmarksError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP (not 0): asyncio only sets TCP_NODELAY on accepted sockets whose proto
    # says TCP, and without it Nagle + delayed ACKs add ~40 ms to every keep-alive response.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LandmarksError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def serve(recognizer: RecognizerProtocol, conf: ServeConfig, sock: socket.socket | None = None) -> None:
    """Serve ``recognizer`` with uvicorn until SIGINT/SIGTERM, then finish in-flight requests and return.

    ``sock``: a socket from :func:`bind_socket` (bind before a slow model load to fail fast when the
    port is taken); default: bind ``conf.host:conf.port`` now.
    """
    import uvicorn

    class _Server(uvicorn.Server):
        """uvicorn's server, but a handled SIGINT/SIGTERM ends ``serve`` normally (no re-raise)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return

            def handle(sig: int, frame: Any) -> None:
                log.info(
                    "received %s, shutting down (in-flight requests get %gs)",
                    signal.Signals(sig).name,
                    conf.graceful_timeout_s,
                )
                self.handle_exit(sig, frame)

            sigs = [signal.SIGINT, signal.SIGTERM]
            previous = {s: signal.signal(s, handle) for s in sigs}
            try:
                yield
            finally:
                for s, h in previous.items():
                    signal.signal(s, h)

    app = create_app(recognizer, conf)
    if app.state.service.decoders is not None:  # the decoders are ready before the first request
        app.state.service.decoders.start(wait_s=60.0)
    if sock is None:
        sock = bind_socket(conf.host, conf.port)
    port = sock.getsockname()[1]
    shown = f"[{conf.host}]" if ":" in conf.host else conf.host
    app.state.url = f"http://{shown}:{port}/"
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        server_header=False,
        ws="none",
        lifespan="on",
        timeout_graceful_shutdown=max(1, int(math.ceil(conf.graceful_timeout_s))),
        timeout_keep_alive=max(1, int(math.ceil(conf.keep_alive_s))),
        http=guarded_h11(conf),
        limit_concurrency=conf.max_connections,
        h11_max_incomplete_event_size=16 * 1024,
    )
    server = _Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        with contextlib.suppress(OSError):
            sock.close()


def guarded_h11(conf: ServeConfig) -> type[Any]:
    """uvicorn's h11 protocol with a header deadline and a connection cap (uvicorn has neither).

    - a connection must deliver each request's headers within ``conf.header_timeout_s`` of connecting
      (or of its previous response): idle, half-open and 1-byte-per-second clients are closed;
    - beyond ``conf.max_connections`` open connections a new one is closed at once.

    Body reads are bounded by :func:`read_body` (``conf.body_timeout_s``) and keep-alive idling by
    uvicorn's ``timeout_keep_alive``.
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > conf.max_connections:
                log.warning("refused a connection: %d open (--max-connections)", len(self.connections) - 1)
                transport.abort()
                return
            self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(conf.header_timeout_s, self._header_timeout)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # no (complete) request headers in time

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

    return GuardedH11


def default_workers() -> int:
    """Worker threads by default: 2, or 1 on a single-core machine."""
    return max(1, min(2, cpu_count()))
