"""What a training run writes into its folder (see :mod:`landmarks.checkpoint` for the format).

:class:`RunWriter` is the one place that writes ``config.json``, ``model.safetensors`` + ``meta.json``,
the resumable ``train_state.safetensors``, ``log.jsonl`` and ``skipped.csv``, atomically, on rank 0
(on other ranks it writes nothing). :func:`run_meta` and :func:`training_state` build what is written
from the model, the optimizer and the schedule; they write nothing themselves.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from landmarks import checkpoint as ckpt
from landmarks.data.transforms import Preprocess
from landmarks.models.net import LandmarkNet
from landmarks.utils.io import SkippedLog, atomic_write, write_json


@dataclass
class Schedule:
    """The length of a run and its intervals (planned once, re-planned under a time budget)."""

    total: int = 0  # optimizer steps of the whole run (0: not planned yet)
    warmup: int = 0  # linear warm-up steps
    eval_every: int = 1  # validate every N epochs (and after the last one)
    replan_every: int = 0  # time budget: re-plan every N steps (0: never)


def run_meta(
    conf: dict[str, Any],
    net: LandmarkNet,
    classes: list[dict[str, Any]],
    preprocessing: Preprocess,
    *,
    name: str,
    data_source: str | None,
    epoch: int,
    step: int,
    metrics: dict[str, Any],
) -> dict[str, Any]:
    """The meta dict saved with the weights (``conf``: the resolved training config as a dict)."""
    h = conf["model"]["head"]
    local = None
    if net.has_local_head:
        rf, pad = net.local_receptive_field
        local = {
            "stride": net.local_stride,
            "receptive_field": [rf, pad],
            "dim": conf["model"]["local"]["dim"],
            "stage": net.backbone.local_module,
            "channels": net.backbone.local_channels,
        }
    return {
        "format": "landmarks-run",
        "name": name,
        "config": conf,
        "data": data_source,
        "num_classes": len(classes),
        "classes": classes,
        "embedding_dim": net.embedding_dim,
        "preprocessing": preprocessing.to_dict(),
        "margins": {
            "kind": h["kind"],
            "scale": h["scale"],
            "margin_rad": h["margin_rad"],
            "dynamic": h["dynamic_margins"],
            "a": h["margin_a"],
            "b": h["margin_b"],
            "subcenters": h["subcenters"],
            "class_weighted": h["class_weighted"],
        },
        "gem_p": float(net.pool.p.detach().float().cpu()[0]),
        "pretrained": net.backbone.pretrained_info,
        "local": local,
        "epoch": epoch,
        "step": step,
        "metrics": metrics,
        "versions": ckpt.library_versions(),
        **ckpt.git_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def training_state(
    conf: dict[str, Any],
    net: LandmarkNet,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    schedule: Schedule,
    *,
    step: int,
    epoch: int,
    elapsed_s: float,
    classes: list[dict[str, Any]],
    data_source: str | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors + JSON of everything ``--resume`` needs (model, optimizer, scaler, RNG, schedule, step)."""
    tensors = {f"model.{k}": v for k, v in ckpt.cpu_state_dict(net).items()}
    opt_t, opt_info = ckpt.optimizer_state(optimizer)
    rng_t, rng_info = ckpt.rng_state()
    tensors.update(opt_t)
    tensors.update(rng_t)
    state = {
        "step": step,
        "epoch": epoch,
        "total_steps": schedule.total,
        "warmup": schedule.warmup,
        "eval_every": schedule.eval_every,
        "replan_every": schedule.replan_every,
        "elapsed_s": elapsed_s,
        "config": conf,
        "data": data_source,
        "classes": classes,
        "optimizer": opt_info,
        "scaler": scaler.state_dict() if scaler.is_enabled() else {},
        "rng": rng_info,
        "local_receptive_field": list(net.local_receptive_field) if net.has_local_head else None,
    }
    return tensors, state


class RunWriter:
    """The files of a run folder, written atomically by rank 0 (``is_main``); a no-op elsewhere."""

    def __init__(self, out: Path, is_main: bool):
        self.out = out
        self.is_main = is_main

    @property
    def skipped_csv(self) -> Path | None:
        """Where unreadable images are listed (None on ranks that write nothing)."""
        return self.out / ckpt.SKIPPED_FILE if self.is_main else None

    def prepare(self) -> None:
        """Create the run folder."""
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)

    def write_config(self, conf: dict[str, Any]) -> None:
        """``config.json``: the resolved configuration."""
        if self.is_main:
            write_json(self.out / ckpt.CONFIG_FILE, conf)

    def save_model(self, net: LandmarkNet, meta: dict[str, Any]) -> None:
        """``model.safetensors`` + ``meta.json`` (+ ``config.json`` from the meta)."""
        if self.is_main:
            ckpt.save_model(self.out, net, meta)

    def save_state(self, state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> None:
        """``train_state.safetensors`` (+ its JSON mirror)."""
        if self.is_main:
            ckpt.save_train_state(self.out, *state)

    def time_state_write(self, state: tuple[dict[str, torch.Tensor], dict[str, Any]]) -> float:
        """Seconds one training-state write takes (written to a scratch folder, then removed)."""
        t = time.perf_counter()
        tmp = self.out / ".probe"
        ckpt.save_train_state(tmp, *state)
        seconds = time.perf_counter() - t
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
        return seconds

    def add_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """List unreadable training images in ``skipped.csv``."""
        if self.is_main and skipped:
            log = SkippedLog(self.out / ckpt.SKIPPED_FILE)
            for path, reason in skipped:
                log.add(path, reason)

    def append_log(self, row: dict[str, Any]) -> None:
        """Add (or replace) the row of ``row["epoch"]`` in ``log.jsonl``, rows in epoch order."""
        if not self.is_main:
            return
        path = self.out / ckpt.LOG_FILE
        rows = []
        if path.exists():
            with open(path, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        rows = [r for r in rows if r.get("epoch") != row["epoch"]] + [row]
        rows.sort(key=lambda r: r.get("epoch", 0))
        with atomic_write(path) as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
