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

The pieces: :class:`Trainer` is the loop (model, optimizer, steps, epochs, DDP);
:class:`~landmarks.train_validation.Validator` validates; :class:`~landmarks.train_writer.RunWriter`
writes the run folder; :class:`~landmarks.train_budget.BudgetPlanner` sizes the schedule to a time
budget from the rates the loop measures.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
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
from landmarks.data.dataset import EpochSampler, TrainDataset, collate
from landmarks.data.transforms import AugmentConfig, Preprocess, TrainTransform, normalize_batch
from landmarks.errors import ConfigError, IncompatibleArtifactError, LandmarksError
from landmarks.models.heads import class_weights, margin_cross_entropy
from landmarks.models.net import LandmarkNet, ModelConfig
from landmarks.models.presets import preset
from landmarks.train_budget import BudgetPlanner, Rates, plan_steps
from landmarks.train_validation import Validator, knn_predict
from landmarks.train_writer import RunWriter, Schedule, run_meta, training_state
from landmarks.utils import precision
from landmarks.utils.dist import cpu_count, dist_env, resolve_device
from landmarks.utils.io import read_json
from landmarks.utils.progress import Progress
from landmarks.utils.workers import worker_context

logger = logging.getLogger("landmarks")

__all__ = [
    "DataConfig",
    "Dist",
    "FinetuneConfig",
    "OptimConfig",
    "TrainConfig",
    "TrainData",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "knn_predict",
    "load_config_file",
    "load_init_weights",
    "lr_factor",
    "make_config",
    "param_groups",
    "plan_steps",
    "read_log",
    "read_stats",
    "resolve_amp",
    "split_data",
    "train",
]


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
    head_only_fraction: float = (
        0.0  # share of the optimizer steps at the start with the whole backbone frozen
    )
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


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``amp`` on ``device`` (None: fp32); see :func:`landmarks.utils.precision.choose_amp_dtype`."""
    return precision.amp_dtype(amp, device)


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
        out.append(
            {
                "params": params,
                "name": f"{part}{'' if decay else '_no_decay'}",
                "lr_mult": mult,
                "weight_decay": conf.weight_decay if decay else 0.0,
                "lr": conf.lr * mult,
            }
        )
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
        return torch.optim.AdamW(
            groups, lr=conf.lr, betas=conf.betas, weight_decay=conf.weight_decay, fused=fused or None
        )
    return torch.optim.SGD(
        groups, lr=conf.lr, momentum=conf.momentum, nesterov=True, weight_decay=conf.weight_decay
    )


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
        env = dist_env()
        world, rank, local = env.world_size, env.rank, env.local_rank
        dev = torch.device(resolve_device(device))  # None or "auto": the local GPU, else the CPU
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        here = False
        if world > 1 and not torch.distributed.is_initialized():
            if dev.type == "cuda":  # NCCL bound to this rank's GPU (no guessing at the first collective)
                torch.distributed.init_process_group(backend="nccl", device_id=dev)
            else:
                torch.distributed.init_process_group(backend="gloo")
            here = True
        return cls(rank, world, local, dev, here)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.world_size > 1:
            ids = [self.device.index or 0] if self.device.type == "cuda" else None
            torch.distributed.barrier(device_ids=ids)

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


def _subsample(items: list[ImageRecord], n: int, seed: int) -> list[ImageRecord]:
    if len(items) <= n:
        return items
    keep = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in keep]


# --- data ---------------------------------------------------------------------------------------------


def _auto_workers(conf: int, world_size: int) -> int:
    if conf >= 0:
        return conf
    return max(0, min(8, cpu_count() // world_size - 1))


@dataclass
class TrainData:
    """The images of a run, split and mapped to classes."""

    train: list[ImageRecord]  # training images (their landmarks are in the class map)
    labels: list[int]  # (len(train),) class index of each training image
    val: list[ImageRecord]  # validation queries (a seeded subsample of the held-out split)
    db: list[ImageRecord]  # the validation kNN database (a seeded subsample of the training images)
    classes: list[dict[str, Any]]  # the class map: {"landmark", "count"} per class index

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (at least 1: dynamic margins and class weights need it)."""
        return [max(1, row["count"]) for row in self.classes]


