"""Helpers shared by the index verbs (``index``, ``add``, ``remove``, ``recognize``)."""

from __future__ import annotations

import argparse
import os


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--workers``, ``--device``."""
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers decoding images (default: CPUs - 1, at most 8; 0: none)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the forward pass (default on CPU: cores minus decoding workers, "
                             "so decoding and the forward pass do not fight over cores)")


def add_wait_argument(parser: argparse.ArgumentParser) -> None:
    """``--wait SECONDS``: how long a writer waits for another writer of the same index."""
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="when another process is writing the index, wait up to this long for it "
                             "(default 0: refuse at once)")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` (``cuda:LOCAL_RANK`` under torchrun) when available, else ``cpu``."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return device


def setup_threads(device: str, threads: int | None, workers: int | None) -> int:
    """Set torch's thread count for a CPU forward pass next to ``workers`` decoding processes; returns it."""
    import torch

    from landmarks.utils.seed import default_num_workers

    if threads is None:
        if not device.startswith("cpu"):
            return torch.get_num_threads()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        n_workers = default_num_workers() if workers is None else workers
        threads = max(1, cores - n_workers)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` from the torchrun environment (``(0, 1)`` outside it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
