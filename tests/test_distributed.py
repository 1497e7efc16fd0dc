"""``landmarks train`` under ``torchrun --nproc_per_node 2`` on CPU (gloo): training progresses and both
ranks end with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from landmarks.train import read_log

#: Runs inside each torchrun worker: the real CLI, plus a digest of the rank's final weights.
WORKER = r"""
import hashlib, json, os, sys
import torch
from landmarks import train as train_mod
from landmarks.cli import main

out = sys.argv[sys.argv.index("--out") + 1]
original = train_mod.Trainer.run

def run_and_digest(self):
    result = original(self)
    h = hashlib.sha256()
    state = self.net.state_dict()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    rank = os.environ["RANK"]
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"digest": h.hexdigest(), "steps": result.steps, "world": self.dist.world_size,
                   "threads": torch.get_num_threads()}, f)
    return result

train_mod.Trainer.run = run_and_digest
sys.exit(main(sys.argv[1:]))
"""


def make_shapes(root: Path, n_classes: int = 4, per_class: int = 10, size: int = 48) -> Path:
    """Coloured shapes, one landmark per folder."""
    rng = np.random.default_rng(1)
    for c in range(n_classes):
        d = root / f"lm{c}"
        d.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3).tolist()
        for i in range(per_class):
            img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            cx, cy = (int(v) for v in rng.integers(12, size - 12, 2))
            if c % 2:
                cv2.circle(img, (cx, cy), 10, colour, -1)
            else:
                cv2.rectangle(img, (cx - 9, cy - 9), (cx + 9, cy + 9), colour, -1)
            cv2.imwrite(str(d / f"{i}.png"), img)
    return root


def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    data = make_shapes(tmp_path / "data")
    out = tmp_path / "run"
    out.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        "-q",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--epochs",
        "3",
        "--batch-size",
        "8",
        "--image-size",
        "48",
        "--device",
        "cpu",
        "data.val_fraction=0.2",
        "optim.warmup_steps=1",
    ]
    try:
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:  # pragma: no cover - diagnostic
        pytest.fail(f"torchrun timed out: {e.stderr!r}"[-3000:])
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical weights on both ranks
    log = read_log(out)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    spe = 32 // 8  # 32 training images (val 20 %), global batch 8 split over 2 ranks
    assert ranks[0]["steps"] == ranks[1]["steps"] == log[-1]["step"] == 3 * spe
    assert log[-1]["train_loss"] < log[0]["train_loss"]  # training progresses
    assert "val_gap" in log[-1]
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.tmp"))
