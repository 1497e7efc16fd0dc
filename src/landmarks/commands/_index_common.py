"""Helpers shared by the index verbs (``index``, ``add``, ``remove``, ``recognize``)."""

from __future__ import annotations

import argparse

from landmarks.utils.dist import cpu_count, default_workers, dist_env, resolve_device

__all__ = ["add_extraction_arguments", "add_wait_argument", "rank_world", "resolve_device", "setup_threads"]


def add_extraction_arguments(parser: argparse.ArgumentParser) -> None:
    """``--batch-size``, ``--workers``, ``--device``."""
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers decoding images (default: CPUs - 1, at most 8; 0: none)",
    )
    parser.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of the forward pass (default on CPU: cores minus decoding workers, "
        "so decoding and the forward pass do not fight over cores)",
    )


def add_wait_argument(parser: argparse.ArgumentParser) -> None:
    """``--wait SECONDS``: how long a writer waits for another writer of the same index."""
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="when another process is writing the index, wait up to this long for it "
        "(default 0: refuse at once)",
    )


def setup_threads(device: str, threads: int | None, workers: int | None) -> int:
    """Set torch's thread count for a CPU forward pass next to ``workers`` decoding processes; returns it."""
    import torch

    if threads is None:
        if not device.startswith("cpu"):
            return torch.get_num_threads()
        cores = cpu_count()
        n_workers = default_workers() if workers is None else workers
        threads = max(1, cores - n_workers)
    torch.set_num_threads(max(1, threads))
    return torch.get_num_threads()


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` from the torchrun environment (``(0, 1)`` outside it)."""
    env = dist_env()
    return env.rank, env.world_size
