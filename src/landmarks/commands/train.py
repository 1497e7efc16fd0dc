"""``landmarks train``: train the global descriptor (and optionally the DELG-style local head).

The configuration is resolved in this order, later wins: the defaults, ``--preset`` (``cpu`` when
neither ``--preset`` nor ``--config`` is given), ``--config FILE`` (JSON; a run's ``config.json``
works), the flags (``--epochs``, ``--image-size``, ...), then ``key.sub=value`` overrides. Unknown keys
are errors. Examples::

    landmarks train --data synth/train.csv --out runs/cpu --time-budget 5
    landmarks train --data photos/ --out runs/b3 --preset glr-b3-448 optim.lr=2e-4
    landmarks train --data photos/ --out runs/b3-640 --init runs/b3 --image-size 640 --epochs 2
    landmarks train --data photos/ --out runs/local --init runs/cpu --local-only --epochs 3
    landmarks train --out runs/cpu --resume
    torchrun --nproc_per_node 8 -m landmarks train --data train.csv --out runs/b5 --preset glr-b5-512
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from landmarks.errors import ConfigError, LandmarksError
from landmarks.utils.dist import dist_env

logger = logging.getLogger("landmarks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks train``."""
    from landmarks.models.presets import PRESETS

    parser.add_argument(
        "--data",
        help="GLDv2 CSV (images in train/ beside it) or folder-per-landmark collection "
        "(optional with --resume)",
    )
    parser.add_argument("--out", required=True, help="run folder to write (config, weights, meta, log)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="named configuration (default: cpu = EfficientNet-Lite0 fine-tuned from its packaged "
        "ImageNet weights; cpu-scratch: resnet10t from random init; "
        "lite2-256: the offline GPU choice)",
    )
    parser.add_argument("--config", help="JSON config file (e.g. another run's config.json)")
    parser.add_argument("--epochs", type=int, help="passes over the training split")
    parser.add_argument("--image-size", type=int, help="training / inference side in pixels")
    parser.add_argument("--batch-size", type=int, help="global batch size (split over torchrun processes)")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument(
        "--time-budget",
        type=float,
        metavar="MINUTES",
        help="size the whole schedule from measured throughput to finish in this many minutes",
    )
    parser.add_argument(
        "--pretrained",
        help="backbone weights: lite0, lite1, lite2 (ImageNet, installed with "
        "the package; use model.backbone=tf_efficientnet_lite0 etc.), a "
        "timm tag (e.g. ra_in1k, or 'timm' for the default; downloads) or "
        "a local weights file; default: the preset's",
    )
    parser.add_argument(
        "--init",
        metavar="RUN",
        help="start from this run's weights and class map (multi-stage training; the head is kept)",
    )
    parser.add_argument(
        "--local-only",
        action="store_true",
        help="train only the DELG-style local head on a frozen model (use with --init)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="also train the DELG-style local head in this run (on the detached stride-16 map)",
    )
    parser.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    parser.add_argument("--seed", type=int, help="random seed")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: the local GPU if any, else CPU)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. optim.lr=3e-4 model.head.subcenters=3",
    )


def resolve_config(args: argparse.Namespace) -> Any:
    """The :class:`~landmarks.train.TrainConfig` the arguments describe."""
    from landmarks.config import apply_overrides, merge
    from landmarks.train import load_config_file, make_config

    preset_name = args.preset or (None if args.config else "cpu")
    conf = make_config(preset_name)
    if args.config:
        data = load_config_file(args.config)
        if args.preset and data.get("preset") not in (None, args.preset):
            logger.info(
                "--preset %s applied under --config %s (preset %s)",
                args.preset,
                args.config,
                data.get("preset"),
            )
        conf = merge(conf, data)
        if args.preset:
            conf.preset = args.preset
    flags: dict[str, Any] = {}
    if args.epochs is not None:
        flags["epochs"] = args.epochs
        flags["steps"] = 0
    if args.batch_size is not None:
        flags["batch_size"] = args.batch_size
    if args.seed is not None:
        flags["seed"] = args.seed
    if args.image_size is not None:
        flags.setdefault("data", {})["image_size"] = args.image_size
    if args.lr is not None:
        flags.setdefault("optim", {})["lr"] = args.lr
    if args.pretrained is not None:
        flags.setdefault("model", {})["pretrained"] = args.pretrained
    if args.local or args.local_only:
        flags.setdefault("model", {}).setdefault("local", {})["enabled"] = True
    if args.local_only:
        flags["local_only"] = True
    if args.init:
        flags["init"] = str(Path(args.init))
    if flags:
        conf = merge(conf, flags)
    if args.overrides:
        conf = apply_overrides(conf, list(args.overrides))
    if conf.local_only and not conf.init:
        raise ConfigError("--local-only trains the local head of a trained model: pass --init RUN")
    if conf.time_budget_min and args.time_budget is None:
        conf.time_budget_min = 0.0  # a saved config's budget is a record, not a request
    return conf


def run(args: argparse.Namespace) -> int:
    """Run ``landmarks train``; prints the run folder and its last metrics as JSON."""
    import torch

    from landmarks.utils.seed import seed_everything

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.resume:
        from landmarks.checkpoint import load_train_state
        from landmarks.train import TrainConfig, train

        _, state = load_train_state(out)
        data = args.data or state.get("data")
        if not data:
            raise LandmarksError(f"{out}: the run does not record its data; pass --data")
        from landmarks.config import from_dict

        conf = from_dict(TrainConfig, state["config"])
    else:
        from landmarks.train import train

        if not args.data:
            raise LandmarksError("--data is required (a GLDv2 CSV or a folder-per-landmark collection)")
        data = args.data
        conf = resolve_config(args)
        if args.time_budget is not None and args.time_budget <= 0:
            raise ConfigError("--time-budget must be a positive number of minutes")
    seed_everything(conf.seed)
    result = train(conf, data, out, resume=args.resume, time_budget_min=args.time_budget, device=args.device)

    if dist_env().is_main:
        summary = {
            "run": str(result.run_dir),
            "steps": result.steps,
            "epochs": result.epochs,
            "elapsed_s": round(result.elapsed_s, 1),
        }
        summary.update({k: v for k, v in result.metrics.items() if k.startswith("val_")})
        print(json.dumps(summary))
    return 0
