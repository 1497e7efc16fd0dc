"""Training-loop throughput against a bare timm loop, side by side in one run.

Ours: ``landmarks.train.Trainer`` over real images: DataLoader workers decode and augment, the main
process normalises, GeM + neck + margin head, the loss, backward, AdamW step at the scheduled LR.
Bare: ``timm.create_model(name, num_classes=C)`` (its own pooling + linear classifier) on one fixed
random batch already in memory, cross-entropy, backward, the same AdamW; same model, batch, image size,
threads and precision. Rounds alternate between the two so that load from other processes hits both;
the medians are compared. Goal: ratio ours / bare >= 0.85.

    python bench/train_throughput.py                       # cpu preset, real photos, 2 threads
    python bench/train_throughput.py --data synth/train.csv --preset cpu --steps 15 --rounds 3

On a shared machine pass ``--threads 1``: when another process holds a core, two spinning OpenMP
threads stall each other and both loops crawl (measured 10–20 img/s instead of ~160 at load 5).

``--data``: a collection ``landmarks.train`` reads (GLDv2 CSV, folder per landmark) or the
``realworld`` benchmark folder (its ``landmarks.csv``: ``path,landmark,collection``).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from landmarks.data.collection import ImageRecord, encode_id
from landmarks.train import Trainer, make_config

REPO = Path(__file__).resolve().parents[1]


def realworld_records(root: Path) -> list[ImageRecord]:
    """The labelled photos of the realworld benchmark folder."""
    with open(root / "landmarks.csv", newline="", encoding="utf-8") as f:
        return [
            ImageRecord(encode_id(row["path"]), root / row["path"], row["landmark"])
            for row in csv.DictReader(f)
        ]


def time_ours(trainer: Trainer, loader: Any, sampler: Any, epoch: int, steps: int, warmup: int) -> float:
    """Images/s of ``steps`` optimizer steps of the real loop (after ``warmup`` untimed ones)."""
    c = trainer.conf
    per_step = c.batch_size * c.optim.accumulate
    sampler.set_epoch(epoch, 0, (steps + warmup) * c.optim.accumulate)
    trainer._set_train_mode()
    total = 10**6
    t0 = time.perf_counter()
    micro = done = 0
    for batch in loader:
        _, stepped = trainer.train_step(batch, micro, total, 10)
        micro += 1
        done += int(stepped)
        if stepped and done == warmup:
            t0 = time.perf_counter()
    return steps * per_step / (time.perf_counter() - t0)


def time_bare(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    warmup: int,
    amp: torch.dtype | None,
) -> float:
    """Images/s of the bare loop: forward, cross-entropy, backward, optimizer step."""
    model.train()
    t0 = 0.0
    for i in range(steps + warmup):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "realworld"))
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=-1, help="DataLoader workers of our loop (-1: auto)")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    over: dict[str, Any] = {"data": {"num_workers": args.workers, "val_fraction": 0.05}}
    if args.image_size:
        over["data"]["image_size"] = args.image_size
    if args.batch_size:
        over["batch_size"] = args.batch_size
    conf = make_config(args.preset, over)
    if args.overrides:
        from landmarks.config import apply_overrides

        conf = apply_overrides(conf, args.overrides)
    data = Path(args.data)
    records: Any = realworld_records(data) if (data / "landmarks.csv").is_file() else data
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(conf, records, Path(tmp) / "run", device="cpu")
        sampler, loader = trainer._train_loader()
        need = (args.steps + args.warmup) * conf.optim.accumulate
        if sampler.batches_per_epoch < need:
            print(f"not enough images for {need} batches per round", file=sys.stderr)
            return 2
        import timm

        n_classes = len(trainer.classes)
        bare = timm.create_model(conf.model.backbone, pretrained=False, num_classes=n_classes)
        bare = bare.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        bare_opt = torch.optim.AdamW(bare.parameters(), lr=1e-4, fused=True)
        s = conf.data.image_size
        x = torch.randn(conf.batch_size, 3, s, s).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, n_classes, (conf.batch_size,))
        ours, base = [], []
        for r in range(args.rounds):
            ours.append(time_ours(trainer, loader, sampler, r, args.steps, args.warmup))
            base.append(time_bare(bare, bare_opt, x, y, args.steps, args.warmup, trainer.amp_dtype))
            print(f"round {r + 1}: ours {ours[-1]:.1f} img/s, bare timm {base[-1]:.1f} img/s", flush=True)
    mo, mb = statistics.median(ours), statistics.median(base)
    workers = loader.num_workers
    print(
        f"model {conf.model.backbone} @ {s}px, batch {conf.batch_size}, threads {args.threads}, "
        f"amp {trainer.amp_dtype}, {n_classes} classes, {workers} loader workers, data {args.data}"
    )
    print(f"images/s: training loop {mo:.1f}, bare timm loop {mb:.1f}; ratio {mo / mb:.3f} (goal >= 0.85)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
