"""Decoding untrusted uploads in child processes that can be killed: bounded time per image.

A Python thread cannot be interrupted while Pillow decodes, so a hostile image (a progressive JPEG with
thousands of scans, a decoder pathology) would hold a server's worker long after its request timed
out. :class:`DecoderPool` runs :func:`~landmarks.data.decode.decode_image` in ``processes`` spawned
child processes instead; a decode still running at its deadline has its process killed (SIGKILL) and
replaced, and the caller gets :class:`DecodeTimeoutError` at once::

    pool = DecoderPool(2, max_pixels=40_000_000)
    img = pool.decode(data, "upload.jpg", deadline=time.monotonic() + 30)   # (H, W, 3) uint8
    pool.close()

The pixels come back through a pipe (one copy, ~0.1 s for 40 MP). A caller waiting for a free process
waits at most until its deadline.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import queue
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from landmarks.data.decode import DEFAULT_MAX_JPEG_SCANS, DEFAULT_MAX_PIXELS
from landmarks.errors import ImageDecodeError, ImageTooLargeError, LandmarksError

logger = logging.getLogger("landmarks")


class DecodeTimeoutError(LandmarksError):
    """A decode did not finish before its deadline (its process was killed)."""


def _child(conn: Connection, max_pixels: int | None, min_side_px: int | None, max_scans: int | None) -> None:
    """Child process: decode requests ``(bytes, name)`` until the pipe closes."""
    import io

    from PIL import Image

    from landmarks.data.decode import decode_image

    warm = io.BytesIO()  # the first decode loads Pillow's plugins: do it before saying ready
    Image.new("RGB", (8, 8)).save(warm, "JPEG")
    decode_image(warm.getvalue())
    conn.send(("ready",))
    while True:
        try:
            data, name = conn.recv()
        except (EOFError, OSError):
            return
        try:
            arr = decode_image(
                data, name=name, max_pixels=max_pixels, min_side_px=min_side_px, max_scans=max_scans
            )
        except ImageTooLargeError as e:
            conn.send(("too_large", e.source, e.reason))
        except ImageDecodeError as e:
            conn.send(("error", e.source, e.reason))
        except MemoryError:
            conn.send(("too_large", name, "refused: out of memory while decoding"))
        except Exception as e:  # a decoder bug on hostile bytes: the upload's fault, never a crash
            conn.send(("error", name, f"cannot decode: {type(e).__name__}: {e}"))
        else:
            conn.send(("ok", arr.shape))
            conn.send_bytes(np.ascontiguousarray(arr).data.cast("B"))


class _Decoder:
    """One child process and the parent's end of its pipe."""

    def __init__(self, ctx: Any, args: tuple[Any, ...]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_child, args=(child, *args), daemon=True, name="landmarks-decode")
        self.proc.start()
        child.close()
        self.ready = False

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait for the child's "ready" (its imports done); False when it did not come in time."""
        if not self.ready and self.conn.poll(max(0.0, timeout_s)):
            self.ready = self.conn.recv() == ("ready",)
        return self.ready

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()


class DecoderPool:
    """``processes`` killable decoding processes (spawned; started on first use).

    Args:
        processes: child processes (at least 1); at most this many decodes run at once.
        max_pixels, min_side_px, max_scans: as :func:`~landmarks.data.decode.decode_image`.
    """

    def __init__(
        self,
        processes: int,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side_px: int | None = None,
        max_scans: int | None = DEFAULT_MAX_JPEG_SCANS,
    ):
        if processes < 1:
            raise LandmarksError(f"decoding processes must be >= 1, got {processes}")
        self.processes = processes
        self._args = (max_pixels, min_side_px, max_scans)
        self._ctx = multiprocessing.get_context("spawn")
        self._idle: queue.Queue[_Decoder] = queue.Queue()
        self._all: set[_Decoder] = set()
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self.killed = 0  # decodes stopped at their deadline (processes killed and replaced)

    def start(self, wait_s: float = 0.0) -> None:
        """Start the processes now (otherwise on the first decode); wait up to ``wait_s`` for them to be ready."""
        with self._lock:
            if not (self._started or self._closed):
                self._started = True
                for _ in range(self.processes):
                    self._spawn_locked()
            procs = list(self._all)
        end = time.monotonic() + wait_s
        for d in procs:
            with contextlib.suppress(EOFError, OSError):
                d.wait_ready(end - time.monotonic())

    def _spawn_locked(self) -> None:
        d = _Decoder(self._ctx, self._args)
        self._all.add(d)
        self._idle.put(d)

    def _replace(self, dead: _Decoder) -> None:
        dead.kill()
        with self._lock:
            self._all.discard(dead)
            if not self._closed:
                self._spawn_locked()

    def decode(self, data: bytes, name: str, deadline: float) -> np.ndarray:
        """Decode ``data`` in a child process: ``(H, W, 3)`` uint8 RGB.

        Args:
            deadline: a ``time.monotonic()`` time; past it the decode is killed.

        Raises:
            ImageDecodeError: (or ImageTooLargeError) bad image, as :func:`decode_image`.
            DecodeTimeoutError: no result before ``deadline``.
        """
        self.start()
        try:
            dec = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise DecodeTimeoutError(f"{name}: no decoding process became free before the deadline") from None
        healthy = False
        try:
            if not dec.proc.is_alive():
                raise ImageDecodeError(name, "the decoding process had died; try again")
            if not dec.wait_ready(deadline - time.monotonic()):
                raise DecodeTimeoutError(f"{name}: no decoding process became ready before the deadline")
            dec.conn.send((bytes(data), name))
            if not dec.conn.poll(max(0.0, deadline - time.monotonic())):
                self.killed += 1
                raise DecodeTimeoutError(f"{name}: decoding took longer than allowed (stopped)")
            status, *rest = dec.conn.recv()
            if status == "ok":
                shape = tuple(rest[0])
                buf = dec.conn.recv_bytes()
                healthy = True
                return np.frombuffer(buf, np.uint8).reshape(shape)
            healthy = True
            source, reason = rest
            raise (ImageTooLargeError if status == "too_large" else ImageDecodeError)(source, reason)
        except (EOFError, OSError, BrokenPipeError):
            raise ImageDecodeError(name, "the decoder crashed on this image") from None
        finally:
            if healthy:
                self._idle.put(dec)
            else:
                self._replace(dec)

    def close(self) -> None:
        """Kill every process (decodes in flight fail)."""
        with self._lock:
            self._closed = True
            procs, self._all = list(self._all), set()
        for d in procs:
            d.kill()
