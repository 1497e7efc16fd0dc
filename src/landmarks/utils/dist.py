"""The process's place in the machine: the torchrun environment, the torch device, the CPU count.

One owner and one vocabulary for what used to be read in many places:

- :func:`dist_env` reads ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (set by ``torchrun``);
- :func:`resolve_device` turns the user's device (``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``)
  into a concrete torch device string (``"auto"`` is the only way to say "the best available");
- :func:`cpu_count` is the number of CPUs this process may run on (its affinity mask, not the machine's).

Pure reads: nothing here changes global state, and torch is imported only by :func:`resolve_device`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    """The torchrun environment of this process (a single process: rank 0 of 1)."""

    rank: int = 0  # global rank, 0 .. world_size - 1 (``RANK``)
    local_rank: int = 0  # rank on this machine: the GPU index to use (``LOCAL_RANK``)
    world_size: int = 1  # number of processes (``WORLD_SIZE``)

    @property
    def distributed(self) -> bool:
        """True under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that writes shared outputs and logs)."""
        return self.rank == 0


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The torchrun variables of ``environ`` (default ``os.environ``); absent ones take single-process values.

    Raises ``ValueError`` naming the variable when one is not an integer or out of range.
    """
    env = os.environ if environ is None else environ
    values: dict[str, int] = {}
    for key, default in (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)):
        raw = env.get(key)
        try:
            values[key] = default if raw is None or raw == "" else int(raw)
        except ValueError:
            raise ValueError(f"environment variable {key}={raw!r} is not an integer") from None
    out = DistEnv(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
    if out.world_size < 1 or not 0 <= out.rank < out.world_size or out.local_rank < 0:
        raise ValueError(
            f"inconsistent torchrun environment: RANK={out.rank} LOCAL_RANK={out.local_rank} "
            f"WORLD_SIZE={out.world_size}"
        )
    return out


def resolve_device(device: str | None = "auto", environ: Mapping[str, str] | None = None) -> str:
    """A concrete torch device string for ``device``.

    ``"auto"`` (or None) -> ``"cuda:LOCAL_RANK"`` (``cuda:0`` outside torchrun) when a GPU is
    available, else ``"cpu"``; a plain ``"cuda"`` under torchrun becomes ``"cuda:LOCAL_RANK"`` (one GPU
    per process). Anything else (``"cpu"``, ``"cuda:1"``, ``"mps"``) is returned as given.
    """
    dev = "auto" if device is None else str(device)
    env = os.environ if environ is None else environ
    if dev == "auto":
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{dist_env(env).local_rank}"
    if dev == "cuda" and "LOCAL_RANK" in env:
        dev = f"cuda:{dist_env(env).local_rank}"
    return dev


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_workers(limit: int = 8) -> int:
    """Worker processes by default: the CPUs minus one (the main process works too), in ``[0, limit]``."""
    return max(0, min(limit, cpu_count() - 1))