def split_data(
    data: str | Path | Sequence[ImageRecord], conf: TrainConfig, class_names: list[str] | None = None
) -> TrainData:
    """Load and split a labelled collection (seeded, stratified), with ``class_names`` as the class map
    (a resumed run's or an ``--init`` run's) or the training split's landmarks, sorted."""
    c = conf
    records = load_collection(data) if isinstance(data, (str, Path)) else list(data)
    records = [r for r in records if r.landmark is not None]
    if c.data.min_images > 1:
        counts0 = landmark_counts(records)
        records = [r for r in records if counts0[r.landmark or ""] >= c.data.min_images]
    if not records:
        raise LandmarksError(f"{data}: no labelled images to train on")
    train, val = stratified_split(records, c.data.val_fraction, seed=c.seed)
    classes = class_names if class_names is not None else sorted(landmark_counts(train))
    class_index = {lm: i for i, lm in enumerate(classes)}
    dropped = sum(1 for r in train if r.landmark not in class_index)
    if dropped:
        logger.warning(
            "%d training images belong to landmarks outside the class map of %s; ignored", dropped, c.init
        )
    train = [r for r in train if r.landmark in class_index]
    val = [r for r in val if r.landmark in class_index]
    counts = landmark_counts(train)
    if len(train) < c.batch_size:
        raise LandmarksError(
            f"{len(train)} training images are fewer than one batch of {c.batch_size}; lower --batch-size"
        )
    return TrainData(
        train=train,
        labels=[class_index[r.landmark or ""] for r in train],
        val=_subsample(val, c.data.max_val_queries, c.seed),
        db=_subsample(train, c.data.max_val_db, c.seed + 1),
        classes=[{"landmark": lm, "count": int(counts.get(lm, 0))} for lm in classes],
    )


def load_init_weights(net: LandmarkNet, init: str) -> tuple[int, int]:
    """Start ``net`` from run ``init``'s weights (a local head may be new); returns ``(tensors loaded, new
    local-head tensors)``. Raises :class:`IncompatibleArtifactError` when the weights do not fit."""
    state = ckpt.read_weights(init)
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    bad_missing = [k for k in missing if not k.startswith("local.")]
    if bad_missing or [k for k in unexpected if not k.startswith("local.")]:
        raise IncompatibleArtifactError(
            f"{init}: weights do not fit this model (missing {bad_missing[:3]}, "
            f"unexpected {unexpected[:3]}): use the same backbone and sizes"
        )
    shape = [k for k in state if k in own and own[k].shape != state[k].shape]
    if shape:
        raise IncompatibleArtifactError(f"{init}: tensor shapes differ for {shape[:3]}")
    net.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    rf = (ckpt.read_meta(init).get("local") or {}).get("receptive_field")
    if net.has_local_head and rf:
        net.local_receptive_field = (float(rf[0]), float(rf[1]))
    return len(state) - len(unexpected), len(missing)


def _preprocessing_stats(net: LandmarkNet) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    dc = net.backbone.data_config()
    mean = tuple(float(v) for v in dc.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in dc.get("std", (0.229, 0.224, 0.225)))
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


# --- the loop -------------------------------------------------------------------------------------------


@dataclass
class _EpochTally:
    """What the steps of one epoch add up to (statistics stay on the device until the epoch ends)."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 sums of the batch statistics
    count: int = 0  # micro-batches
    skipped: list[tuple[str, str]] = field(default_factory=list)  # unreadable images met
    first_step: int = 0  # the step the epoch (or this session's part of it) started at
    train_s: float = 0.0  # seconds in the loop

    def add(self, stats: dict[str, torch.Tensor]) -> None:
        """Add one micro-batch's statistics (float64: the same numbers as summing Python floats)."""
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v.double() if k in self.sums else v.double()
        self.count += 1


