"""Training of the global descriptor (and the DELG-style local head), on one CPU or under torchrun.

``train(conf, data, out)`` trains a :class:`~landmarks.models.net.LandmarkNet` on a labelled
collection (a GLDv2 CSV or a folder-per-landmark tree) and writes a run folder (see
:mod:`landmarks.checkpoint`). The loop:

- AdamW or SGD-Nesterov; linear warm-up then cosine decay, set every optimizer step; gradient
  clipping and accumulation; AMP (``"auto"``: bf16 or fp16 on CUDA, bf16 on CPUs with AMX, else fp32,
  because bf16 was slower than fp32 on the AVX512-BF16 CPU it was measured on); channels-last;
- DataLoader workers decode and augment; the order of every epoch and every augmentation is a pure
  function of the seed, so one seed reproduces a CPU run and ``resume=True`` continues a killed run
  exactly (optimizer, scaler, RNG and step restored; the epoch resumes at the next batch);
- validation each epoch: kNN GAP of the held-out split against the training split;
- a checkpoint each epoch (and every ``checkpoint_every_steps``), written atomically; rank 0 only;
- ``time_budget_min`` measures the throughput first and sizes the schedule (warm-up, cosine,
  evaluations, checkpoints) to finish within the budget, re-planning at each epoch end;
- under ``torchrun`` (``WORLD_SIZE > 1``): DDP (NCCL on GPUs, gloo on CPU), each rank takes its slice
  of every global batch, optional SyncBatchNorm on GPUs, logging and checkpoints on rank 0.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from landmarks import checkpoint as ckpt
from landmarks.config import from_dict, merge, to_dict
from landmarks.data.collection import ImageRecord, landmark_counts, load_collection, stratified_split
from landmarks.data.dataset import EpochSampler, EvalDataset, TrainDataset, collate
from landmarks.data.transforms import AugmentConfig, Preprocess, TrainTransform, normalize_batch
from landmarks.errors import ConfigError, IncompatibleArtifactError, LandmarksError
from landmarks.models.heads import class_weights, margin_cross_entropy
from landmarks.models.net import LandmarkNet, ModelConfig
from landmarks.models.presets import preset
from landmarks.utils.io import SkippedLog, atomic_write, read_json, write_json
from landmarks.utils.progress import Progress
from landmarks.utils.workers import worker_context

logger = logging.getLogger("landmarks")


# --- configuration ------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """Data loading, the validation split and the augmentations."""

    image_size: int = 224  # training / inference side S (images are squashed to S x S at inference)
    val_fraction: float = 0.1  # share of each landmark's images held out for validation (kNN GAP)
    min_images: int = 1  # drop landmarks with fewer images than this before splitting
    num_workers: int = -1  # DataLoader workers per process; -1: CPUs per process minus one (max 8)
    max_val_queries: int = 2000  # validation queries at most (a seeded subsample beyond)
    max_val_db: int = 20000  # training images embedded as the validation kNN database at most
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # training augmentations


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warm-up, then cosine to ``min_lr_ratio``)."""

    name: Literal["adamw", "sgd"] = "adamw"  # AdamW or SGD with Nesterov momentum
    lr: float = 1e-3  # peak learning rate (for the global batch)
    head_lr_mult: float = 1.0  # learning-rate multiplier of the margin head and the neck
    weight_decay: float = 1e-4  # decoupled weight decay (not on biases, norms, GeM p, PReLU)
    momentum: float = 0.9  # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    warmup_steps: int = -1  # warm-up optimizer steps; -1: warmup_fraction of all steps
    warmup_fraction: float = 0.05  # warm-up share of all steps when warmup_steps is -1
    min_lr_ratio: float = 0.01  # final learning rate / peak
    grad_clip: float = 0.0  # clip the gradient norm to this (0: off)
    accumulate: int = 1  # micro-batches per optimizer step


@dataclass
class FinetuneConfig:
    """Fine-tuning a pretrained backbone (the defaults train every parameter from the first step)."""

    frozen_levels: int = 0  # backbone feature levels (timm feature_info, stem first) frozen for the whole run
    head_only_fraction: float = 0.0  # share of the optimizer steps at the start with the whole backbone frozen
    freeze_bn: bool = False  # keep the backbone's BatchNorm layers in eval mode (pretrained statistics)
    head_warmup_epochs: int = 0  # epochs of neck + heads on backbone features computed once, before step 0


@dataclass
class TrainConfig:
    """Everything a run needs; saved resolved as ``RUN/config.json``."""

    preset: str | None = None  # the preset the config started from (informational)
    model: ModelConfig = field(default_factory=ModelConfig)  # the network
    data: DataConfig = field(default_factory=DataConfig)  # data, split, augmentations
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimizer and schedule
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # frozen parts of a pretrained backbone
    epochs: int = 10  # passes over the training split
    steps: int = 0  # total optimizer steps (0: epochs x steps per epoch); --time-budget sets it
    batch_size: int = 32  # global micro-batch (split over torchrun processes)
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # mixed precision
    channels_last: bool = True  # channels-last memory format for the backbone
    sync_bn: bool = False  # SyncBatchNorm under DDP on GPUs
    seed: int = 0  # one seed makes a CPU run reproducible
    checkpoint_every_steps: int = 0  # also save the training state every N optimizer steps (0: epochs only)
    eval_every_epochs: int = 1  # validate every N epochs (and after the last one)
    eval_at_start: bool = False  # also validate the untrained model (logged as epoch 0)
    knn_k: int = 3  # neighbours voting in the validation kNN
    log_interval_s: float = 10.0  # seconds between plain progress lines (when not on a terminal)
    local_only: bool = False  # train only the local head, the rest frozen (a second stage, with --init)
    init: str | None = None  # run folder whose weights (and class map) start this run
    time_budget_min: float = 0.0  # the budget this run was sized for (0: none)


def make_config(preset_name: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The default config, with a preset and then a (nested, strict) override dict applied."""
    conf = TrainConfig()
    if preset_name:
        conf = merge(conf, preset(preset_name))
        conf.preset = preset_name
    if overrides:
        conf = merge(conf, overrides)
    return conf


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    run_dir: Path  # the run folder
    steps: int  # optimizer steps done (in all sessions of the run)
    epochs: int  # epochs started
    metrics: dict[str, Any]  # the last log row
    elapsed_s: float  # wall time of this session


# --- pure helpers -------------------------------------------------------------------------------------

def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Learning-rate multiplier for optimizer step ``step`` (0-based) of ``total``.

    Linear warm-up ``(step + 1) / warmup`` for the first ``warmup`` steps, then cosine from 1 to
    ``min_ratio`` over the remaining steps.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(1.0, max(0.0, progress))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def knn_predict(xq: np.ndarray, xb: np.ndarray, yb: np.ndarray, k: int = 3,
                chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """kNN voting by summed cosine similarity.

    Args:
        xq: ``(nq, d)`` float32 L2-normalised queries.
        xb: ``(nb, d)`` float32 L2-normalised database.
        yb: ``(nb,)`` int64 database labels.
        k: neighbours (clipped to ``nb``).

    Returns:
        ``(labels (nq,) int64, scores (nq,) float32)``: the label with the largest sum of similarities
        among the ``k`` nearest neighbours (ties: the label of the nearer neighbour) and that sum / k.
    """
    k = max(1, min(k, len(xb)))
    labels = np.empty(len(xq), dtype=np.int64)
    scores = np.empty(len(xq), dtype=np.float32)
    tb = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))
    for s in range(0, len(xq), chunk):
        sims = torch.from_numpy(np.ascontiguousarray(xq[s:s + chunk], dtype=np.float32)) @ tb.T
        top_s, top_i = sims.topk(k, dim=1)
        top_y = torch.from_numpy(yb)[top_i]
        # votes[q, j] = sum of sims of the neighbours that share neighbour j's label.
        same = top_y.unsqueeze(2) == top_y.unsqueeze(1)
        votes = (same.float() * top_s.unsqueeze(1)).sum(dim=2)
        best = votes.argmax(dim=1)  # first max = nearest neighbour of the winning label
        labels[s:s + chunk] = top_y.gather(1, best.unsqueeze(1)).squeeze(1).numpy()
        scores[s:s + chunk] = (votes.gather(1, best.unsqueeze(1)).squeeze(1) / k).numpy()
    return labels, scores


def plan_steps(avail_s: float, step_s: float, steps_per_epoch: int, eval_s: float, epoch_overhead_s: float,
               final_s: float, eval_every: int = 1, max_eval_share: float = 0.15) -> tuple[int, int]:
    """Optimizer steps that fit a time budget, and the evaluation interval to use.

    The largest ``steps`` with ``steps · step_s + epochs · epoch_overhead_s + evals · eval_s + final_s
    <= avail_s``, where ``epochs = ceil(steps / steps_per_epoch)`` and ``evals = ceil(epochs / every)``;
    the interval ``every`` (at least ``eval_every``) grows so that evaluations take at most
    ``max_eval_share`` of the budget. Returns ``(steps >= 1, every)``.
    """
    max_evals = max(1, int(max_eval_share * avail_s / max(eval_s, 1e-9)))

    def cost(steps: int) -> tuple[float, int]:
        epochs = math.ceil(steps / steps_per_epoch)
        every = max(1, eval_every, math.ceil(epochs / max_evals))
        evals = math.ceil(epochs / every)
        return steps * step_s + epochs * epoch_overhead_s + evals * eval_s + final_s, every

    lo, hi = 1, max(1, int(avail_s / max(step_s, 1e-9)))
    while lo < hi:  # the cost grows with the steps: binary search for the last that fits
        mid = (lo + hi + 1) // 2
        if cost(mid)[0] <= avail_s:
            lo = mid
        else:
            hi = mid - 1
    return lo, cost(lo)[1]


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: fp32)."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return torch.bfloat16 if device.type == "cpu" and amx is not None and amx() else None


def param_groups(model: LandmarkNet, conf: OptimConfig) -> list[dict[str, Any]]:
    """AdamW/SGD parameter groups: backbone, neck+pool, head, local; no decay on 1-d parameters.

    Everything but the backbone (neck, pooling, margin head, local head: the parts that start from random
    weights) learns at ``lr * head_lr_mult``; the backbone at ``lr``.
    """
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = name.split(".", 1)[0]
        decay = p.ndim > 1
        groups.setdefault((part, decay), []).append(p)
    out = []
    for (part, decay), params in sorted(groups.items()):
        mult = conf.head_lr_mult if part in ("head", "neck", "pool", "local") else 1.0
        out.append({"params": params, "name": f"{part}{'' if decay else '_no_decay'}", "lr_mult": mult,
                    "weight_decay": conf.weight_decay if decay else 0.0, "lr": conf.lr * mult})
    return out


def build_optimizer(model: LandmarkNet, conf: OptimConfig) -> torch.optim.Optimizer:
    """AdamW or SGD-Nesterov over :func:`param_groups`."""
    groups = param_groups(model, conf)
    if not groups:
        raise ConfigError("no trainable parameters")
    if conf.name == "adamw":
        # The fused kernel is ~7x faster on CPU for a GLDv2-sized head and allocates no temporaries.
        device = next(iter(groups[0]["params"])).device
        fused = device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=conf.lr, betas=conf.betas, weight_decay=conf.weight_decay,
                                 fused=fused or None)
    return torch.optim.SGD(groups, lr=conf.lr, momentum=conf.momentum, nesterov=True,
                           weight_decay=conf.weight_decay)


# --- distributed --------------------------------------------------------------------------------------

@dataclass
class Dist:
    """The process's place in a torchrun job (world_size 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: logs, validates and writes checkpoints."""
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str | None = None) -> Dist:
        """Read torchrun's environment; initialise the process group (NCCL on GPUs, gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            dev = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        else:
            dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        here = False
        if world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend=backend)
            here = True
        return cls(rank, world, local, dev, here)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` on rank 0 (others get [])."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size if self.is_main else []
        torch.distributed.gather_object(obj, out if self.is_main else None, dst=0)
        return out

    def close(self) -> None:
        """Destroy the process group if :meth:`from_env` created it."""
        if self.initialised_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


# --- the trainer -------------------------------------------------------------------------------------

def _auto_workers(conf: int, world_size: int) -> int:
    if conf >= 0:
        return conf
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, n // world_size - 1))


def _subsample(items: list[ImageRecord], n: int, seed: int) -> list[ImageRecord]:
    if len(items) <= n:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


class Trainer:
    """One training session of a run folder (see :func:`train`, which is the public entry point)."""

    def __init__(self, conf: TrainConfig, data: str | Path | Sequence[ImageRecord], out: str | Path, *,
                 resume: bool = False, time_budget_min: float | None = None, dist: Dist | None = None,
                 device: str | None = None):
        self.t_start = time.perf_counter()
        self.out = Path(out)
        self.dist = dist or Dist.from_env(device)
        self.device = self.dist.device
        self.resume_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        if resume:
            self.resume_state = ckpt.load_train_state(self.out)
            saved = self.resume_state[1]["config"]
            conf = from_dict(TrainConfig, saved)
        elif (self.out / ckpt.TRAIN_STATE_FILE).exists():
            raise LandmarksError(f"{self.out} already holds a training run: pass --resume to continue it "
                                 f"or choose another --out")
        if time_budget_min is not None and not resume:
            conf.time_budget_min = float(time_budget_min)
        self.conf = conf
        self.budget_s = conf.time_budget_min * 60.0 if conf.time_budget_min > 0 else None
        self.elapsed_before = float(self.resume_state[1].get("elapsed_s", 0.0)) if self.resume_state else 0.0
        self._last_eval_img_s = 0.0
        self._last_ckpt_s = 0.5
        self.total = 0  # optimizer steps of the whole schedule (set in run)
        self.warmup = 0  # warm-up steps
        self.eval_every = conf.eval_every_epochs  # validate every N epochs
        self.replan_every = 0  # time budget: re-plan every N steps (0: never)
        self._train_s, self._train_steps = 0.0, 0  # time spent in training loops, and their steps
        self.data_source = str(Path(data).absolute()) if isinstance(data, (str, Path)) else None
        self._setup_data(data)
        self._setup_model()

    # --- setup -----------------------------------------------------------------------------------------
    def _setup_data(self, data: str | Path | Sequence[ImageRecord]) -> None:
        c = self.conf
        records = load_collection(data) if isinstance(data, (str, Path)) else list(data)
        records = [r for r in records if r.landmark is not None]
        if c.data.min_images > 1:
            counts0 = landmark_counts(records)
            records = [r for r in records if counts0[r.landmark or ""] >= c.data.min_images]
        if not records:
            raise LandmarksError(f"{data}: no labelled images to train on")
        train, val = stratified_split(records, c.data.val_fraction, seed=c.seed)
        if self.resume_state is not None:
            classes = [row["landmark"] for row in self.resume_state[1]["classes"]]
        elif c.init:
            classes = [row["landmark"] for row in ckpt.read_meta(c.init)["classes"]]
        else:
            classes = sorted(landmark_counts(train))
        self.class_index = {lm: i for i, lm in enumerate(classes)}
        dropped = sum(1 for r in train if r.landmark not in self.class_index)
        if dropped:
            logger.warning("%d training images belong to landmarks outside the class map of %s; ignored",
                           dropped, c.init)
        train = [r for r in train if r.landmark in self.class_index]
        val = [r for r in val if r.landmark in self.class_index]
        counts = landmark_counts(train)
        self.classes = [{"landmark": lm, "count": int(counts.get(lm, 0))} for lm in classes]
        self.class_counts = [max(1, row["count"]) for row in self.classes]
        self.train_records = train
        self.val_records = _subsample(val, c.data.max_val_queries, c.seed)
        self.db_records = _subsample(train, c.data.max_val_db, c.seed + 1)
        self.labels = [self.class_index[r.landmark or ""] for r in train]
        if len(train) < c.batch_size:
            raise LandmarksError(f"{len(train)} training images are fewer than one batch of {c.batch_size}; "
                                 f"lower --batch-size")
        if self.dist.is_main:
            logger.info("data: %d training images of %d landmarks, %d validation queries, %d in the kNN database",
                        len(train), len(classes), len(self.val_records), len(self.db_records))

    def _setup_model(self) -> None:
        c = self.conf
        if c.local_only:
            c.model.local.enabled = True
        torch.manual_seed(c.seed)
        pretrained = "" if (self.resume_state is not None or c.init) else None
        net = LandmarkNet(c.model, len(self.classes), self.class_counts, pretrained=pretrained)
        if c.init and self.resume_state is None:
            self._load_init(net, c.init)
        self.mean, self.std = self._preprocessing_stats(net)
        if net.has_local_head:
            net.local_receptive_field  # noqa: B018 (measure now, stored in meta)
        if c.local_only:
            for name, p in net.named_parameters():
                p.requires_grad = name.startswith("local.")
        ft = c.finetune
        if not 0.0 <= ft.head_only_fraction <= 1.0:
            raise ConfigError(f"finetune.head_only_fraction must lie in [0, 1], got {ft.head_only_fraction}")
        if (ft.head_only_fraction > 0 or ft.head_warmup_epochs > 0) and self.dist.world_size > 1:
            raise ConfigError("finetune.head_only_fraction and head_warmup_epochs are not supported under torchrun "
                              "(DDP cannot change the trainable parameters mid-run); use finetune.frozen_levels")
        #: Backbone parameters frozen for the whole run (names in ``net``), and the modules holding them.
        self.frozen_names = {f"backbone.model.{n}" for n in net.backbone.frozen_parameter_names(ft.frozen_levels)}
        for name, p in net.named_parameters():
            if name in self.frozen_names:
                p.requires_grad = False
        self._head_only: bool | None = None  # the head-only phase in force (None: not applied yet)
        self.amp_dtype = resolve_amp(c.amp, self.device)
        net.to(self.device)
        if c.channels_last:
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.net = net
        self.ce_weight = (torch.from_numpy(class_weights(self.class_counts)).to(self.device)
                          if c.model.head.class_weighted else None)
        model: nn.Module = net
        if self.dist.world_size > 1:
            if c.sync_bn and self.device.type == "cuda":
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif c.sync_bn:
                logger.warning("sync_bn is only used on GPUs; ignored on CPU")
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        self.optimizer = build_optimizer(net, c.optim)
        for g in self.optimizer.param_groups:
            g.setdefault("lr_mult", 1.0)
        fp16 = self.amp_dtype == torch.float16 and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)
        self.step = 0
        if self.resume_state is not None:
            self._restore(*self.resume_state)

    def _preprocessing_stats(self, net: LandmarkNet) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        dc = net.backbone.data_config()
        mean = tuple(float(v) for v in dc.get("mean", (0.485, 0.456, 0.406)))
        std = tuple(float(v) for v in dc.get("std", (0.229, 0.224, 0.225)))
        return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])

    def _load_init(self, net: LandmarkNet, init: str) -> None:
        weights = ckpt.resolve_checkpoint(init)
        state, _ = ckpt._read_safetensors(weights)
        own = net.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        bad_missing = [k for k in missing if not k.startswith("local.")]
        if bad_missing or [k for k in unexpected if not k.startswith("local.")]:
            raise IncompatibleArtifactError(f"{init}: weights do not fit this model (missing {bad_missing[:3]}, "
                                            f"unexpected {unexpected[:3]}): use the same backbone and sizes")
        shape = [k for k in state if k in own and own[k].shape != state[k].shape]
        if shape:
            raise IncompatibleArtifactError(f"{init}: tensor shapes differ for {shape[:3]}")
        net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        meta = ckpt.read_meta(init)
        rf = (meta.get("local") or {}).get("receptive_field")
        if net.has_local_head and rf:
            net.local_receptive_field = (float(rf[0]), float(rf[1]))
        if self.dist.is_main:
            logger.info("initialised from %s (%d tensors%s)", init, len(state) - len(unexpected),
                        f"; new: {len(missing)} local-head tensors" if missing else "")

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        self.net.load_state_dict(model_state, strict=True)
        ckpt.load_optimizer_state(self.optimizer, tensors, state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(tensors, state["rng"])
        self.step = int(state["step"])
        if self.net.has_local_head and state.get("local_receptive_field"):
            rf = state["local_receptive_field"]
            self.net.local_receptive_field = (float(rf[0]), float(rf[1]))
        if self.dist.is_main:
            logger.info("resuming %s at optimizer step %d", self.out, self.step)

    # --- loaders ---------------------------------------------------------------------------------------
    def _train_loader(self) -> tuple[EpochSampler, torch.utils.data.DataLoader]:
        c = self.conf
        transform = TrainTransform(c.data.image_size, c.data.augment)
        ds = TrainDataset(self.train_records, self.labels, transform, decode_min_side_px=c.data.image_size)
        sampler = EpochSampler(len(ds), c.batch_size, seed=c.seed, rank=self.dist.rank,
                               world_size=self.dist.world_size)
        workers = _auto_workers(c.data.num_workers, self.dist.world_size)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=sampler.local_batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
            pin_memory=self.device.type == "cuda", drop_last=False, persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None, generator=torch.Generator().manual_seed(c.seed),
            multiprocessing_context=worker_context() if workers > 0 else None)
        return sampler, loader

    def _eval_loader(self, records: Sequence[ImageRecord]) -> torch.utils.data.DataLoader:
        c = self.conf
        workers = _auto_workers(c.data.num_workers, 1)
        return torch.utils.data.DataLoader(EvalDataset(records, c.data.image_size), batch_size=max(1, c.batch_size),
                                           shuffle=False, num_workers=workers, collate_fn=collate,
                                           multiprocessing_context=worker_context() if workers > 0 else None)

    # --- one step ----------------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.conf.local_only:
            for m in self.net.global_modules() + ([self.net.head] if self.net.head is not None else []):
                m.eval()
        ft = self.conf.finetune
        if self._head_only:
            self.net.backbone.eval()
        elif ft.freeze_bn or self.frozen_names:
            for name, m in self.net.backbone.model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and (
                        ft.freeze_bn or any(f"backbone.model.{name}.{p}" in self.frozen_names
                                            for p, _ in m.named_parameters(recurse=False))):
                    m.eval()

    def _apply_head_only(self, on: bool) -> None:
        """Enter (``on``) or leave the head-only phase: the whole backbone frozen and in eval mode."""
        if self._head_only == on:
            return
        self._head_only = on
        if not self.conf.local_only:
            for name, p in self.net.backbone.named_parameters():
                p.requires_grad = not on and f"backbone.{name}" not in self.frozen_names
        self._set_train_mode()

    def _phase_for(self, step: int) -> bool:
        """Whether optimizer step ``step`` belongs to the head-only phase."""
        return step < round(self.conf.finetune.head_only_fraction * self.total)

    def _forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        x = normalize_batch(batch["image"], self.mean, self.std, self.device)
        if not self.conf.channels_last:
            x = x.contiguous()
        y = batch["label"].to(self.device, non_blocking=True)
        local_only = self.conf.local_only
        with self._autocast():
            out = self.model(x, y, global_branch=not local_only, local_branch=True)
        stats: dict[str, float] = {}
        loss = torch.zeros((), device=self.device)
        if "logits" in out:
            ce = margin_cross_entropy(out["logits"], y, self.ce_weight)
            loss = loss + ce
            stats["loss"] = float(ce.detach())
            stats["acc"] = float((out["logits"].detach().argmax(1) == y).float().mean())
        if "local_logits" in out:
            lc = self.conf.model.local
            att = F.cross_entropy(out["local_logits"], y)
            loss = loss + lc.loss_weight * (att + lc.recon_weight * out["recon_loss"])
            stats["local_loss"] = float(att.detach())
            stats["recon"] = float(out["recon_loss"].detach())
            stats["local_acc"] = float((out["local_logits"].detach().argmax(1) == y).float().mean())
        return loss, stats

    def _optimizer_step(self, total: int, warmup: int) -> None:
        f = lr_factor(self.step, total, warmup, self.conf.optim.min_lr_ratio)
        for g in self.optimizer.param_groups:
            g["lr"] = self.conf.optim.lr * g["lr_mult"] * f
        if self.conf.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.conf.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def train_step(self, batch: dict[str, Any], micro: int, total: int, warmup: int) -> tuple[dict[str, float], bool]:
        """One micro-batch (forward, loss, backward); after every ``accumulate``-th micro-batch an optimizer
        step at the scheduled learning rate. Returns the batch statistics and whether a step was made."""
        acc_n = self.conf.optim.accumulate
        sync = (micro + 1) % acc_n == 0
        if micro % acc_n == 0 and self.conf.finetune.head_only_fraction > 0:
            self._apply_head_only(self._phase_for(self.step))
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        ctx = self.model.no_sync() if (ddp and not sync) else contextlib.nullcontext()  # type: ignore[operator]
        with ctx:
            loss, stats = self._forward_loss(batch)
            if not torch.isfinite(loss):
                raise LandmarksError(f"the loss became {float(loss)} at step {self.step}: lower the learning "
                                     f"rate (optim.lr) or enable gradient clipping (optim.grad_clip)")
            self.scaler.scale(loss / acc_n).backward()
        if sync:
            self._optimizer_step(total, warmup)
        return stats, sync

    def _micro_batches(self, loader: torch.utils.data.DataLoader, skipped: list[tuple[str, str]]) -> Iterator[dict[str, Any]]:
        for batch in loader:
            if batch["skipped"]:
                skipped.extend(batch["skipped"])
            yield batch

    def head_warmup(self) -> dict[str, float]:
        """Train the neck, the margin head (and the local head) for ``finetune.head_warmup_epochs`` epochs on
        backbone features computed once (inference preprocessing, no augmentation), before step 0.

        With a time budget the warm-up steps stop at a fifth of it (measured after 3 steps).
        One forward pass of the training images buys hundreds of cheap steps, so a short CPU budget never
        leaves a random neck in front of pretrained features (which scores below no training at all). The
        backbone and GeM's exponent are untouched; the local head learns on the cached stride-16 maps (it
        sees them detached anyway). A separate AdamW at ``lr * head_lr_mult`` with cosine decay; seeded.
        Returns ``{"epochs", "steps", "loss", "acc", "seconds"}`` (empty when off).
        """
        c = self.conf
        epochs = c.finetune.head_warmup_epochs
        if epochs <= 0 or c.local_only:
            return {}
        t0 = time.perf_counter()
        net = self.net
        net.eval()
        pooled, maps, labels = [], [], []
        with torch.no_grad():
            for batch in self._eval_loader(self.train_records):
                keep = batch["ok"].bool()
                x = normalize_batch(batch["image"], self.mean, self.std, self.device)
                with self._autocast():
                    if net.local is not None:
                        fmap, fmap16 = net.backbone.forward_with_local(x)
                        maps.append(fmap16.float()[keep.to(x.device)])
                    else:
                        fmap = net.backbone(x)
                    pooled.append(net.pool(fmap).float()[keep.to(x.device)])
                labels.append(torch.as_tensor([self.labels[int(i)] for i in batch["index"]])[keep])
        xs, ys = torch.cat(pooled), torch.cat(labels).to(self.device)
        ms = torch.cat(maps) if maps else None
        local, head = net.local, net.head
        if head is None:
            raise ConfigError("finetune.head_warmup_epochs needs a margin head (the model has none)")
        modules: list[nn.Module] = [net.neck, head]
        if local is not None:
            modules.append(local)
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        base_lr = c.optim.lr * c.optim.head_lr_mult
        opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=c.optim.weight_decay)
        gen = torch.Generator().manual_seed(c.seed)
        bs = min(c.batch_size, len(xs))
        per_epoch = max(1, len(xs) // bs)
        total = epochs * per_epoch
        lc = c.model.local
        for m in modules:
            m.train()
        loss_sum = acc_sum = 0.0
        step, t_steps = 0, time.perf_counter()
        while step < total:
            if step == 3 and self.budget_s is not None:
                # A time budget caps the warm-up's steps at a fifth of it (a loaded CPU may be 20x slower); the
                # feature pass before them is not counted (without it the warm-up is pointless).
                step_s = (time.perf_counter() - t_steps) / 3
                left = 0.2 * self.budget_s - (time.perf_counter() - t_steps)
                total = max(step, min(total, int(left / max(step_s, 1e-6))))
                if step >= total:
                    break
            if step % per_epoch == 0:
                perm = torch.randperm(len(xs), generator=gen).to(self.device)
                loss_sum = acc_sum = 0.0
            i = perm[(step % per_epoch) * bs:(step % per_epoch + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            logits = head(net.neck(xs[i]), ys[i])
            loss = margin_cross_entropy(logits, ys[i], self.ce_weight)
            if ms is not None and local is not None:
                lo = local(ms[i])
                loss = loss + lc.loss_weight * (F.cross_entropy(lo["logits"], ys[i]) + lc.recon_weight * lo["recon_loss"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            acc_sum += float((logits.detach().argmax(1) == ys[i]).float().mean())
            step += 1
        n = max(1, total - (total - 1) // per_epoch * per_epoch)
        out = {"epochs": round(total / per_epoch, 2), "steps": total, "loss": round(loss_sum / n, 4), "acc": round(acc_sum / n, 3),
               "seconds": round(time.perf_counter() - t0, 1)}
        if self.dist.is_main:
            logger.info("head warm-up on cached features of %d images: %s", len(xs), out)
        return out

    # --- evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, records: Sequence[ImageRecord], timing: dict[str, float] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Embed ``records`` with the current weights: ``(N, D)`` float32 L2-normalised, ``(N,)`` ok mask,
        and the local head's ``(N,)`` predicted classes (None without a local head).

        ``timing``, when given, receives ``s_per_image`` measured after the first batch (the steady
        rate, without worker start-up)."""
        net = self.net
        was_training = net.training
        net.eval()
        embs = np.zeros((len(records), net.embedding_dim), np.float32)
        ok = np.zeros(len(records), bool)
        local_pred = np.zeros(len(records), np.int64) if net.has_local_head else None
        t_first, n_after = 0.0, 0
        try:
            for batch in self._eval_loader(records):
                if t_first:
                    n_after += int(batch["image"].shape[0])
                x = normalize_batch(batch["image"], self.mean, self.std, self.device)
                with self._autocast():
                    if net.local is not None:
                        fmap, fmap16 = net.backbone.forward_with_local(x)
                        local_logits = net.local(fmap16)["logits"]
                    else:
                        fmap = net.backbone(x)
                    emb = F.normalize(net.neck(net.pool(fmap)).float(), dim=1)
                idx = batch["index"].numpy()
                if batch["skipped"] and self.dist.is_main:
                    log = SkippedLog(self.out / ckpt.SKIPPED_FILE)
                    for path, reason in batch["skipped"]:
                        log.add(path, reason)
                embs[idx] = emb.cpu().numpy()
                ok[idx] = batch["ok"].numpy()
                if local_pred is not None:
                    local_pred[idx] = local_logits.argmax(1).cpu().numpy()
                if not t_first:
                    t_first = time.perf_counter()
        finally:
            net.train(was_training)
        if timing is not None and n_after:
            timing["s_per_image"] = (time.perf_counter() - t_first) / n_after
        return embs, ok, local_pred

    def evaluate(self) -> dict[str, Any]:
        """kNN GAP / top-1 of the validation queries against the training images (rank 0).

        Also returns ``eval_s``, the wall time it took."""
        from landmarks.metrics import global_average_precision, top1_accuracy

        if not self.val_records:
            return {}
        t = time.perf_counter()
        xq, okq, local_pred = self.embed(self.val_records)
        xb, okb, _ = self.embed(self.db_records)
        yb = np.array([self.class_index[r.landmark or ""] for r in self.db_records], np.int64)
        q_idx = np.flatnonzero(okq)
        pred, score = knn_predict(xq[q_idx], xb[okb], yb[okb], k=self.conf.knn_k)
        classes = [row["landmark"] for row in self.classes]
        predictions = {self.val_records[i].id: (classes[p], float(s)) for i, p, s in zip(q_idx, pred, score)}
        solution = {r.id: [r.landmark or ""] for r in self.val_records}
        out: dict[str, Any] = {
            "val_gap": float(global_average_precision(predictions, solution)),
            "val_top1": float(top1_accuracy(predictions, solution)),
            "val_queries": len(self.val_records), "val_db": int(okb.sum()),
        }
        if local_pred is not None:
            yq = np.array([self.class_index[r.landmark or ""] for r in self.val_records], np.int64)
            out["val_local_acc"] = float((local_pred[q_idx] == yq[q_idx]).mean()) if len(q_idx) else 0.0
        out["eval_s"] = round(time.perf_counter() - t, 3)
        return out

    # --- checkpoints ------------------------------------------------------------------------------------
    def meta(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """The meta dict saved with the weights."""
        c = self.conf
        h = c.model.head
        preprocessing = Preprocess(c.data.image_size, self.mean, self.std).to_dict()
        local = None
        if self.net.has_local_head:
            rf, pad = self.net.local_receptive_field
            local = {"stride": self.net.local_stride, "receptive_field": [rf, pad], "dim": c.model.local.dim,
                     "stage": self.net.backbone.local_module, "channels": self.net.backbone.local_channels}
        return {
            "format": "landmarks-run", "name": self.out.name, "config": to_dict(c), "data": self.data_source,
            "num_classes": len(self.classes), "classes": self.classes,
            "embedding_dim": self.net.embedding_dim, "preprocessing": preprocessing,
            "margins": {"kind": h.kind, "scale": h.scale, "margin_rad": h.margin_rad, "dynamic": h.dynamic_margins,
                        "a": h.margin_a, "b": h.margin_b, "subcenters": h.subcenters,
                        "class_weighted": h.class_weighted},
            "gem_p": float(self.net.pool.p.detach().float().cpu()[0]),
            "pretrained": self.net.backbone.pretrained_info,
            "local": local, "epoch": epoch, "step": self.step, "metrics": metrics,
            "versions": ckpt.library_versions(), **ckpt.git_info(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def train_state(self, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors + JSON of everything ``--resume`` needs."""
        tensors = {f"model.{k}": v for k, v in ckpt.cpu_state_dict(self.net).items()}
        opt_t, opt_info = ckpt.optimizer_state(self.optimizer)
        rng_t, rng_info = ckpt.rng_state()
        tensors.update(opt_t)
        tensors.update(rng_t)
        state = {
            "step": self.step, "epoch": epoch, "total_steps": self.total, "warmup": self.warmup,
            "eval_every": self.eval_every, "replan_every": self.replan_every,
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self.t_start),
            "config": to_dict(self.conf), "data": self.data_source, "classes": self.classes, "optimizer": opt_info,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}, "rng": rng_info,
            "local_receptive_field": list(self.net.local_receptive_field) if self.net.has_local_head else None,
        }
        return tensors, state

    def save_state(self, epoch: int) -> None:
        """Write ``train_state.safetensors`` (rank 0)."""
        if self.dist.is_main:
            ckpt.save_train_state(self.out, *self.train_state(epoch))

    def _append_log(self, row: dict[str, Any]) -> None:
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

    # --- planning ---------------------------------------------------------------------------------------
    def _measure(self, sampler: EpochSampler, loader: torch.utils.data.DataLoader, warm: int = 2,
                 steps: int = 6) -> dict[str, float]:
        """Time a few real training steps (the weights and optimizer are restored afterwards), one
        evaluation batch and one checkpoint write."""
        model_state = copy.deepcopy(self.net.state_dict())
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        rng = torch.get_rng_state()
        head_only = self._head_only
        self._apply_head_only(False)  # time the slower steps (backbone trainable): the bulk of a run
        n = min(warm + steps, sampler.batches_per_epoch)
        sampler.set_epoch(0, 0, n)
        times = []
        t = time.perf_counter()
        for batch in loader:
            loss, _ = self._forward_loss(batch)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            now = time.perf_counter()
            times.append(now - t)
            t = now
        self.net.load_state_dict(model_state)
        self.optimizer.load_state_dict(opt_state)
        torch.set_rng_state(rng)
        if head_only is not None:
            self._apply_head_only(head_only)
        step_s = float(np.median(times[warm:] if len(times) > warm else times))
        eval_img_s = ckpt_s = 0.0
        if self.dist.is_main:
            # Evaluation: the steady rate over a few batches of the kNN database; a checkpoint: one write.
            probe = self.db_records[: 4 * max(1, self.conf.batch_size)]
            timing: dict[str, float] = {}
            t = time.perf_counter()
            self.embed(probe, timing)
            eval_img_s = timing.get("s_per_image", (time.perf_counter() - t) / max(1, len(probe)))
            t = time.perf_counter()
            tmp = self.out / ".probe"
            ckpt.save_train_state(tmp, *self.train_state(0))
            ckpt_s = time.perf_counter() - t
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()
        self._last_eval_img_s = eval_img_s
        self._last_ckpt_s = ckpt_s
        return {"step_s": step_s * self.conf.optim.accumulate, "eval_img_s": eval_img_s, "ckpt_s": ckpt_s}

    def _plan(self, remaining_s: float, rates: dict[str, float], spe: int) -> tuple[int, int]:
        eval_s = rates["eval_img_s"] * (len(self.val_records) + len(self.db_records)) + 1.0
        ckpt_s = rates["ckpt_s"]
        steps, every = plan_steps(remaining_s, rates["step_s"], spe, eval_s, epoch_overhead_s=2 * ckpt_s + 0.5,
                                  final_s=2 * ckpt_s + 0.02 * remaining_s, eval_every=self.conf.eval_every_epochs)
        return steps, every

    # --- the loop -----------------------------------------------------------------------------------------
    def _warmup_for(self, total: int) -> int:
        o = self.conf.optim
        warmup = o.warmup_steps if o.warmup_steps >= 0 else round(o.warmup_fraction * total)
        return min(warmup, max(0, total - 1))

    def _set_total(self, total: int, spe: int) -> None:
        """Adopt a (re-planned) schedule length; the warm-up follows it until it is over."""
        if self.step < self.warmup or self.total == 0:
            self.warmup = self._warmup_for(total)
        self.total = total
        self.conf.steps = total
        self.conf.epochs = math.ceil(total / spe)

    def run(self) -> TrainResult:
        """Train to the end of the schedule; returns the :class:`TrainResult`."""
        c, dist = self.conf, self.dist
        if dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        sampler, loader = self._train_loader()
        spe = sampler.batches_per_epoch // c.optim.accumulate
        if spe < 1:
            raise LandmarksError(f"an epoch of {len(self.train_records)} images has no complete optimizer step "
                                 f"(batch {c.batch_size} x accumulate {c.optim.accumulate})")
        self.skipped_log = SkippedLog(self.out / ckpt.SKIPPED_FILE) if dist.is_main else None
        self.replan_every = 0
        if self.resume_state is not None:
            st = self.resume_state[1]
            self.total = int(st["total_steps"])
            self.warmup = int(st.get("warmup", self._warmup_for(self.total)))
            self.eval_every = int(st.get("eval_every", c.eval_every_epochs))
            self.replan_every = int(st.get("replan_every", 0))
        else:
            self.eval_every = c.eval_every_epochs
            total = c.steps if c.steps > 0 else c.epochs * spe
            self.head_warmup()
            rates = dist.broadcast(self._measure(sampler, loader)) if self.budget_s is not None else {}
            if c.eval_at_start and dist.is_main:
                m = self.evaluate()
                self._append_log({"epoch": 0, "step": 0, **m})
                logger.info("epoch 0 (untrained): %s", _fmt_metrics(m))
                if rates and "eval_s" in m:  # the real cost of one validation, for the plan
                    rates["eval_img_s"] = float(m["eval_s"]) / max(1, len(self.val_records) + len(self.db_records))
            if self.budget_s is not None:
                rates = dist.broadcast(rates)
                self._last_eval_img_s = rates["eval_img_s"]
                remaining = self.budget_s - (time.perf_counter() - self.t_start)
                total, self.eval_every = self._plan(remaining, rates, spe)
                total, self.eval_every = dist.broadcast((total, self.eval_every))
                # Re-plan every ~5 % of the budget (at least 10 s) of steps, at the same steps on all ranks.
                self.replan_every = max(1, int(max(10.0, 0.05 * self.budget_s) / max(rates["step_s"], 1e-6)))
                if dist.is_main:
                    logger.info("time budget %.1f min: %.3f s/step, %.1f ms/image to validate: %d steps planned "
                                "(%.1f epochs), validation every %d epoch(s)", c.time_budget_min, rates["step_s"],
                                1000 * rates["eval_img_s"], total, total / spe, self.eval_every)
            self._set_total(total, spe)
        if dist.is_main:
            write_json(self.out / ckpt.CONFIG_FILE, to_dict(c))
        dist.barrier()
        last_row: dict[str, Any] = {}
        stop = {"flag": False}
        prev_handler = None
        if dist.is_main and dist.world_size == 1:
            prev_handler = signal.getsignal(signal.SIGTERM)

            def _on_term(signum: int, frame: Any) -> None:
                stop["flag"] = True
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, _on_term)
        try:
            while self.step < self.total:
                last_row = self._run_epoch(self.step // spe, sampler, loader, spe, stop)
                if stop["flag"]:
                    raise KeyboardInterrupt
                if self.budget_s is not None and self.step < self.total:
                    self._replan(last_row, spe)
        except KeyboardInterrupt:
            if dist.is_main:
                logger.warning("interrupted at step %d: state saved, continue with --resume", self.step)
                self.save_state(self.step // spe)
            raise
        finally:
            if prev_handler is not None:
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, prev_handler)
        elapsed = time.perf_counter() - self.t_start
        if dist.is_main:
            logger.info("done: %d steps in %.1f s this session; run folder %s", self.step, elapsed, self.out)
        return TrainResult(self.out, self.step, math.ceil(self.step / spe), last_row, elapsed)

    def _eval_estimate(self, rates: dict[str, float]) -> float:
        return rates["eval_img_s"] * (len(self.val_records) + len(self.db_records)) + 1.0

    def _replan(self, row: dict[str, Any], spe: int, step_s: float | None = None) -> None:
        """Re-size the schedule to the time left, from measured step, evaluation and checkpoint times
        (rank 0 decides, every rank adopts it at the same step)."""
        assert self.budget_s is not None
        elapsed = self.elapsed_before + time.perf_counter() - self.t_start
        remaining = self.budget_s - elapsed
        if step_s is None:
            epoch_rate = float(row.get("train_s", 1.0)) / max(1, int(row.get("epoch_steps", 1)))
            step_s = 0.5 * (epoch_rate + self._train_s / max(1, self._train_steps))
        n_eval = max(1, len(self.val_records) + len(self.db_records))
        rates = {"step_s": step_s, "eval_img_s": float(row["eval_s"]) / n_eval if "eval_s" in row
                 else self._last_eval_img_s, "ckpt_s": float(row.get("ckpt_s", self._last_ckpt_s))}
        if "eval_s" in row:
            self._last_eval_img_s = rates["eval_img_s"]
        if "ckpt_s" in row:
            self._last_ckpt_s = float(row["ckpt_s"])
        # Time still owed to the epoch in progress: its evaluation and checkpoint.
        owed = (2 * rates["ckpt_s"] + self._eval_estimate(rates)) if self.step % spe else 0.0
        more, every = self._plan(remaining - owed, rates, spe)
        total = self.total
        new_total, new_every = total, self.eval_every
        if abs(self.step + more - total) > 0.02 * total:
            new_total, new_every = max(self.step, self.step + more), max(self.eval_every, every)
        new_total, new_every = self.dist.broadcast((new_total, new_every))
        self.eval_every = new_every
        if new_total != total:
            if self.dist.is_main:
                logger.debug("time budget: re-planned %d -> %d steps (%.0f s left)", total, new_total, remaining)
            self._set_total(new_total, spe)

    def _average_bn_stats(self) -> None:
        """Under DDP, average the BatchNorm running statistics over the ranks (each rank updated them
        with its own micro-batches), so that every rank holds the same weights and buffers."""
        if self.dist.world_size == 1:
            return
        for name, buf in self.net.named_buffers():
            if buf.is_floating_point() and ("running_mean" in name or "running_var" in name):
                torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
                buf.div_(self.dist.world_size)

    def _run_epoch(self, epoch: int, sampler: EpochSampler, loader: torch.utils.data.DataLoader, spe: int,
                   stop: dict[str, bool]) -> dict[str, Any]:
        """Train from the current step to the end of ``epoch`` (or of the schedule), then validate,
        checkpoint and log."""
        c, dist = self.conf, self.dist
        acc_n = c.optim.accumulate
        start_step = self.step - epoch * spe
        planned_end = min(spe, self.total - epoch * spe)
        # A time-budgeted schedule may grow during the epoch: let the sampler run to the epoch's end.
        sampler.set_epoch(epoch, start_step * acc_n, (spe if self.budget_s is not None else planned_end) * acc_n)
        self._set_train_mode()
        bar = Progress(total=(planned_end - start_step) * acc_n * c.batch_size,
                       desc=f"epoch {epoch + 1}/{math.ceil(self.total / spe)}", unit="img",
                       interval_s=c.log_interval_s, disable=not dist.is_main)
        sums: dict[str, float] = {}
        count = 0
        skipped: list[tuple[str, str]] = []
        t0 = window_t = time.perf_counter()
        window_step = first_step = self.step
        micro = 0
        for batch in self._micro_batches(loader, skipped):
            stats, stepped = self.train_step(batch, micro, self.total, self.warmup)
            micro += 1
            for k, v in stats.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            bar.update(int(batch["image"].shape[0]) * dist.world_size, loss=round(stats.get("loss", stats.get(
                "local_loss", 0.0)), 4), acc=round(stats.get("acc", stats.get("local_acc", 0.0)), 3),
                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            if not stepped:
                continue
            if self.replan_every and self.step % self.replan_every == 0 and self.step < self.total:
                now = time.perf_counter()
                window = (now - window_t) / max(1, self.step - window_step)
                overall = (self._train_s + now - t0) / max(1, self._train_steps + self.step - first_step)
                self._replan({}, spe, step_s=0.5 * (window + overall))
                window_t, window_step = now, self.step
                if bar.total != (min(spe, self.total - epoch * spe) - start_step) * acc_n * c.batch_size:
                    bar.total = (min(spe, self.total - epoch * spe) - start_step) * acc_n * c.batch_size
            if c.checkpoint_every_steps and self.step % c.checkpoint_every_steps == 0 and self.step < self.total:
                self.save_state(epoch)
            if stop["flag"] or self.step >= self.total:
                break
        bar.close()
        train_s = time.perf_counter() - t0
        self._train_s += train_s
        self._train_steps += self.step - first_step
        if stop["flag"]:
            return {}
        self._average_bn_stats()
        epoch_steps = self.step - (epoch * spe + start_step)
        images = epoch_steps * acc_n * c.batch_size
        all_skipped = [s for part in dist.gather(skipped) for s in part]
        row: dict[str, Any] = {"epoch": epoch + 1, "step": self.step,
                               "lr": self.optimizer.param_groups[0]["lr"],
                               **{f"train_{k}": v / max(1, count) for k, v in sums.items()},
                               "images_per_s": round(images / train_s, 2) if train_s > 0 else 0.0,
                               "train_s": round(train_s, 3), "epoch_steps": epoch_steps,
                               "gem_p": float(self.net.pool.p.detach().float().cpu()[0])}
        if dist.is_main and self.skipped_log is not None:
            for path, reason in all_skipped:
                self.skipped_log.add(path, reason)
            row["skipped"] = len(all_skipped)
        is_last = self.step >= self.total
        epoch_done = self.step % spe == 0 or is_last
        if dist.is_main:
            if (epoch + 1) % self.eval_every == 0 or is_last:
                row.update(self.evaluate())
            row["elapsed_s"] = round(self.elapsed_before + time.perf_counter() - self.t_start, 2)
            t = time.perf_counter()
            ckpt.save_model(self.out, self.net, self.meta(epoch + 1, row))
            self.save_state(epoch + 1 if epoch_done else epoch)
            row["ckpt_s"] = round(time.perf_counter() - t, 3)
            self._append_log(row)
            logger.info("epoch %d/%d: %s", epoch + 1, math.ceil(self.total / spe), _fmt_metrics(row))
        dist.barrier()
        return dist.broadcast(row)


def _fmt_metrics(row: dict[str, Any]) -> str:
    keys = ("step", "train_loss", "train_acc", "train_local_loss", "train_local_acc", "images_per_s",
            "val_gap", "val_top1", "val_local_acc", "skipped")
    return ", ".join(f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row)


def train(conf: TrainConfig, data: str | Path | Sequence[ImageRecord], out: str | Path, *, resume: bool = False,
          time_budget_min: float | None = None, device: str | None = None,
          on_trainer: Callable[[Trainer], None] | None = None) -> TrainResult:
    """Train a model and write the run folder ``out``.

    Args:
        conf: the configuration (see :func:`make_config`); ignored when resuming (the run's own
            ``config.json`` is used).
        data: a GLDv2 CSV (images in ``train/`` beside it), a folder-per-landmark tree, a list file, or
            the records themselves.
        out: the run folder.
        resume: continue the run in ``out`` from its last saved state.
        time_budget_min: size the schedule to finish in this many minutes (measured throughput).
        device: ``"cpu"``, ``"cuda"``, ... (default: the torchrun local GPU, else CPU).
        on_trainer: called with the :class:`Trainer` before training (tests and benchmarks).

    Runs under ``torchrun`` as well (DDP). Seeds torch's RNG from ``conf.seed`` inside a forked RNG
    scope, so the caller's RNG state is unchanged.
    """
    dist = Dist.from_env(device)
    try:
        devices = [dist.device.index or 0] if dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            trainer = Trainer(conf, data, out, resume=resume, time_budget_min=time_budget_min, dist=dist)
            if on_trainer is not None:
                on_trainer(trainer)
            return trainer.run()
    finally:
        dist.close()


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN/log.jsonl``."""
    path = Path(run_dir) / ckpt.LOG_FILE
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A config file (JSON) as a dict; a run's ``config.json`` works."""
    try:
        data = read_json(path)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a JSON object")
    return data
