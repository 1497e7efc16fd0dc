"""The torchrun environment, device resolution and CPU count: one owner (landmarks.utils.dist)."""

from __future__ import annotations

import os

import pytest
import torch

from landmarks.utils.dist import DistEnv, cpu_count, default_workers, dist_env, resolve_device


def test_dist_env_reads_torchrun_variables() -> None:
    assert dist_env({}) == DistEnv(0, 0, 1) and not dist_env({}).distributed and dist_env({}).is_main
    env = dist_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (env.rank, env.local_rank, env.world_size) == (3, 1, 4) and env.distributed and not env.is_main
    with pytest.raises(ValueError, match="RANK='x'"):
        dist_env({"RANK": "x"})
    with pytest.raises(ValueError, match="inconsistent"):
        dist_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_resolve_device_one_vocabulary() -> None:
    gpu = torch.cuda.is_available()
    assert resolve_device("auto", {}) == ("cuda:0" if gpu else "cpu")
    assert resolve_device(None, {}) == resolve_device("auto", {})
    assert resolve_device("auto", {"LOCAL_RANK": "2"}) == ("cuda:2" if gpu else "cpu")
    assert resolve_device("cuda", {"LOCAL_RANK": "1"}) == "cuda:1"  # one GPU per torchrun process
    assert resolve_device("cuda", {}) == "cuda"
    assert resolve_device("cpu", {"LOCAL_RANK": "1"}) == "cpu" and resolve_device("cuda:3", {}) == "cuda:3"


def test_cpu_count_is_the_affinity_mask() -> None:
    want = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert cpu_count() == want
    assert default_workers(8) == max(0, min(8, want - 1)) and default_workers(0) == 0