class Trainer:
    """The training loop of one session of a run folder (:func:`train` is the public entry point).

    The loop owns the model, the optimizer and the step. It asks a
    :class:`~landmarks.train_validation.Validator` to validate, a :class:`~landmarks.train_writer.RunWriter`
    to write the folder and, under a time budget, a :class:`~landmarks.train_budget.BudgetPlanner` how many
    steps fit (feeding it the rates it measures). The caller's config is left as it was: ``conf`` is the
    trainer's resolved copy, and the schedule it plans lives in ``schedule``.
    """

    def __init__(
        self,
        conf: TrainConfig,
        data: str | Path | Sequence[ImageRecord],
        out: str | Path,
        *,
        resume: bool = False,
        time_budget_min: float | None = None,
        dist: Dist | None = None,
        device: str | None = None,
    ):
        self.t_start = time.perf_counter()
        self.out = Path(out)
        self.dist = dist or Dist.from_env(device)
        self.device = self.dist.device
        self.resume_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None
        if resume:
            self.resume_state = ckpt.load_train_state(self.out)
            conf = from_dict(TrainConfig, self.resume_state[1]["config"])
        elif (self.out / ckpt.TRAIN_STATE_FILE).exists():
            raise LandmarksError(
                f"{self.out} already holds a training run: pass --resume to continue it "
                f"or choose another --out"
            )
        else:
            conf = copy.deepcopy(conf)
            if time_budget_min is not None:
                conf.time_budget_min = float(time_budget_min)
        if conf.local_only:
            conf.model.local.enabled = True
        self.conf = conf
        self.elapsed_before = float(self.resume_state[1].get("elapsed_s", 0.0)) if self.resume_state else 0.0
        self.schedule = Schedule(eval_every=conf.eval_every_epochs)
        self.spe = 0  # optimizer steps per epoch (set in run)
        self.writer = RunWriter(self.out, self.dist.is_main)
        self.data_source = str(Path(data).absolute()) if isinstance(data, (str, Path)) else None
        self._setup_data(data)
        self._setup_model()
        self.validator = Validator(
            self.val_records,
            self.db_records,
            [row["landmark"] for row in self.classes],
            image_size=conf.data.image_size,
            batch_size=conf.batch_size,
            num_workers=_auto_workers(conf.data.num_workers, 1),
            knn_k=conf.knn_k,
            mean=self.mean,
            std=self.std,
            device=self.device,
            amp_dtype=self.amp_dtype,
            skipped_csv=self.writer.skipped_csv,
        )
        self.budget = (
            BudgetPlanner(
                conf.time_budget_min * 60.0,
                self.elapsed_before,
                self.t_start,
                self.validator.num_images,
                conf.eval_every_epochs,
            )
            if conf.time_budget_min > 0
            else None
        )

    @property
    def total(self) -> int:
        """Optimizer steps of the whole run (``schedule.total``; 0 before :meth:`run` plans it)."""
        return self.schedule.total

    @total.setter
    def total(self, value: int) -> None:
        self.schedule.total = int(value)

    # --- setup -----------------------------------------------------------------------------------------
    def _setup_data(self, data: str | Path | Sequence[ImageRecord]) -> None:
        c = self.conf
        if self.resume_state is not None:
            names: list[str] | None = [row["landmark"] for row in self.resume_state[1]["classes"]]
        elif c.init:
            names = [row["landmark"] for row in ckpt.read_meta(c.init)["classes"]]
        else:
            names = None
        split = split_data(data, c, names)
        self.train_records, self.labels = split.train, split.labels
        self.val_records, self.db_records = split.val, split.db
        self.classes, self.class_counts = split.classes, split.class_counts
        if self.dist.is_main:
            logger.info(
                "data: %d training images of %d landmarks, %d validation queries, %d in the kNN database",
                len(split.train),
                len(split.classes),
                len(split.val),
                len(split.db),
            )

    def _build_net(self) -> LandmarkNet:
        """The network, initialised (seeded, or from ``--init``), with its frozen parts frozen."""
        c = self.conf
        torch.manual_seed(c.seed)
        pretrained = "" if (self.resume_state is not None or c.init) else None
        net = LandmarkNet(c.model, len(self.classes), self.class_counts, pretrained=pretrained)
        if c.init and self.resume_state is None:
            loaded, new = load_init_weights(net, c.init)
            if self.dist.is_main:
                logger.info(
                    "initialised from %s (%d tensors%s)",
                    c.init,
                    loaded,
                    f"; new: {new} local-head tensors" if new else "",
                )
        if net.has_local_head:
            net.local_receptive_field  # noqa: B018 (measure now, stored in meta)
        if c.local_only:
            for name, p in net.named_parameters():
                p.requires_grad = name.startswith("local.")
        ft = c.finetune
        if not 0.0 <= ft.head_only_fraction <= 1.0:
            raise ConfigError(f"finetune.head_only_fraction must lie in [0, 1], got {ft.head_only_fraction}")
        if (ft.head_only_fraction > 0 or ft.head_warmup_epochs > 0) and self.dist.world_size > 1:
            raise ConfigError(
                "finetune.head_only_fraction and head_warmup_epochs are not supported under torchrun "
                "(DDP cannot change the trainable parameters mid-run); use finetune.frozen_levels"
            )
        #: Backbone parameters frozen for the whole run (names in ``net``), and the modules holding them.
        self.frozen_names = {
            f"backbone.model.{n}" for n in net.backbone.frozen_parameter_names(ft.frozen_levels)
        }
        for name, p in net.named_parameters():
            if name in self.frozen_names:
                p.requires_grad = False
        return net

    def _setup_model(self) -> None:
        c = self.conf
        net = self._build_net()
        self.mean, self.std = _preprocessing_stats(net)
        self._head_only: bool | None = None  # the head-only phase in force (None: not applied yet)
        self.amp_dtype = resolve_amp(c.amp, self.device)
        net.to(self.device)
        if c.channels_last:
            net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.net = net
        self.ce_weight = (
            torch.from_numpy(class_weights(self.class_counts)).to(self.device)
            if c.model.head.class_weighted
            else None
        )
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
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=precision.needs_grad_scaler(self.amp_dtype, self.device.type)
        )
        self.step = 0
        if self.resume_state is not None:
            self._restore(*self.resume_state)

    def _restore(self, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
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

    def _train_loader(self) -> tuple[EpochSampler, torch.utils.data.DataLoader]:
        c = self.conf
        transform = TrainTransform(c.data.image_size, c.data.augment)
        ds = TrainDataset(self.train_records, self.labels, transform, decode_min_side_px=c.data.image_size)
        sampler = EpochSampler(
            len(ds), c.batch_size, seed=c.seed, rank=self.dist.rank, world_size=self.dist.world_size
        )
        workers = _auto_workers(c.data.num_workers, self.dist.world_size)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=sampler.local_batch_size,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            drop_last=False,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers > 0 else None,
            generator=torch.Generator().manual_seed(c.seed),
            multiprocessing_context=worker_context() if workers > 0 else None,
        )
        return sampler, loader

    # --- one step ----------------------------------------------------------------------------------------
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
                    ft.freeze_bn
                    or any(
                        f"backbone.model.{name}.{p}" in self.frozen_names
                        for p, _ in m.named_parameters(recurse=False)
                    )
                ):
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
        return step < round(self.conf.finetune.head_only_fraction * self.schedule.total)

    def _forward_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one micro-batch and its statistics as detached 0-d tensors on the device (reading
        them is a GPU -> CPU sync, left to whoever shows them)."""
        x = normalize_batch(batch["image"], self.mean, self.std, self.device)
        if not self.conf.channels_last:
            x = x.contiguous()
        y = batch["label"].to(self.device, non_blocking=True)
        local_only = self.conf.local_only
        with precision.autocast(self.device, self.amp_dtype):
            out = self.model(x, y, global_branch=not local_only, local_branch=True)
        stats: dict[str, torch.Tensor] = {}
        loss = torch.zeros((), device=self.device)
        if "logits" in out:
            ce = margin_cross_entropy(out["logits"], y, self.ce_weight)
            loss = loss + ce
            stats["loss"] = ce.detach()
            stats["acc"] = (out["logits"].detach().argmax(1) == y).float().mean()
        if "local_logits" in out:
            lc = self.conf.model.local
            att = F.cross_entropy(out["local_logits"], y)
            loss = loss + lc.loss_weight * (att + lc.recon_weight * out["recon_loss"])
            stats["local_loss"] = att.detach()
            stats["recon"] = out["recon_loss"].detach()
            stats["local_acc"] = (out["local_logits"].detach().argmax(1) == y).float().mean()
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

    def train_step(
        self, batch: dict[str, Any], micro: int, total: int, warmup: int
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """One micro-batch (forward, loss, backward); after every ``accumulate``-th micro-batch an optimizer
        step at the scheduled learning rate. Returns the batch statistics (0-d tensors on the device) and
        whether a step was made.

        On a CPU a non-finite loss raises before its backward pass; on a GPU the check waits for the
        next read of the statistics (:func:`read_stats`), so that no step waits for the GPU."""
        acc_n = self.conf.optim.accumulate
        sync = (micro + 1) % acc_n == 0
        if micro % acc_n == 0 and self.conf.finetune.head_only_fraction > 0:
            self._apply_head_only(self._phase_for(self.step))
        ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
        ctx = self.model.no_sync() if (ddp and not sync) else contextlib.nullcontext()  # type: ignore[operator]
        with ctx:
            loss, stats = self._forward_loss(batch)
            if self.device.type != "cuda":
                read_stats({"loss": loss.detach()}, self.step)
            self.scaler.scale(loss / acc_n).backward()
        if sync:
            self._optimizer_step(total, warmup)
        return stats, sync

    # --- head warm-up -----------------------------------------------------------------------------------
    def _cached_features(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The training images' GeM-pooled backbone features ``(N, C)`` float32, their labels ``(N,)`` and
        (with a local head) their stride-16 maps, computed once (inference preprocessing, no augmentation)."""
        net = self.net
        net.eval()
        pooled, maps, labels = [], [], []
        with torch.no_grad():
            for batch in self.validator.loader(self.train_records):
                keep = batch["ok"].bool()
                x = normalize_batch(batch["image"], self.mean, self.std, self.device)
                with precision.autocast(self.device, self.amp_dtype):
                    if net.local is not None:
                        fmap, fmap16 = net.backbone.forward_with_local(x)
                        maps.append(fmap16.float()[keep.to(x.device)])
                    else:
                        fmap = net.backbone(x)
                    pooled.append(net.pool(fmap).float()[keep.to(x.device)])
                labels.append(torch.as_tensor([self.labels[int(i)] for i in batch["index"]])[keep])
        return torch.cat(pooled), torch.cat(labels).to(self.device), (torch.cat(maps) if maps else None)

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
        xs, ys, ms = self._cached_features()
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
        budget_s = self.budget.budget_s if self.budget is not None else None
        for m in modules:
            m.train()
        loss_sum = acc_sum = 0.0
        step, t_steps = 0, time.perf_counter()
        while step < total:
            if step == 3 and budget_s is not None:
                # A time budget caps the warm-up's steps at a fifth of it (a loaded CPU may be 20x slower); the
                # feature pass before them is not counted (without it the warm-up is pointless).
                step_s = (time.perf_counter() - t_steps) / 3
                left = 0.2 * budget_s - (time.perf_counter() - t_steps)
                total = max(step, min(total, int(left / max(step_s, 1e-6))))
                if step >= total:
                    break
            if step % per_epoch == 0:
                perm = torch.randperm(len(xs), generator=gen).to(self.device)
                loss_sum = acc_sum = 0.0
            i = perm[(step % per_epoch) * bs : (step % per_epoch + 1) * bs]
            for g in opt.param_groups:
                g["lr"] = base_lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            logits = head(net.neck(xs[i]), ys[i])
            loss = margin_cross_entropy(logits, ys[i], self.ce_weight)
            if ms is not None and local is not None:
                lo = local(ms[i])
                loss = loss + lc.loss_weight * (
                    F.cross_entropy(lo["logits"], ys[i]) + lc.recon_weight * lo["recon_loss"]
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach())
            acc_sum += float((logits.detach().argmax(1) == ys[i]).float().mean())
            step += 1
        n = max(1, total - (total - 1) // per_epoch * per_epoch)
        out = {
            "epochs": round(total / per_epoch, 2),
            "steps": total,
            "loss": round(loss_sum / n, 4),
            "acc": round(acc_sum / n, 3),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if self.dist.is_main:
            logger.info("head warm-up on cached features of %d images: %s", len(xs), out)
        return out

    # --- what is written ------------------------------------------------------------------------------
    def resolved_config(self) -> dict[str, Any]:
        """The config as run: ``conf`` with ``steps`` and ``epochs`` of the schedule (once planned)."""
        out = to_dict(self.conf)
        if self.schedule.total and self.spe:
            out["steps"], out["epochs"] = self.schedule.total, math.ceil(self.schedule.total / self.spe)
        return out

    def train_state(self, epoch: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Tensors + JSON of everything ``--resume`` needs."""
        return training_state(
            self.resolved_config(),
            self.net,
            self.optimizer,
            self.scaler,
            self.schedule,
            step=self.step,
            epoch=epoch,
            elapsed_s=self.elapsed_before + (time.perf_counter() - self.t_start),
            classes=self.classes,
            data_source=self.data_source,
        )

    def save_state(self, epoch: int) -> None:
        """Write ``train_state.safetensors`` (rank 0)."""
        if self.dist.is_main:
            self.writer.save_state(self.train_state(epoch))

    def meta(self, epoch: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """The meta dict saved with the weights."""
        pre = Preprocess(self.conf.data.image_size, self.mean, self.std)
        return run_meta(
            self.resolved_config(),
            self.net,
            self.classes,
            pre,
            name=self.out.name,
            data_source=self.data_source,
            epoch=epoch,
            step=self.step,
            metrics=metrics,
        )

    # --- planning ---------------------------------------------------------------------------------------
    def measure_rates(
        self, sampler: EpochSampler, loader: torch.utils.data.DataLoader, warm: int = 2, steps: int = 6
    ) -> Rates:
        """Time a few real training steps (the weights and optimizer are restored afterwards), one
        validation's rate and one checkpoint write (the last two on rank 0; 0 elsewhere)."""
        model_state = copy.deepcopy(self.net.state_dict())
        opt_state = copy.deepcopy(self.optimizer.state_dict())
        rng = torch.get_rng_state()
        head_only = self._head_only
        self._apply_head_only(False)  # time the slower steps (backbone trainable): the bulk of a run
        sampler.set_epoch(0, 0, min(warm + steps, sampler.batches_per_epoch))
        times = []
        t = time.perf_counter()
        for batch in loader:
            loss, _ = self._forward_loss(batch)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.device.type == "cuda":  # time the GPU's work, not the queueing of its kernels
                torch.cuda.synchronize(self.device)
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
            self.validator.embed(self.net, probe, timing)
            eval_img_s = timing.get("s_per_image", (time.perf_counter() - t) / max(1, len(probe)))
            ckpt_s = self.writer.time_state_write(self.train_state(0))
        return Rates(step_s * self.conf.optim.accumulate, eval_img_s, ckpt_s)

    def _warmup_for(self, total: int) -> int:
        o = self.conf.optim
        warmup = o.warmup_steps if o.warmup_steps >= 0 else round(o.warmup_fraction * total)
        return min(warmup, max(0, total - 1))

    def _set_total(self, total: int) -> None:
        """Adopt a (re-planned) schedule length; the warm-up follows it until it is over."""
        sch = self.schedule
        if self.step < sch.warmup or sch.total == 0:
            sch.warmup = self._warmup_for(total)
        sch.total = total

    def _plan_schedule(self, sampler: EpochSampler, loader: torch.utils.data.DataLoader) -> None:
        """The schedule of this session: the saved one when resuming, else the configured length or, under
        a time budget, what fits (measured first); validates the untrained model when asked."""
        c, dist, sch = self.conf, self.dist, self.schedule
        if self.resume_state is not None:
            st = self.resume_state[1]
            sch.total = int(st["total_steps"])
            sch.warmup = int(st.get("warmup", self._warmup_for(sch.total)))
            sch.eval_every = int(st.get("eval_every", c.eval_every_epochs))
            sch.replan_every = int(st.get("replan_every", 0))
            return
        total = c.steps if c.steps > 0 else c.epochs * self.spe
        self.head_warmup()
        rates = dist.broadcast(self.measure_rates(sampler, loader)) if self.budget is not None else None
        if c.eval_at_start and dist.is_main:
            m = self.validator.evaluate(self.net)
            self.writer.append_log({"epoch": 0, "step": 0, **m})
            logger.info("epoch 0 (untrained): %s", _fmt_metrics(m))
            if rates is not None and "eval_s" in m:  # the real cost of one validation, for the plan
                rates.eval_img_s = float(m["eval_s"]) / max(1, self.validator.num_images)
        if self.budget is not None:
            rates = dist.broadcast(rates)
            assert rates is not None
            total, every, sch.replan_every = self.budget.first_plan(rates, self.spe)
            total, sch.eval_every = dist.broadcast((total, every))
            if dist.is_main:
                logger.info(
                    "time budget %.1f min: %.3f s/step, %.1f ms/image to validate: %d steps planned "
                    "(%.1f epochs), validation every %d epoch(s)",
                    c.time_budget_min,
                    rates.step_s,
                    1000 * rates.eval_img_s,
                    total,
                    total / self.spe,
                    sch.eval_every,
                )
        self._set_total(total)

    def _replan(self, row: dict[str, Any], step_s: float | None = None) -> None:
        """Re-size the schedule to the time left (rank 0 decides, every rank adopts it at the same step)."""
        assert self.budget is not None
        sch = self.schedule
        new = self.budget.replan(self.step, sch.total, sch.eval_every, self.spe, row, step_s)
        new_total, sch.eval_every = self.dist.broadcast(new)
        if new_total != sch.total:
            if self.dist.is_main:
                logger.debug("time budget: re-planned %d -> %d steps", sch.total, new_total)
            self._set_total(new_total)

    # --- the loop -----------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to the end of the schedule; returns the :class:`TrainResult`."""
        dist = self.dist
        self.writer.prepare()
        dist.barrier()
        sampler, loader = self._train_loader()
        self.spe = sampler.batches_per_epoch // self.conf.optim.accumulate
        if self.spe < 1:
            raise LandmarksError(
                f"an epoch of {len(self.train_records)} images has no complete optimizer step "
                f"(batch {self.conf.batch_size} x accumulate {self.conf.optim.accumulate})"
            )
        self._plan_schedule(sampler, loader)
        self.writer.write_config(self.resolved_config())
        dist.barrier()
        last_row: dict[str, Any] = {}
        with _stop_on_sigterm(dist.is_main and dist.world_size == 1) as stop:
            try:
                while self.step < self.schedule.total:
                    last_row = self._run_epoch(self.step // self.spe, sampler, loader, stop)
                    if stop["flag"]:
                        raise KeyboardInterrupt
                    if self.budget is not None and self.step < self.schedule.total:
                        self._replan(last_row)
            except KeyboardInterrupt:
                if dist.is_main:
                    logger.warning("interrupted at step %d: state saved, continue with --resume", self.step)
                    self.save_state(self.step // self.spe)
                raise
        elapsed = time.perf_counter() - self.t_start
        if dist.is_main:
            logger.info("done: %d steps in %.1f s this session; run folder %s", self.step, elapsed, self.out)
        return TrainResult(self.out, self.step, math.ceil(self.step / self.spe), last_row, elapsed)

    def _average_bn_stats(self) -> None:
        """Under DDP, average the BatchNorm running statistics over the ranks (each rank updated them
        with its own micro-batches), so that every rank holds the same weights and buffers."""
        if self.dist.world_size == 1:
            return
        for name, buf in self.net.named_buffers():
            if buf.is_floating_point() and ("running_mean" in name or "running_var" in name):
                torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
                buf.div_(self.dist.world_size)

    def _epoch_images(self, epoch: int, start_step: int) -> int:
        """Images the rest of ``epoch`` will train on (for the progress bar), from ``start_step`` in it."""
        c = self.conf
        return (
            (min(self.spe, self.schedule.total - epoch * self.spe) - start_step)
            * c.optim.accumulate
            * c.batch_size
        )

    def _train_epoch(
        self, epoch: int, sampler: EpochSampler, loader: torch.utils.data.DataLoader, stop: dict[str, bool]
    ) -> _EpochTally:
        """The optimizer steps from the current one to the end of ``epoch`` (or of the schedule, or a stop);
        re-plans mid-epoch under a time budget and writes the periodic checkpoints."""
        c, dist, spe = self.conf, self.dist, self.spe
        acc_n = c.optim.accumulate
        start_step = self.step - epoch * spe
        planned_end = min(spe, self.schedule.total - epoch * spe)
        # A time-budgeted schedule may grow during the epoch: let the sampler run to the epoch's end.
        sampler.set_epoch(
            epoch, start_step * acc_n, (spe if self.budget is not None else planned_end) * acc_n
        )
        self._set_train_mode()
        bar = Progress(
            total=self._epoch_images(epoch, start_step),
            desc=f"epoch {epoch + 1}/{math.ceil(self.schedule.total / spe)}",
            unit="img",
            interval_s=c.log_interval_s,
            disable=not dist.is_main,
        )
        tally = _EpochTally(first_step=self.step)
        t0 = window_t = time.perf_counter()
        window_step = self.step
        read_every = 1 if self.device.type != "cuda" else _GPU_READ_EVERY
        for micro, batch in enumerate(loader):
            tally.skipped.extend(batch["skipped"])
            stats, stepped = self.train_step(batch, micro, self.schedule.total, self.schedule.warmup)
            tally.add(stats)
            n_img = int(batch["image"].shape[0]) * dist.world_size
            if (micro + 1) % read_every:
                bar.update(n_img)
            else:
                vals = read_stats(stats, self.step)
                bar.update(
                    n_img,
                    loss=round(vals.get("loss", vals.get("local_loss", 0.0)), 4),
                    acc=round(vals.get("acc", vals.get("local_acc", 0.0)), 3),
                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                )
            if not stepped:
                continue
            sch = self.schedule
            if (
                self.budget is not None
                and sch.replan_every
                and self.step % sch.replan_every == 0
                and self.step < sch.total
            ):
                now = time.perf_counter()
                window = (now - window_t) / max(1, self.step - window_step)
                overall = self.budget.mean_step_s(now - t0, self.step - tally.first_step)
                self._replan({}, step_s=0.5 * (window + overall))
                window_t, window_step = now, self.step
                bar.total = self._epoch_images(epoch, start_step)
            if (
                c.checkpoint_every_steps
                and self.step % c.checkpoint_every_steps == 0
                and self.step < sch.total
            ):
                self.save_state(epoch)
            if stop["flag"] or self.step >= sch.total:
                break
        bar.close()
        tally.train_s = time.perf_counter() - t0
        if self.budget is not None:
            self.budget.add_training_time(tally.train_s, self.step - tally.first_step)
        return tally

    def _run_epoch(
        self, epoch: int, sampler: EpochSampler, loader: torch.utils.data.DataLoader, stop: dict[str, bool]
    ) -> dict[str, Any]:
        """Train to the end of ``epoch`` (or of the schedule), then validate, checkpoint and log; returns the
        epoch's log row ({} when stopped)."""
        tally = self._train_epoch(epoch, sampler, loader, stop)
        if stop["flag"]:
            return {}
        self._average_bn_stats()
        c, dist = self.conf, self.dist
        epoch_steps = self.step - tally.first_step
        images = epoch_steps * c.optim.accumulate * c.batch_size
        all_skipped = [s for part in dist.gather(tally.skipped) for s in part]
        means = read_stats({k: v / max(1, tally.count) for k, v in tally.sums.items()}, self.step)
        row: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.step,
            "lr": self.optimizer.param_groups[0]["lr"],
            **{f"train_{k}": v for k, v in means.items()},
            "images_per_s": round(images / tally.train_s, 2) if tally.train_s > 0 else 0.0,
            "train_s": round(tally.train_s, 3),
            "epoch_steps": epoch_steps,
            "gem_p": float(self.net.pool.p.detach().float().cpu()[0]),
        }
        if dist.is_main:
            self.writer.add_skipped(all_skipped)
            row["skipped"] = len(all_skipped)
            self._end_epoch(epoch, row)
        dist.barrier()
        return dist.broadcast(row)

    def _end_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Rank 0 at an epoch's end: validate (every ``eval_every`` epochs and at the end), write the model,
        the training state and the log row."""
        is_last = self.step >= self.schedule.total
        epoch_done = self.step % self.spe == 0 or is_last
        if (epoch + 1) % self.schedule.eval_every == 0 or is_last:
            row.update(self.validator.evaluate(self.net))
        row["elapsed_s"] = round(self.elapsed_before + time.perf_counter() - self.t_start, 2)
        t = time.perf_counter()
        self.writer.save_model(self.net, self.meta(epoch + 1, row))
        self.save_state(epoch + 1 if epoch_done else epoch)
        row["ckpt_s"] = round(time.perf_counter() - t, 3)
        self.writer.append_log(row)
        logger.info(
            "epoch %d/%d: %s", epoch + 1, math.ceil(self.schedule.total / self.spe), _fmt_metrics(row)
        )


@contextlib.contextmanager
def _stop_on_sigterm(enabled: bool) -> Iterator[dict[str, bool]]:
    """Within the block, SIGTERM sets ``flag`` (the loop stops at the next step and saves its state) instead
    of killing the process; the previous handler is restored on exit. A plain flag when not ``enabled``."""
    stop = {"flag": False}
    prev = signal.getsignal(signal.SIGTERM) if enabled else None

    def _on_term(signum: int, frame: Any) -> None:
        stop["flag"] = True

    if enabled:
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGTERM, _on_term)
    try:
        yield stop
    finally:
        if prev is not None:
            with contextlib.suppress(ValueError):
                signal.signal(signal.SIGTERM, prev)


#: On a GPU, read the step statistics (a GPU -> CPU sync that drains the queue of kernels) every this
#: many micro-batches only: the progress line's loss is at most this many steps old.
_GPU_READ_EVERY = 20


def read_stats(stats: dict[str, torch.Tensor], step: int) -> dict[str, float]:
    """The statistics as Python floats (one sync); raises :class:`LandmarksError` when a loss is not finite."""
    vals = {k: float(v) for k, v in stats.items()}
    for k in ("loss", "local_loss"):
        if k in vals and not math.isfinite(vals[k]):
            raise LandmarksError(
                f"the loss became {vals[k]} by step {step}: lower the learning rate (optim.lr) "
                f"or enable gradient clipping (optim.grad_clip)"
            )
    return vals


def _fmt_metrics(row: dict[str, Any]) -> str:
    keys = (
        "step",
        "train_loss",
        "train_acc",
        "train_local_loss",
        "train_local_acc",
        "images_per_s",
        "val_gap",
        "val_top1",
        "val_local_acc",
        "skipped",
    )
    return ", ".join(
        f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row
    )


def train(
    conf: TrainConfig,
    data: str | Path | Sequence[ImageRecord],
    out: str | Path,
    *,
    resume: bool = False,
    time_budget_min: float | None = None,
    device: str | None = None,
    on_trainer: Callable[[Trainer], None] | None = None,
) -> TrainResult:
    """Train a model and write the run folder ``out``.

    Args:
        conf: the configuration (see :func:`make_config`); ignored when resuming (the run's own
            ``config.json`` is used).
        data: a GLDv2 CSV (images in ``train/`` beside it), a folder-per-landmark tree, a list file, or
            the records themselves.
        out: the run folder.
        resume: continue the run in ``out`` from its last saved state.
        time_budget_min: size the schedule to finish in this many minutes (measured throughput).
        device: ``"auto"`` (the default, also None: the torchrun local GPU, else CPU), ``"cpu"``, ``"cuda:1"``, ...
        on_trainer: called with the :class:`Trainer` before training (tests and benchmarks).

    Runs under ``torchrun`` as well (DDP). Seeds torch's RNG from ``conf.seed`` inside a forked RNG
    scope, so the caller's RNG state is unchanged.
    """
    dist = Dist.from_env(device)
    try:
        devices = [dist.device.index or 0] if dist.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), precision.cudnn_benchmark(dist.device):
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
