"""Start method for DataLoader worker processes.

Forking a process whose OpenMP (torch) or OpenCV thread pools have run can deadlock the child the
first time it touches those pools (seen here: a worker hung in ``cv2.setNumThreads`` after SIFT had
run in the parent). Workers are therefore started from a *forkserver*: a clean single-threaded process
that has imported the heavy modules once, so workers start fast and never inherit running pools.
"""

from __future__ import annotations

import multiprocessing as mp
from multiprocessing.context import BaseContext

_PRELOAD = ["numpy", "torch", "cv2", "PIL.Image", "landmarks.data.decode", "landmarks.data.transforms"]


def worker_context() -> BaseContext | None:
    """The multiprocessing context for DataLoader workers (forkserver where the platform has it)."""
    if "forkserver" not in mp.get_all_start_methods():
        return None  # Windows / macOS default (spawn) is already safe
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx
